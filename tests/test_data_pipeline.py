"""Preprocessing into shards (local and S3), manifest and resume, and the loader's split, resume and fault handling."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from decmem.data_pipeline import preprocess as pp
from decmem.data_pipeline.loader import DataArgs, ShardLoader, resolve_shards
from decmem.data_pipeline.preprocess import PreprocessArgs, preprocess
from decmem.data_pipeline.synthetic import render_frames, synthetic_clip
from decmem.data_pipeline.transforms import resize_clip

SPEC = "clips=6,frames=40,hw=24x32,seed=3"


def args(**kw):
    base = dict(format_name="synthetic", resolution=[16, 16], segment_frames=16, shard_bytes=30_000)
    base.update(kw)
    return PreprocessArgs(**base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    preprocess(SPEC, out, args(), progress=False, log=lambda *_: None)
    return out


def batches(data, n, **kw):
    kw.setdefault("clip_frames", 8)
    dp_rank, dp_size = kw.pop("dp_rank", 0), kw.pop("dp_size", 1)
    loader = ShardLoader(DataArgs(data=data, **kw), chunk_frames=2, dp_rank=dp_rank, dp_size=dp_size)
    out = [loader.next_batch() for _ in range(n)]
    loader.close()
    return out, loader


def same(a, b):
    return a["keys"] == b["keys"] and a["chunk_starts"] == b["chunk_starts"] and torch.equal(a["latents"], b["latents"]) \
        and torch.equal(a["c2w"], b["c2w"])


# ------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------

def test_manifest_shards_and_samples(dataset):
    m = json.load(open(os.path.join(dataset, "manifest.json")))
    assert m["samples"] == 6 * 3 and m["frames"] == 6 * 40 and len(m["shards"]) >= 3
    for s in m["shards"]:
        data = open(os.path.join(dataset, s["name"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert all(r["status"] == "done" and r["segments_done"] == [0, 1, 2] for r in m["inputs"].values())
    assert not [f for f in os.listdir(dataset) if f.endswith(".tmp")]
    import webdataset as wds
    keys = [s["__key__"] for s in wds.WebDataset(os.path.join(dataset, f"shard-{{000000..{len(m['shards']) - 1:06d}}}.tar"),
                                                  shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 18 and all("." not in k for k in keys)


def test_resize_keeps_cameras_exact():
    """Frames cropped + resized vs the scene re-rendered with the resulting K: they must agree."""
    clip = synthetic_clip(6, (48, 64), seed=1)
    small = resize_clip(clip, (24, 24))
    direct = render_frames(small["K"], small["c2w"], (24, 24), seed=1)
    err = np.abs(small["frames"].astype(float) - direct.astype(float)).mean()
    wrong = clip["K"].copy()
    wrong[:, :2] *= 24 / 48                                   # ignores the crop: must disagree clearly
    err_wrong = np.abs(small["frames"].astype(float) - render_frames(wrong, small["c2w"], (24, 24), 1).astype(float)).mean()
    assert err < 8 and err_wrong > 3 * err, (err, err_wrong)


def test_interrupted_run_resumes_without_duplicates(tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    real = pp.process_input
    calls = {"n": 0}

    def crash_on_fourth(task):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the user hits ^C (or the node dies) mid-run
        return real(task)

    monkeypatch.setattr(pp, "process_input", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        preprocess(SPEC, out, args(), progress=False, log=lambda *_: None)
    partial = json.load(open(os.path.join(out, "manifest.json")))
    assert 0 < len(partial["shards"]) and partial["samples"] < 18
    assert all(os.path.exists(os.path.join(out, s["name"])) for s in partial["shards"])
    monkeypatch.setattr(pp, "process_input", real)
    m = preprocess(SPEC, out, args(), progress=False, log=lambda *_: None)
    assert m["samples"] == 18 and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    got, _ = batches(out, 18, batch_size=1, prefetch=0, clip_frames=8, interleave=1)
    keys = sorted(b["keys"][0] for b in got)
    assert keys == sorted(f"synthetic-{s:05d}-{g:05d}" for s in range(3, 9) for g in range(3))


def test_bad_inputs_are_skipped_and_recorded_or_fatal_when_strict(tmp_path, monkeypatch):
    from decmem.data_pipeline.sources import _Synthetic

    real = _Synthetic.read

    def read(desc):
        if desc["seed"] == 4:
            raise ValueError("clip-4.mp4: video has no frames")
        return real(desc)

    monkeypatch.setattr(_Synthetic, "read", staticmethod(read))
    m = preprocess(SPEC, str(tmp_path / "a"), args(), progress=False, log=lambda *_: None)
    assert m["samples"] == 15 and [s["id"] for s in m["skipped"]] == ["synthetic-00004"]
    assert "video has no frames" in m["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="input synthetic-00004: clip-4.mp4: video has no frames"):
        preprocess(SPEC, str(tmp_path / "b"), args(strict=True), progress=False, log=lambda *_: None)


def test_changed_settings_on_an_existing_output_are_refused(dataset):
    with pytest.raises(ValueError, match=r"different settings \(resolution: \[16, 16\] -> \[8, 8\]\)"):
        preprocess(SPEC, dataset, args(resolution=[8, 8]), progress=False, log=lambda *_: None)


# ------------------------------------------------------------------------------------
# Loader: split, resume, faults
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,cp", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)])
def test_split_by_data_parallel_rank(dataset, world, cp):
    dp = world // cp
    per_rank = {}
    for rank in range(world):
        loader = ShardLoader(DataArgs(data=dataset, clip_frames=8, prefetch=0), 2, dp_rank=rank // cp, dp_size=dp)
        per_rank[rank] = (loader.rank_shards(0), [loader.next_batch() for _ in range(3)])
        loader.close()
    for rank in range(world):
        shards, got = per_rank[rank]
        leader_shards, leader = per_rank[(rank // cp) * cp]
        assert shards == leader_shards and all(same(a, b) for a, b in zip(got, leader))   # one cp group: identical
    groups = [set(per_rank[g * cp][0]) for g in range(dp)]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(ShardLoader(
        DataArgs(data=dataset, clip_frames=8), 2).urls)                                      # disjoint, complete


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_resume_gives_the_next_batches_exactly(dataset, dp_size):
    kw = dict(batch_size=2, target_chunks=2, clip_frames=8, prefetch=3)
    for dp_rank in range(dp_size):
        full, _ = batches(dataset, 7, dp_rank=dp_rank, dp_size=dp_size, **kw)
        for n in (2, 5):
            loader = ShardLoader(DataArgs(data=dataset, **kw), 2, dp_rank=dp_rank, dp_size=dp_size)
            for _ in range(n):
                loader.next_batch()
            state = json.loads(json.dumps(loader.state_dict()))      # it goes through a checkpoint file
            loader.close()
            resumed = ShardLoader(DataArgs(data=dataset, **kw), 2, dp_rank=dp_rank, dp_size=dp_size)
            resumed.load_state_dict(state)
            rest = [resumed.next_batch() for _ in range(7 - n)]
            resumed.close()
            assert all(same(a, b) for a, b in zip(rest, full[n:])), (dp_size, dp_rank, n)
    with pytest.raises(ValueError, match="dp_size=1, this loader has dp_size=2"):
        ShardLoader(DataArgs(data=dataset, clip_frames=8), 2, 0, 2).load_state_dict(
            ShardLoader(DataArgs(data=dataset, clip_frames=8), 2, 0, 1).state_dict())


def test_sample_geometry(dataset):
    (b,), _ = batches(dataset, 1, clip_frames=8, target_chunks=3, min_context=2)
    assert b["latents"].shape == (1, 8, 3, 16, 16) and b["latents"].min() >= -1 and b["latents"].max() <= 1
    assert torch.allclose(b["c2w"][0, 0], torch.eye(4), atol=1e-6)                 # relative to the first frame
    assert b["c2w"][0, :, :3, 3].norm(dim=-1).max() == pytest.approx(1.0, abs=1e-5)  # scale-normalised
    assert len(b["chunk_starts"]) == 3 and min(b["chunk_starts"]) >= 2 and max(b["chunk_starts"]) <= 6


def test_every_chunk_teacher_forcing_tiles_the_clip(dataset):
    """data.target_chunks=0: consecutive chunks from min_context to the clip's end, at a phase that varies."""
    got, _ = batches(dataset, 12, clip_frames=8, target_chunks=0, min_context=1)
    phases = set()
    for b in got:
        s = b["chunk_starts"]
        assert s == list(range(s[0], 7, 2)) and 1 <= s[0] <= 2, s   # chunks of 2 frames, last start <= 8 - 2
        assert 8 - (s[-1] + 2) < 2                                  # no room left for another whole chunk
        phases.add(s[0])
    assert phases == {1, 2}


def test_dp_ranks_draw_the_same_chunk_tiling(dataset):
    """Under ZeRO-3 every rank must run the same module calls: one forward per target chunk, so the dp ranks' batches
    of a step hold the same chunk starts (with every chunk a target, different tiling phases gave 4 chunks on one
    rank and 3 on the other; a dp=2 run at size S then timed out in a collective)."""
    for kw in (dict(target_chunks=0, min_context=1), dict(target_chunks=2, min_context=2)):
        r0, _ = batches(dataset, 8, dp_rank=0, dp_size=2, **kw)
        r1, _ = batches(dataset, 8, dp_rank=1, dp_size=2, **kw)
        assert [b["keys"] for b in r0] != [b["keys"] for b in r1]                 # different samples ...
        assert [b["chunk_starts"] for b in r0] == [b["chunk_starts"] for b in r1], kw   # ... the same chunks
    assert len({tuple(b["chunk_starts"]) for b in r0}) > 1                        # still drawn per step


def test_several_datasets_joined_with_double_colon(dataset, tmp_path):
    """data.data=A::B (webdataset's separator) trains on both datasets: every shard of each, one epoch covers all."""
    other = str(tmp_path / "other")
    preprocess("clips=2,frames=40,hw=24x32,seed=50", other, args(), progress=False, log=lambda *_: None)
    a, b = resolve_shards(dataset), resolve_shards(other)
    assert resolve_shards(f"{dataset}::{other}") == a + b
    assert resolve_shards(f"{dataset}::{os.path.join(other, 'manifest.json')}") == a + b
    loader = ShardLoader(DataArgs(data=f"{dataset}::{other}", clip_frames=8, prefetch=0, interleave=2), 2)
    keys = [loader.next_batch()["keys"][0] for _ in range(24)]           # one epoch: 18 + 6 samples
    loader.close()
    assert len(set(keys)) == 24                                          # no sample twice within the epoch
    assert sum(k.startswith(("synthetic-00050", "synthetic-00051")) for k in keys) == 6
    with pytest.raises(ValueError, match="data: empty source between '::'"):
        resolve_shards(f"{dataset}::")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_shards(f"{dataset}::{tmp_path}/nowhere")


def test_corrupt_shard_in_the_middle_is_skipped_and_counted(dataset, tmp_path):
    m = json.load(open(os.path.join(dataset, "manifest.json")))
    names = [s["name"] for s in m["shards"]]
    for n in names:
        data = open(os.path.join(dataset, n), "rb").read()
        if n == names[1]:
            data = data[: len(data) // 2] + b"\x00garbage" * 64                   # truncated mid-member
        open(tmp_path / n, "wb").write(data)
    pattern = str(tmp_path / f"shard-{{000000..{len(names) - 1:06d}}}.tar")
    loader = ShardLoader(DataArgs(data=pattern, clip_frames=8, prefetch=0, interleave=1), 2)
    keys = [loader.next_batch()["keys"][0] for _ in range(20)]                    # > one epoch
    assert loader.stats["corrupt_shards"] >= 1 and loader.stats["corrupt_urls"][0].endswith(names[1])
    assert len(set(keys)) >= 13                                                     # training input continued
    with pytest.raises(FileNotFoundError, match="neither a manifest"):
        ShardLoader(DataArgs(data=str(tmp_path / "nothing-here")), 2)


# ------------------------------------------------------------------------------------
# S3 on a real S3-compatible server on loopback
# ------------------------------------------------------------------------------------

def test_s3_round_trip_matches_local(s3_server, dataset, tmp_path):
    url = f"s3://{s3_server}/datasets/synthetic"
    m = preprocess(SPEC, url, args(), progress=False, log=lambda *_: None)
    assert m["samples"] == 18
    import s3fs
    fs = s3fs.S3FileSystem()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url)) == sorted(["manifest.json"] + [s["name"] for s in m["shards"]])
    remote, _ = batches(url, 6, batch_size=2, clip_frames=8)
    local, _ = batches(dataset, 6, batch_size=2, clip_frames=8)
    assert all(same(a, b) for a, b in zip(remote, local))
    # preprocessing is deterministic: the S3 shards are byte-identical to the local ones
    local_m = json.load(open(os.path.join(dataset, "manifest.json")))
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local_m["shards"]]
    # resuming preprocessing on S3 finds its manifest and does nothing more
    again = preprocess(SPEC, url, args(), progress=False, log=lambda *_: None)
    assert again["samples"] == 18 and len(again["shards"]) == len(m["shards"])


def test_bad_source_files_are_skipped_with_reasons_and_training_input_continues(tmp_path):
    """WorldMem episodes: one good, one truncated video, one zero-frame video, one pose/frame count mismatch."""
    from decmem.data_pipeline.video import write_mp4

    root = tmp_path / "episodes"
    root.mkdir()
    frames = synthetic_clip(24, (32, 32), seed=5)["frames"]
    poses = np.zeros((24, 5), np.float32)
    poses[:, 4] = np.linspace(0, 90, 24)
    for name, n_video, n_poses in (("good", 24, 24), ("truncated", 24, 24), ("mismatch", 24, 20)):
        write_mp4(str(root / f"{name}.mp4"), frames[:n_video])
        np.savez(root / f"{name}.npz", actions=np.zeros((n_poses, 8), np.float32), poses=poses[:n_poses])
    data = (root / "truncated.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "empty.mp4").write_bytes(b"")
    np.savez(root / "empty.npz", actions=np.zeros((0, 8), np.float32), poses=np.zeros((0, 5), np.float32))
    m = preprocess(str(root), str(tmp_path / "out"), args(format_name="worldmem", resolution=None, segment_frames=None),
                   progress=False, log=lambda *_: None)
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"truncated", "mismatch", "empty"} and m["samples"] == 1, reasons
    assert "mismatch.npz" in reasons["mismatch"] and "20" in reasons["mismatch"] and "24" in reasons["mismatch"]
    assert "empty.mp4" in reasons["empty"] and "truncated" in reasons["truncated"]
    loader = ShardLoader(DataArgs(data=str(tmp_path / "out"), clip_frames=8, prefetch=0), 2)
    assert loader.next_batch()["keys"] == ["good-00000"]
