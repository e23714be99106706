"""``decmem eval --weights``: depth/pose visibility and block relevance against analytic scenes, recall@k on hand-made
selections (block and frame rules), and a CI-sized run of the whole protocol on rendered MiniWorld clips (JSON,
tables and plots checked)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from decmem.data_pipeline.overlap import block_overlap, block_relevance, coverage, pixel_blocks, visible_in
from decmem.evaluation.protocol import METRICS, _memory_only, _recall, parse_tables
from decmem.model.blocks import BlockLayout

H = W = 24
F = 12.0                                                      # focal length: horizontal FOV 2*atan(12/12) = 90 deg
K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])


def _yaw(deg: float, pos=(0.0, 0.0, 0.0)) -> np.ndarray:
    """c2w of a camera at ``pos`` turned ``deg`` about the world y axis (OpenCV axes: +z forward)."""
    a = np.radians(deg)
    c2w = np.eye(4)
    c2w[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    c2w[:3, 3] = pos
    return c2w


def _room_depth(c2w: np.ndarray, half: float = 5.0) -> np.ndarray:
    """z-depth [H, W] of an axis-aligned box room [-half, half]^3 seen from inside, by ray casting."""
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    d_cam = np.stack([(xs - K[0, 2]) / F, (ys - K[1, 2]) / F, np.ones_like(xs)], -1)   # z = 1 rays
    d = d_cam @ c2w[:3, :3].T
    o = c2w[:3, 3]
    with np.errstate(divide="ignore"):
        t = np.where(d > 0, (half - o) / d, np.where(d < 0, (-half - o) / d, np.inf)).min(-1)
    return t                                                        # ray z component is 1: t is the z-depth


def _rotation_reference(yaw_t: float, yaw_s: float) -> float:
    """Share of camera t's pixels whose ray lands inside camera s's image: pure rotation, so no depth needed."""
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    d = np.stack([(xs - K[0, 2]) / F, (ys - K[1, 2]) / F, np.ones_like(xs)], -1) @ _yaw(yaw_t)[:3, :3].T
    p = d @ _yaw(yaw_s)[:3, :3]                                    # world -> camera s (R^T d, row vectors)
    z = p[..., 2]
    u, v = F * p[..., 0] / np.where(z > 0, z, 1) + K[0, 2], F * p[..., 1] / np.where(z > 0, z, 1) + K[1, 2]
    return float(((z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)).mean())


def _rotation_blocks_reference(yaw_t: float, yaw_s: float, blocks: np.ndarray, n_b: int) -> np.ndarray:
    """[n_b, n_b]: share of each block of camera t whose rays land in each block of camera s (pure rotation)."""
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    d = np.stack([(xs - K[0, 2]) / F, (ys - K[1, 2]) / F, np.ones_like(xs)], -1) @ _yaw(yaw_t)[:3, :3].T
    p = d @ _yaw(yaw_s)[:3, :3]
    z = p[..., 2]
    u, v = F * p[..., 0] / np.where(z > 0, z, 1) + K[0, 2], F * p[..., 1] / np.where(z > 0, z, 1) + K[1, 2]
    inside = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    lands = blocks[np.clip(v, 0, H - 1).astype(int), np.clip(u, 0, W - 1).astype(int)]
    out = np.zeros((n_b, n_b))
    np.add.at(out, (blocks[inside], lands[inside]), 1)
    return out / np.bincount(blocks.reshape(-1))[:, None]


def _clip(poses):
    c2w = np.stack(poses)
    return {"depth": np.stack([_room_depth(p) for p in c2w]), "K": np.tile(K, (len(poses), 1, 1)), "c2w": c2w}


#################################################################################
#                                  Visibility                                   #
#################################################################################

def test_same_view_sees_everything_and_opposite_view_nothing():
    c = _clip([_yaw(0), _yaw(0), _yaw(180)])
    assert visible_in(c["depth"][0], K, c["c2w"][0], c["depth"][1], K, c["c2w"][1]).all()
    assert not visible_in(c["depth"][0], K, c["c2w"][0], c["depth"][2], K, c["c2w"][2]).any()


@pytest.mark.parametrize("turn", [10.0, 30.0, 45.0, 70.0])
def test_rotation_share_matches_the_homography_reference(turn):
    c = _clip([_yaw(0), _yaw(turn)])                             # sources must be older than targets
    got = coverage(c, [1], [0], rel_tol=0.05)[0]
    # pixel-centre sampling of the depth lookup at the image border costs at most a column
    assert got == pytest.approx(_rotation_reference(turn, 0), abs=1.5 / W)
    assert 0 < got < 1


def test_occluder_between_the_views_hides_what_poses_call_a_revisit():
    # source camera at z=0 facing a wall 2 m away (depth 2 everywhere); the target stands behind that wall at z=3,
    # facing the same way, and sees the far wall at z=10. Same direction, 3 m apart: visible by poses, not by depth.
    src, tgt = _yaw(0, (0, 0, 0)), _yaw(0, (0, 0, 3))
    near, far = np.full((H, W), 2.0), np.full((H, W), 7.0)
    assert not visible_in(far, K, tgt, near, K, src).any()
    # without the occluder the source sees the far wall (depth 10) and most of the target's view
    open_view = visible_in(far, K, tgt, np.full((H, W), 10.0), K, src)
    assert open_view.mean() > 0.4


def test_coverage_counts_only_old_enough_sources_and_translation():
    poses = [_yaw(0), _yaw(0, (0, 0, 1)), _yaw(90), _yaw(0, (1, 0, 0))]
    c = _clip(poses)
    cov = coverage(c, [3], [0, 1, 2], min_gap=0)[0]
    assert cov > 0.5                                             # a sideways step still sees most of the wall
    assert coverage(c, [3], [0, 1, 2], min_gap=3)[0] == pytest.approx(
        coverage(c, [3], [0], min_gap=0)[0])                     # only frame 0 is >= 3 frames older
    assert coverage(c, [2], [0], min_gap=0)[0] == pytest.approx(_rotation_reference(90, 0), abs=1.5 / W)


def test_memory_only_frames_are_out_of_the_window_and_seen_before():
    # yaw per frame: view A (0, 10), the opposite view B (180, 190, 200), A again (0), A turned a little (20), then
    # a new view C (90, 100) never seen before; 90-deg-wide frames, window 3 (the 2 frames before each frame).
    yaws = [0, 10, 180, 190, 200, 0, 20, 90, 100]
    c = _clip([_yaw(y) for y in yaws])
    got = _memory_only(c, np.arange(2, 9), 2, 0.5, 0.1, 1)
    # frame 5 (A again): frames 3, 4 (B) see none of it, frames 0-2 all of it -> memory only. 6: frame 5 sees most.
    # 7 (C): frames 5, 6 see at most a third of it, but nothing older sees half either. 2-4, 8: the window holds them.
    assert got.tolist() == [False, False, False, True, False, False, False]
    want = [_rotation_reference(y, s) for y, s in ((90, 0), (90, 20))]          # frame 7 vs each A frame
    assert max(want) < 0.5
    # a window of 4 (3 frames before) holds frame 5 for frame 6 and B's frames for nothing: still only frame 5
    assert _memory_only(c, np.arange(3, 9), 3, 0.5, 0.1, 1).tolist() == [False, False, True, False, False, False]


def test_pixel_blocks_follow_the_model_tiling():
    lay = BlockLayout(6, 6, 4)                                     # 6x6 tokens, 2x2 tiles -> 9 blocks
    blocks = pixel_blocks(H, W, lay.h, lay.w, lay.tile)
    tok = (np.arange(H)[:, None] * lay.h // H) * lay.w + np.arange(W)[None, :] * lay.w // W   # raster token
    ref = (torch.argsort(lay.raster_to_block)[torch.from_numpy(tok)] // lay.block_size).numpy()
    np.testing.assert_array_equal(blocks, ref)


def test_block_overlap_after_a_turn():
    # turning 45 deg right: the bank frame's right half stays in view, its left half leaves it
    c = _clip([_yaw(0), _yaw(45)])
    lay = BlockLayout(6, 6, 4)                                     # tiles of 2x2 tokens: 3 tile columns
    frac = block_overlap(c, 0, 1, pixel_blocks(H, W, lay.h, lay.w, lay.tile), lay.blocks_per_frame).reshape(3, 3)
    assert (frac[:, 0] == 0).all() and (frac[:, 2] == 1).all()
    assert (0 < frac[:, 1]).all() and (frac[:, 1] < 1).all()


LAY = BlockLayout(6, 6, 4)                                         # tiles of 2x2 tokens: 3x3 blocks of 8x8 pixels
BLOCKS = pixel_blocks(H, W, LAY.h, LAY.w, LAY.tile)


def test_block_relevance_of_the_identical_view_is_the_same_block_only():
    c = _clip([_yaw(0), _yaw(0), _yaw(180)])
    np.testing.assert_array_equal(block_relevance(c, 0, 1, BLOCKS, 9), np.eye(9))
    assert not block_relevance(c, 2, 1, BLOCKS, 9).any()           # facing away: nothing is relevant
    # a pixel stride samples the query pixels only: the same block still holds all of them
    np.testing.assert_array_equal(block_relevance(c, 0, 1, BLOCKS, 9, stride=3), np.eye(9))


@pytest.mark.parametrize("turn", [10.0, float(np.degrees(np.arctan(8 / F))), 45.0])
def test_block_relevance_after_a_turn_matches_the_homography_reference(turn):
    c = _clip([_yaw(0), _yaw(turn)])                                  # bank frame 0, query frame 1
    got = block_relevance(c, 0, 1, BLOCKS, 9, rel_tol=0.05)
    # pixel-centre sampling of the depth lookup at the image border may cost a pixel or two per block
    np.testing.assert_allclose(got, _rotation_blocks_reference(turn, 0, BLOCKS, 9), atol=2 / 64)
    if turn > 30:
        # turned by a tile's width (8 px at focal 12: 33.7 deg) or a little more: most of a query block's surface
        # sits one column to the right in the bank frame; the right column turned out of the bank's view
        for r in range(3):
            for col in range(2):
                assert got[3 * r + col].argmax() == 3 * r + col + 1
            assert not got[3 * r + 2].any()


def test_block_relevance_is_hidden_by_an_occluder():
    # the bank camera at z=0 faces a wall 2 m away; the query camera stands behind that wall at z=3 and sees the far
    # wall (depth 7): no query pixel's surface is what the bank frame shows. Without the wall (bank depth 10) the
    # query view is the middle of the bank's, so the middle block is all in the bank's middle block.
    poses = np.stack([_yaw(0, (0, 0, 0)), _yaw(0, (0, 0, 3))])
    near, far, open_ = np.full((H, W), 2.0), np.full((H, W), 7.0), np.full((H, W), 10.0)
    clip = {"depth": np.stack([near, far]), "K": np.stack([K, K]), "c2w": poses}
    assert not block_relevance(clip, 0, 1, BLOCKS, 9).any()
    clip["depth"] = np.stack([open_, far])
    got = block_relevance(clip, 0, 1, BLOCKS, 9)
    assert got[4, 4] == 1 and got.sum(axis=1) == pytest.approx(np.ones(9))


#################################################################################
#                                   Recall@k                                    #
#################################################################################

def test_recall_per_query_block_under_the_block_rule():
    n_b, old, t0 = 2, 2, 5                                        # 2 query blocks per frame, 4 candidate blocks
    rel = {5: np.array([[1, 0, 0, 0], [0, 0, 1, 1]], bool),       # frame 5: block 0 -> {0}, block 1 -> {2, 3}
           6: np.array([[0, 0, 0, 0], [0, 1, 0, 0]], bool)}       # frame 6: block 0 -> nothing, block 1 -> {1}
    # decmem: 1 head, 2 query frames x 2 query blocks, k = 2
    sel = torch.tensor([[0, 2], [2, 3], [0, 1], [2, 3]]).view(1, 1, 4, 2)
    out = _recall([(sel, torch.ones_like(sel, dtype=torch.bool))], t0, 2, n_b, old, rel, budget=2)
    assert out[0] == (1.0, 0.5, 1 / 4)                            # its one relevant block found, one wasted read
    assert out[1] == (1.0, 1.0, 2 / 4)
    assert out[2] is None                                         # nothing relevant to that query block
    # the blocks relevant to frame 5's other query block: all of that frame's view, none of this block's surface
    assert out[3] == (0.0, 0.0, 1 / 4)
    # fov_frames: bank frame 1 read by every query block of the chunk, each scored against its own set
    fsel = torch.tensor([2, 3]).view(1, 1, 1, 2)
    out = _recall([(fsel, torch.ones_like(fsel, dtype=torch.bool))], t0, 2, n_b, old, rel, budget=2)
    assert out == [(0.0, 0.0, 1 / 4), (1.0, 1.0, 2 / 4), None, (0.0, 0.0, 1 / 4)]


def test_recall_on_hand_made_selections_under_the_frame_rule():
    n_b, old, t0 = 4, 2, 5                                        # 8 candidate blocks
    # one row per frame: the frame as a whole is the query
    rel = {5: np.array([[1, 1, 0, 0, 0, 0, 0, 1]], bool), 6: np.zeros((1, 8), bool)}
    # decmem: 1 head, 2 query frames x n_b query blocks, k = 2
    sel = torch.tensor([[0, 7], [2, 3], [0, 9], [1, 4]] + [[0, 1]] * 4).view(1, 1, 8, 2)
    valid = torch.ones_like(sel, dtype=torch.bool)
    valid[0, 0, 3, 1] = False                                     # [1, (4)]: one valid pick
    out = _recall([(sel, valid)], t0, 2, n_b, old, rel, budget=2)
    scored = [e for e in out if e is not None]
    assert len(out) == 8 and len(scored) == 4                     # frame 6 has no relevant block: not scored
    assert scored[0] == (1.0, 1.0, 3 / 8)                         # both picks relevant
    assert scored[1] == (0.0, 0.0, 3 / 8)
    assert scored[2] == (0.5, 1.0, 3 / 8)                         # block 9 is no candidate: not a read
    assert scored[3] == (0.5, 1.0, 3 / 8)                         # one valid pick, relevant
    # fov_frames: one whole-chunk selection read by both query frames; budget = 1 frame x 4 blocks
    fsel = torch.tensor([4, 5, 6, 7]).view(1, 1, 1, 4)
    out = _recall([(fsel, torch.ones_like(fsel, dtype=torch.bool))], t0, 2, n_b, old, rel, budget=4)
    assert out[0] == (1 / 3, 1 / 4, 3 / 8) and out[1] is None


#################################################################################
#                           The protocol, end to end                            #
#################################################################################

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalproto")
    data = root / "data"
    subprocess.run([sys.executable, "-m", "decmem.cli", "preprocess", "--format", "render",
                    "scenes=1,frames=48,hw=16x16,seed=3", str(data), "--segment-frames", "24"],
                   check=True, capture_output=True, text=True)
    from decmem.model.dit import VideoDiT
    from decmem.training.config import load_config
    from decmem.training.run_config import RunConfig
    from decmem.training.weights import save_weights

    cfg = load_config(RunConfig, "configs/debug.yaml", [])
    torch.manual_seed(0)
    model = VideoDiT(cfg.model)
    for p in model.parameters():                                  # untrained, but not the zero-init no-op
        torch.nn.init.normal_(p, std=0.02)
    save_weights(model, str(root / "weights"), cfg.diffusion)
    # another model trained "the same way": its own init (position prior kept, so attention is not uniform and
    # dispersion varies), outputs opened with small random weights
    torch.manual_seed(1)
    model = VideoDiT(cfg.model)
    for name, p in model.named_parameters():
        if "adaLN" in name or "final_layer" in name:
            torch.nn.init.normal_(p, std=0.02)
    save_weights(model, str(root / "weights_b"), cfg.diffusion)
    # the same network on coarser retrieval blocks: another latent geometry
    cfg = load_config(RunConfig, "configs/debug.yaml", ["model.attention.block_size=16"])
    save_weights(VideoDiT(cfg.model), str(root / "weights_blocks16"), cfg.diffusion)
    return root, data


def _truth_row(data, video_id: str, t: int, rule: str) -> np.ndarray:
    """The heatmap's true overlap of latent frame t against bank frames 0..t-1, from the geometry (debug config:
    16x16 pixels, 8x8 tokens, 2x2-token blocks; default thresholds)."""
    from decmem.data_pipeline.clip import iter_clip_sources

    clip = next(c for c in iter_clip_sources(str(data)) if c["video_id"] == video_id)
    blocks = pixel_blocks(16, 16, 8, 8, (2, 2))
    if rule == "block":                                          # share of frame t's blocks with a relevant one in f
        return np.array([(block_relevance(clip, f, t, blocks, 16) >= 0.1).any(axis=1).mean() for f in range(t)])
    return np.array([(block_overlap(clip, f, t, blocks, 16) >= 0.25).mean() for f in range(t)])


def test_eval_protocol_end_to_end(rendered):
    root, data = rendered
    out = root / "eval"
    strategies = ["decmem", "dense", "dense_decay", "fov_frames", "window"]
    p = subprocess.run([sys.executable, "-m", "decmem.cli", "eval", "--weights", str(root / "weights"),
                        "--data", str(data), "--init-frames", "8", "--frames", "6", "--clips", "2",
                        "--strategies", ",".join(strategies), "--steps", "2", "--min-gap", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert len(res["clips"]) == 2 and res["sample_steps"] == {n: 2 for n in strategies}
    assert res["weights"] == {n: str(root / "weights") for n in strategies}
    assert res["lpips"].startswith(("unavailable", "computed")) and res["fvd"].startswith("unavailable")
    for c in res["clips"]:
        assert c["revisit_rule"] == "depth" and len(c["revisit"]) == len(c["coverage"]) == 6
        assert c["revisit"] == [v >= 0.5 for v in c["coverage"]]
        assert set(c["strategies"]) == set(strategies)
        for name in ("decmem", "fov_frames"):
            row = c["strategies"][name]
            assert 0 <= row["recall"] <= 1 and 0 <= row["precision"] <= 1 and 0 < row["chance"] < 1
            assert np.asarray(row["heatmap"]).shape == (6, 14)
        assert "recall" not in c["strategies"]["dense"]
    # the summary is the mean over clips of per-clip means, recomputed here from the per-frame arrays
    for name in strategies:
        for part, mask in (("revisit", "revisit"), ("memory", "memory_only")):
            per_clip = []
            for c in res["clips"]:
                sel, psnr = np.asarray(c[mask], bool), np.asarray(c["strategies"][name]["psnr"])
                assert len(sel) == len(psnr) == 6
                per_clip.append(psnr[sel].mean() if sel.any() else None)
            vals = [v for v in per_clip if v is not None]
            got = res["summary"][name][f"psnr_{part}"]
            assert got["clips"] == len(vals)
            if vals:
                assert got["mean"] == pytest.approx(np.mean(vals), abs=1e-9)
        assert res["summary"][name]["psnr_all"]["mean"] == pytest.approx(
            np.mean([np.mean(c["strategies"][name]["psnr"]) for c in res["clips"]]), abs=1e-9)
    tables = parse_tables((out / "eval.md").read_text())
    for title, key, _ in METRICS:
        if key == "lpips_all" and title not in tables:
            continue                                               # written as one "not measured" line
        want = ["decmem", "fov_frames"] if key in ("recall", "precision") else strategies
        assert list(tables[title]) == want, title
    # relevance: the block rule by default, recorded, stated, and the heatmap's truth is its frame-level summary
    assert res["relevance"]["rule"] == "block" and res["relevance"]["threshold"] == 0.1
    md = (out / "eval.md").read_text()
    assert "relevance (rule `block`" in md and ">= 10% of the query block's pixels" in md
    c = res["clips"][0]
    np.testing.assert_allclose(np.asarray(c["true_overlap"])[5, :13], _truth_row(data, c["video_id"], 13, "block"))
    assert tables["PSNR (dB), all generated frames"]["window"]["mean"] == pytest.approx(
        res["summary"]["window"]["psnr_all"]["mean"], abs=0.006)
    for png in ("frames.png", "retrieval_heatmap.png", "dispersion.png", "chunk_seconds.png"):
        img = Image.open(out / png)
        img.verify()
        assert img.size[0] >= 600 and img.size[1] >= 300
    assert os.path.getsize(out / "frames.png") > 10_000


def test_eval_protocol_without_depth_uses_the_pose_rule(rendered, tmp_path):
    from decmem.data_pipeline.clip import iter_clip_sources, save_clip
    from decmem.evaluation.protocol import EvalArgs, run_eval

    root, data = rendered
    clip = next(iter_clip_sources(str(data)))
    clip.pop("depth")
    save_clip(str(tmp_path / "clip.npz"), clip)
    res = run_eval(EvalArgs(weights=str(root / "weights"), data=str(tmp_path / "clip.npz"), init_frames=8, frames=4,
                            strategies=["window", "fov_frames"], clips=3, sample_steps=1, min_gap=2),
                   str(tmp_path / "out"), log=lambda *a: None)
    (c,) = res["clips"]                                              # one clip, though 3 were asked for
    assert c["revisit_rule"] == "pose" and c["coverage"] is None and len(c["revisit"]) == 4
    assert "recall" not in c["strategies"]["fov_frames"]              # no depth: relevance unknown, not guessed
    assert res["summary"]["fov_frames"]["recall"]["clips"] == 0
    assert "retrieval_heatmap.png" not in res["paths"]
    with pytest.raises(ValueError, match="no clip has 40 latent frames"):
        run_eval(EvalArgs(weights=str(root / "weights"), data=str(tmp_path / "clip.npz"), init_frames=30, frames=10,
                          strategies=["window"]), str(tmp_path / "out2"))


#################################################################################
#              Per-strategy weights, dispersion, long-rollout options           #
#################################################################################

def _quiet(*_):
    pass


def test_each_strategy_reads_its_own_weights(rendered, tmp_path):
    from decmem.evaluation.protocol import EvalArgs, run_eval

    root, data = rendered
    a, b = str(root / "weights"), str(root / "weights_b")
    kw = dict(data=str(data), init_frames=8, frames=4, clips=1, sample_steps=1, min_gap=2)
    one = run_eval(EvalArgs(weights=a, strategies=["decmem", "window"], relevance="frame", **kw), str(tmp_path / "one"),
                   log=_quiet)
    two = run_eval(EvalArgs(weights=f"decmem={a},window={b}", **kw), str(tmp_path / "two"), log=_quiet)
    assert two["args"]["strategies"] == ["decmem", "window"]                 # the mapping's keys, in its order
    assert two["weights"] == {"decmem": a, "window": b}
    row = lambda r, n: r["clips"][0]["strategies"][n]  # noqa: E731
    assert row(two, "decmem")["psnr"] == row(one, "decmem")["psnr"]          # same weights, same seed
    # the frame rule, asked for: recorded, stated, and its heatmap truth is the share of relevant bank blocks
    assert one["relevance"]["rule"] == "frame" and one["relevance"]["threshold"] == 0.25
    assert "relevance (rule `frame`" in (tmp_path / "one" / "eval.md").read_text()
    c = one["clips"][0]
    np.testing.assert_allclose(np.asarray(c["true_overlap"])[3, :11], _truth_row(data, c["video_id"], 11, "frame"))
    assert not np.allclose(row(two, "window")["psnr"], row(one, "window")["psnr"])
    md = (tmp_path / "two" / "eval.md").read_text()
    assert f"decmem `{a}`" in md and f"window `{b}`" in md
    with pytest.raises(ValueError, match=r"no weights for \['dense'\]"):
        run_eval(EvalArgs(weights=f"decmem={a}", strategies=["decmem", "dense"], **kw), str(tmp_path / "x"))


def test_weights_of_another_geometry_are_refused_in_one_line(rendered, tmp_path, capsys):
    from decmem.cli.main import main

    root, data = rendered
    a, c = str(root / "weights"), str(root / "weights_blocks16")
    rc = main(["eval", "--weights", f"decmem={a},fov_frames={c}", "--data", str(data), "--init-frames", "8",
               "--frames", "4", "--clips", "1", "--steps", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not (tmp_path / "out").exists()
    assert f"weights {a} (decmem) and {c} (fov_frames) differ in retrieval block size 4 vs 16" in err


def test_a_strategy_that_reads_no_blocks_may_come_from_another_block_size(rendered, tmp_path):
    """window (and dense) read no retrieval blocks: their weights may use another block size than decmem's, and
    recall is scored on the retrieving model's blocks; the window row is what that folder gives alone."""
    from decmem.evaluation.protocol import EvalArgs, run_eval

    root, data = rendered
    a, c = str(root / "weights"), str(root / "weights_blocks16")
    kw = dict(data=str(data), init_frames=8, frames=4, clips=1, sample_steps=1, min_gap=2)
    both = run_eval(EvalArgs(weights=f"window={c},decmem={a}", **kw), str(tmp_path / "both"), log=_quiet)
    alone = run_eval(EvalArgs(weights=c, strategies=["window"], **kw), str(tmp_path / "alone"), log=_quiet)
    mine = run_eval(EvalArgs(weights=a, strategies=["decmem"], **kw), str(tmp_path / "mine"), log=_quiet)
    row = lambda r, n: r["clips"][0]["strategies"][n]  # noqa: E731
    assert row(both, "window")["psnr"] == row(alone, "window")["psnr"]
    for key in ("psnr", "recall", "chance"):                                 # decmem's blocks, not the first folder's
        assert row(both, "decmem")[key] == row(mine, "decmem")[key], key


def test_memory_only_frames_follow_each_models_own_window(rendered, tmp_path):
    """A frame is memory-only when the model's *own* ALM window misses it: on this `return` clip generated frame 8
    is memory-only for a window of 2 (the frame before it sees < 50%) and not for a window of 6 (3 of the 5 frames
    before it see it). Each strategy's row and summary use its own mask; the clip keeps the first model's."""
    from decmem.evaluation.protocol import EvalArgs, run_eval
    from decmem.model.dit import VideoDiT
    from decmem.training.config import load_config
    from decmem.training.run_config import RunConfig
    from decmem.training.weights import save_weights

    root, _ = rendered
    data = tmp_path / "ret"
    subprocess.run([sys.executable, "-m", "decmem.cli", "preprocess", "--format", "render",
                    "scenes=1,frames=24,hw=16x16,seed=3,path=return", str(data), "--segment-frames", "24"],
                   check=True, capture_output=True, text=True)
    cfg = load_config(RunConfig, "configs/debug.yaml", ["model.attention.window=6"])
    save_weights(VideoDiT(cfg.model), str(tmp_path / "w6"), cfg.diffusion)
    kw = dict(data=str(data), init_frames=8, frames=4, clips=1, sample_steps=1, min_gap=2)
    res = run_eval(EvalArgs(weights=f"decmem={root / 'weights'},window={tmp_path / 'w6'}", **kw), str(tmp_path / "o"),
                   log=_quiet)
    c = res["clips"][0]
    assert c["strategies"]["decmem"]["memory_only"] == [True, False, False, False]          # window 2
    assert c["strategies"]["window"]["memory_only"] == [False, False, False, False]         # window 6
    assert c["memory_only"] == c["strategies"]["decmem"]["memory_only"]
    psnr = c["strategies"]["decmem"]["psnr"]
    assert res["summary"]["decmem"]["psnr_memory"]["mean"] == pytest.approx(psnr[0], abs=1e-9)
    assert res["summary"]["window"]["psnr_memory"]["clips"] == 0
    assert "decmem [1], window [0]" in (tmp_path / "o" / "eval.md").read_text()


def test_dispersion_chunk_seconds_frames_for_and_recall_every(rendered, tmp_path):
    from decmem.evaluation.protocol import EvalArgs, run_eval

    root, data = rendered
    kw = dict(weights=str(root / "weights_b"), data=str(data), init_frames=8, frames=10, clips=1, sample_steps=1,
              min_gap=2, strategies=["decmem", "dense", "window"])
    res = run_eval(EvalArgs(frames_for={"dense": 4}, recall_every=2, **kw), str(tmp_path / "a"), log=_quiet)
    (c,) = res["clips"]
    for name, n in (("decmem", 10), ("dense", 4), ("window", 10)):
        row, s = c["strategies"][name], res["summary"][name]
        low, high = np.asarray(row["dispersion_low"]), np.asarray(row["dispersion_high"])
        assert row["generated_latents"] == n and len(row["psnr"]) == len(low) == len(high) == n
        assert len(row["chunk_seconds"]) == n // 2 and all(t > 0 for t in row["chunk_seconds"])
        assert ((low >= 0) & (low <= 1) & (high >= 0) & (high <= 1) & (low + high <= 1 + 1e-6)).all()
        assert np.ptp(low) > 0                                        # varies: the quarters below mean something
        # the summary, recomputed from the per-frame / per-chunk arrays
        q = max(1, n // 4)
        for key, x in (("dispersion_low", low), ("dispersion_high", high)):
            assert s[key]["mean"] == pytest.approx(x.mean())
            assert s[f"{key}_first"]["mean"] == pytest.approx(x[:q].mean())
            assert s[f"{key}_last"]["mean"] == pytest.approx(x[-q:].mean())
        cs = np.asarray(row["chunk_seconds"])
        k = max(1, len(cs) // 10)
        assert s["chunk_s_first"]["mean"] == pytest.approx(cs[:k].mean())
        assert s["chunk_s_last"]["mean"] == pytest.approx(cs[-k:].mean())
        assert s["chunk_s_ratio"]["mean"] == pytest.approx(cs[-k:].mean() / cs[:k].mean())
        # --frames-for: the summary counts only the frames the strategy generated
        rev, psnr = np.asarray(c["revisit"][:n]), np.asarray(row["psnr"])
        assert s["psnr_all"]["mean"] == pytest.approx(psnr.mean())
        assert s["psnr_revisit"]["clips"] == int(rev.any()) and s["psnr_novel"]["clips"] == int((~rev).any())
        if rev.any():
            assert s["psnr_revisit"]["mean"] == pytest.approx(psnr[rev].mean())
    assert len(c["revisit"]) == 10
    md = (tmp_path / "a" / "eval.md").read_text()
    assert "dense generated only 4 of the 10 latents" in md and "`--frames-for dense=4`" in md
    tables = parse_tables(md)
    assert tables["seconds per chunk, last 10% / first 10%"]["dense"]["mean"] == pytest.approx(
        res["summary"]["dense"]["chunk_s_ratio"]["mean"], abs=6e-4)
    for png in ("dispersion.png", "chunk_seconds.png"):
        with Image.open(tmp_path / "a" / png) as im:
            im.verify()

    # --recall-every 2 scores chunks 0, 2, 4 (frames 0-1, 4-5, 8-9) of the same rollout that recall_every 1 scores
    full = run_eval(EvalArgs(frames_for={"dense": 4}, recall_every=1, **kw), str(tmp_path / "b"), log=_quiet)
    (f,) = full["clips"]
    assert c["scored_frames"] == [0, 1, 4, 5, 8, 9] and f["scored_frames"] == list(range(10))
    rows = c["scored_frames"]
    np.testing.assert_allclose(np.asarray(c["true_overlap"]), np.asarray(f["true_overlap"])[rows])
    part, whole = c["strategies"]["decmem"], f["strategies"]["decmem"]
    np.testing.assert_allclose(np.asarray(part["heatmap"]), np.asarray(whole["heatmap"])[rows])
    assert part["queries"] * 5 == whole["queries"] * 3                    # 3 of 5 chunks, the same entries each


def test_long_rollout_frames_plot_is_smoothed(tmp_path):
    from decmem.evaluation.figures import _smooth, plot_frames

    y = np.r_[np.zeros(10), np.ones(10)]
    np.testing.assert_allclose(_smooth(np.full(7, 3.0), 5), 3.0)          # ends averaged over fewer, not zeros
    np.testing.assert_allclose(_smooth(y, 3)[8:12], [0, 1 / 3, 2 / 3, 1])
    rng = np.random.default_rng(0)

    def clip(n, limited):
        s = {"decmem": {"psnr": rng.normal(20, 1, n), "ssim": rng.random(n)},
             "dense": {"psnr": rng.normal(20, 1, limited), "ssim": rng.random(limited)}}
        return {"generated_frames": list(range(n)), "revisit": list(rng.random(n) < 0.5), "strategies": s}

    assert plot_frames(str(tmp_path / "long.png"), [clip(600, 40)], ["decmem", "dense"]) == 11
    assert plot_frames(str(tmp_path / "short.png"), [clip(16, 16)], ["decmem", "dense"]) == 1
    with Image.open(tmp_path / "long.png") as im:
        assert im.size == (1200, 450)                                    # one wide PSNR panel
    with Image.open(tmp_path / "short.png") as im:
        assert im.size == (800, 600)                                     # PSNR and SSIM
