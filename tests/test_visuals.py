"""Tests for training/visuals.py: retrieval heatmaps against a loop reference, colour images, GIFs through TensorBoard."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from decmem.training.visuals import (
    add_gif,
    add_heatmap,
    heatmap_image,
    retrieval_heatmap,
    side_by_side_gif,
    to_rgb_frames,
)


def _loop_reference(layers, chunk_frames, blocks_per_frame, bank_frames):
    """Straightforward per-selection loop: the independent answer the vectorised version must match."""
    counts = [[0.0] * bank_frames for _ in range(chunk_frames)]
    for st in layers:
        if "selected" not in st:
            continue
        sel, val = st["selected"].tolist(), st["selected_valid"].tolist()
        B, H, n_qb, k = st["selected"].shape
        for b in range(B):
            for h in range(H):
                for q in range(n_qb):
                    frames = range(chunk_frames) if n_qb == 1 else [q // (n_qb // chunk_frames)]
                    for j in range(k):
                        if val[b][h][q][j]:
                            for c in frames:
                                counts[c][sel[b][h][q][j] // blocks_per_frame] += 1
    out = np.zeros((chunk_frames, bank_frames))
    for c in range(chunk_frames):
        tot = sum(counts[c])
        if tot:
            out[c] = [x / tot for x in counts[c]]
    return out


def _random_layer(g, B, H, n_qb, k, n_blocks):
    """Random selections with ~30% padding; padding holds junk indices (incl. out of range) that must be ignored."""
    sel = torch.randint(0, n_blocks, (B, H, n_qb, k), generator=g)
    valid = torch.rand(B, H, n_qb, k, generator=g) > 0.3
    junk = torch.randint(-5, 10 * n_blocks, (B, H, n_qb, k), generator=g)
    return {"selected": torch.where(valid, sel, junk), "selected_valid": valid}


def test_heatmap_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    C, bpf, F = 2, 4, 6
    # layer 0 skews toward early frames so rows genuinely differ from uniform
    l0 = _random_layer(g, 2, 3, 8, 5, bpf * F)
    l0["selected"] = torch.where(l0["selected_valid"], l0["selected"] % (bpf * 3), l0["selected"])
    layers = [l0, {"dense": True}, _random_layer(g, 2, 3, 8, 5, bpf * F)]
    got = retrieval_heatmap(layers, C, bpf, F)
    want = _loop_reference(layers, C, bpf, F)
    assert got.shape == (C, F) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)


def test_heatmap_known_answer():
    # query frame 0 (blocks 0-1) always picks blocks of bank frame 3; query frame 1 splits 3:1 between frames 0 and 2
    bpf = 4
    sel = torch.tensor([[12, 13, 14, 15], [15, 12, 13, 14], [0, 1, 2, 9], [3, 0, 8, 1]]).view(1, 1, 4, 4)
    valid = torch.ones_like(sel, dtype=torch.bool)
    valid[0, 0, 3, 2] = False  # drops a frame-2 pick: frame 1 then has 7 valid, 6 in frame 0
    got = retrieval_heatmap([{"selected": sel, "selected_valid": valid}], 2, bpf, 5)
    np.testing.assert_allclose(got[0], [0, 0, 0, 1, 0])
    np.testing.assert_allclose(got[1], [6 / 7, 0, 1 / 7, 0, 0])


def test_heatmap_row_without_valid_selection_is_zero():
    sel = torch.tensor([[4, 5], [0, 0]]).view(1, 1, 2, 2)
    valid = torch.tensor([[True, True], [False, False]]).view(1, 1, 2, 2)
    got = retrieval_heatmap([{"selected": sel, "selected_valid": valid}], 2, 2, 3)
    np.testing.assert_allclose(got, [[0, 0, 1], [0, 0, 0]])


def test_heatmap_whole_chunk_group_broadcasts():
    g = torch.Generator().manual_seed(1)
    layer = _random_layer(g, 2, 3, 1, 6, 4 * 5)
    got = retrieval_heatmap([layer], 3, 4, 5)
    np.testing.assert_allclose(got, _loop_reference([layer], 3, 4, 5), atol=1e-12)
    np.testing.assert_allclose(got, np.broadcast_to(got[0], got.shape))
    # FoV-style: frames 1 and 4 selected whole -> half each
    blocks = torch.tensor([4, 5, 6, 7, 16, 17, 18, 19]).view(1, 1, 1, 8)
    fov = retrieval_heatmap([{"selected": blocks, "selected_valid": torch.ones_like(blocks, dtype=torch.bool)}], 2, 4, 5)
    np.testing.assert_allclose(fov, [[0, 0.5, 0, 0, 0.5]] * 2)


def test_heatmap_out_of_range_raises():
    sel = torch.tensor([[1, 23]]).view(1, 1, 1, 2)  # block 23 -> bank frame 5 with 4 blocks/frame
    with pytest.raises(ValueError, match=r"23.*bank_frames=5"):
        retrieval_heatmap([{"selected": sel, "selected_valid": torch.ones(1, 1, 1, 2, dtype=torch.bool)}], 2, 4, 5)
    # the same index as padding is fine
    ok = retrieval_heatmap([{"selected": sel, "selected_valid": torch.tensor([[True, False]]).view(1, 1, 1, 2)}], 2, 4, 5)
    np.testing.assert_allclose(ok, [[1, 0, 0, 0, 0]] * 2)


def test_heatmap_dense_only_is_zero():
    got = retrieval_heatmap([{"attn": 1.0}, {}], 3, 4, 7)
    assert got.shape == (3, 7) and not got.any()


def test_heatmap_image_shape_and_colours():
    mat = np.array([[0.0, 0.25], [0.5, 1.0], [0.0, 0.0]])
    img = heatmap_image(mat, cell=5)
    assert img.shape == (15, 10, 3) and img.dtype == np.uint8
    # every pixel of a cell is one colour
    assert (img[5:10, 5:10] == img[5, 5]).all()
    zero, peak, mid = img[0, 0].astype(int), img[5, 5].astype(int), img[5, 0].astype(int)
    assert peak.sum() > mid.sum() > zero.sum()
    np.testing.assert_array_equal(img[0, 0], [68, 1, 84])     # viridis low end
    np.testing.assert_array_equal(img[5, 5], [253, 231, 37])  # viridis high end
    # all zeros -> darkest colour everywhere; wide matrices shrink the cell
    assert (heatmap_image(np.zeros((2, 3))) == [68, 1, 84]).all()
    assert heatmap_image(np.ones((2, 300)), cell=8, max_width=1024).shape == (6, 900, 3)
    assert heatmap_image(np.ones((1, 2000)), max_width=1024).shape == (1, 2000, 3)


def test_to_rgb_frames_pixels_and_latents():
    px = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    out = to_rgb_frames(px)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 1, 0] in (127, 128) and out[0, 0, 2, 0] == 255 and out[0, 0, 3, 0] == 255
    lat = torch.zeros(2, 4, 2, 2)
    lat[0, 0, 0, 0], lat[1, 2, 1, 1], lat[1, 3] = -2.0, 2.0, 100.0  # channel 3 is dropped, must not affect range
    rgb = to_rgb_frames(lat)
    assert rgb.shape == (2, 2, 2, 3)
    assert rgb[0, 0, 0, 0] == 0 and rgb[1, 1, 1, 2] == 255 and rgb[0, 1, 1, 1] in (127, 128)
    one = to_rgb_frames(torch.arange(4.0).view(1, 1, 2, 2))
    assert (one[..., 0] == one[..., 1]).all() and one[0, 1, 1, 0] == 255 and one[0, 0, 0, 0] == 0
    assert (to_rgb_frames(torch.full((3, 4, 2, 2), 7.0)) == 128).all()


def _flat_frames(T, h, w, seed):
    """Frames of a few flat colour rectangles, distinct per frame, so GIF quantisation is lossless."""
    rng = np.random.default_rng(seed)
    f = np.zeros((T, h, w, 3), dtype=np.uint8)
    for t in range(T):
        f[t, :, : w // 2] = rng.integers(0, 256, 3)
        f[t, :, w // 2:] = rng.integers(0, 256, 3)
        f[t, t % h] = [255, 0, 0]
    return f


def test_side_by_side_gif_layout():
    gt, gen = _flat_frames(3, 6, 5, 0), _flat_frames(3, 6, 5, 1)
    gif = side_by_side_gif(gt, gen, fps=5.0, scale=2, gap=2)
    with Image.open(io.BytesIO(gif)) as im:
        assert im.info.get("loop") == 0 and im.info.get("duration") == 200
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    assert len(frames) == 3
    for t, f in enumerate(frames):
        assert f.shape == (12, 24, 3)
        np.testing.assert_array_equal(f[:, :10], gt[t].repeat(2, 0).repeat(2, 1))
        assert (f[:, 10:14] == 255).all()
        np.testing.assert_array_equal(f[:, 14:], gen[t].repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match=r"\(3, 6, 5, 3\).*\(2, 6, 5, 3\)"):
        side_by_side_gif(gt, gen[:2])


def test_gif_and_heatmap_roundtrip_through_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    T, h, w = 4, 4, 6
    gt, gen = _flat_frames(T, h, w, 2), _flat_frames(T, h, w, 3)
    gif = side_by_side_gif(gt, gen, scale=3, gap=1)
    mat = np.array([[0.2, 0.8], [1.0, 0.0]])
    writer = SummaryWriter(str(tmp_path))
    add_gif(writer, "gen/rollout", gif, step=7)
    add_heatmap(writer, "retrieval/heatmap", mat, step=7)
    writer.flush()
    writer.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert {"gen/rollout", "retrieval/heatmap"} <= set(acc.Tags()["images"])
    ev = acc.Images("gen/rollout")[0]
    assert ev.step == 7 and (ev.height, ev.width) == (h * 3, (2 * w + 1) * 3)
    with Image.open(io.BytesIO(ev.encoded_image_string)) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    assert len(frames) == T
    for t, f in enumerate(frames):
        assert f.shape == (h * 3, (2 * w + 1) * 3, 3)
        np.testing.assert_array_equal(f[:, : w * 3], gt[t].repeat(3, 0).repeat(3, 1))
    hm = acc.Images("retrieval/heatmap")[0]
    with Image.open(io.BytesIO(hm.encoded_image_string)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), heatmap_image(mat))
