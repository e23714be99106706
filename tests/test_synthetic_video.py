"""Tests for data_pipeline.video (PyAV IO), data_pipeline.synthetic (ray-cast room) and data_pipeline.clip (.npz)."""
import os
import time

import av
import numpy as np
import pytest

from decmem.data_pipeline.clip import load_clip, save_clip, validate_clip
from decmem.data_pipeline.synthetic import ROOM_HALF, intrinsics, render_frames, revisit_path, synthetic_clip, texture
from decmem.data_pipeline.video import frame_strip, read_mp4, side_by_side, write_mp4, write_png

R = ROOM_HALF


# ----------------------------------------------------------------------------- video IO

def test_mp4_round_trip_and_no_tmp(tmp_path):
    frames = synthetic_clip(24, (64, 64), seed=1)["frames"]
    path = str(tmp_path / "sub" / "clip.mp4")                  # parent dir is created
    write_mp4(path, frames, fps=10, crf=18)
    assert os.listdir(tmp_path / "sub") == ["clip.mp4"]        # no leftover .tmp.mp4
    back = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(np.int16) - frames).mean() < 6


def test_mp4_odd_size_is_edge_padded(tmp_path):
    frames = synthetic_clip(8, (33, 31), seed=2)["frames"]   # odd H and W
    path = str(tmp_path / "odd.mp4")
    write_mp4(path, frames)
    back = read_mp4(path)
    # Documented behaviour: read back at the padded (even) size; crop [:H, :W] to recover.
    assert back.shape == (8, 34, 32, 3)
    assert np.abs(back[:, :33, :31].astype(np.int16) - frames).mean() < 8
    # The padding replicates the last row / column.
    assert np.abs(back[:, 33, :31].astype(np.int16) - frames[:, 32]).mean() < 12
    assert np.abs(back[:, :33, 31].astype(np.int16) - frames[:, :, 30]).mean() < 12


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((0, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 4), np.uint8)])
def test_mp4_bad_input(tmp_path, bad):
    with pytest.raises(ValueError, match=r"uint8"):
        write_mp4(str(tmp_path / "bad.mp4"), bad)
    assert not os.listdir(tmp_path)


def test_read_mp4_errors_name_path(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="junk.mp4"):
        read_mp4(str(junk))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_mp4(str(tmp_path / "missing.mp4"))


def test_side_by_side_and_strip():
    a = np.zeros((5, 16, 10, 3), np.uint8)
    b = np.ones((5, 16, 12, 3), np.uint8)
    sbs = side_by_side([a, b], gap=2)
    assert sbs.shape == (5, 16, 24, 3)
    assert (sbs[:, :, 10:12] == 255).all() and (sbs[:, :, 12:] == 1).all()
    with pytest.raises(ValueError, match="length T and height H"):
        side_by_side([a, b[:4]])
    with pytest.raises(ValueError, match="length T and height H"):
        side_by_side([a, b[:, :8]])
    frames = synthetic_clip(10, (16, 20), seed=0)["frames"]
    strip = frame_strip(frames, [0, 4, -1], gap=3)
    assert strip.shape == (16, 3 * 20 + 2 * 3, 3)
    assert (strip[:, 46:] == frames[-1]).all()


@pytest.mark.parametrize("use_pillow", [True, False])
def test_write_png_decodes(tmp_path, use_pillow):
    img = frame_strip(synthetic_clip(6, (17, 23), seed=0)["frames"], [0, 3, 5])   # odd sizes are fine
    path = str(tmp_path / "strip.png")
    write_png(path, img, use_pillow=use_pillow)
    assert os.listdir(tmp_path) == ["strip.png"]
    with av.open(path) as c:
        back = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert back.shape == img.shape and (back == img).all()    # PNG is lossless


# ----------------------------------------------------------------------------- synthetic renderer

def _project(K, c2w, X):
    """Independent pinhole projection of world points X [N, 3] -> (u, v, z) in pixels (centre at +0.5)."""
    Xh = np.concatenate([X, np.ones((len(X), 1))], 1)
    xc = (np.linalg.inv(c2w.astype(np.float64)) @ Xh.T).T[:, :3]     # [N, 3] camera coords
    K = K.astype(np.float64)
    u = K[0, 0] * xc[:, 0] / xc[:, 2] + K[0, 2]
    v = K[1, 1] * xc[:, 1] / xc[:, 2] + K[1, 2]
    return u, v, xc[:, 2]


def test_render_matches_independent_projection():
    seed, (H, W) = 7, (48, 64)
    rng = np.random.default_rng(0)
    K, path = intrinsics((H, W)), revisit_path(9, seed)
    Ks, c2ws, pix, want = [], [], [], []
    for c2w in path:
        for wall in range(6):
            ax, sign = wall // 2, (1 if wall % 2 else -1)
            ab = rng.uniform(-R, R, (40, 2))
            X = np.insert(ab, ax, sign * R, axis=1)                   # [40, 3] points on the wall
            u, v, z = _project(K, c2w, X)
            ok = (z > 0.05) & (u > 1) & (u < W - 1) & (v > 1) & (v < H - 1)
            for i in np.flatnonzero(ok)[:3]:
                # Shift the principal point so X projects exactly onto a pixel centre.
                ui, vi = int(np.floor(u[i])), int(np.floor(v[i]))
                Ki = K.astype(np.float64).copy()
                Ki[0, 2] += ui + 0.5 - u[i]
                Ki[1, 2] += vi + 0.5 - v[i]
                Ks.append(Ki); c2ws.append(c2w); pix.append((vi, ui))
                want.append(texture(wall, ab[i], seed))
    assert len(want) >= 30
    frames = render_frames(np.stack(Ks), np.stack(c2ws), (H, W), seed)
    got = np.stack([frames[n, vi, ui] for n, (vi, ui) in enumerate(pix)])
    assert np.abs(got.astype(int) - np.stack(want)).max() <= 1


def test_opencv_axes_identity_and_yaw():
    seed, hw = 3, (32, 40)
    K = intrinsics(hw).astype(np.float64)
    v, u = np.meshgrid(np.arange(hw[0]) + 0.5, np.arange(hw[1]) + 0.5, indexing="ij")
    a, b = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]      # camera ray (a, b, 1)
    # Identity pose at the origin looks along +z, y down: the image is the z=+R wall at (R a, R b).
    img = render_frames(K, np.eye(4)[None], hw, seed)[0]
    assert (img == texture(5, np.stack([R * a, R * b], -1), seed)).all()
    assert not (img == texture(4, np.stack([R * a, R * b], -1), seed)).all()
    # Camera z -> world +x, camera x -> world -z, camera y -> world +y: sees the x=+R wall at (y, z) = (R b, -R a).
    c2w = np.eye(4)
    c2w[:3, :3] = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float)   # columns: cam x, y, z in world
    img = render_frames(K, c2w[None], hw, seed)[0]
    assert (img == texture(1, np.stack([R * b, -R * a], -1), seed)).all()    # wall 1 = x=+R


def test_revisit_path_exact_and_inside_room():
    for seed in range(5):
        c2w = revisit_path(65, seed)
        assert c2w.shape == (65, 4, 4) and c2w.dtype == np.float32
        assert (c2w[0] == c2w[-1]).all() and (c2w[0] == c2w[32]).all()     # start, middle, end
        assert np.abs(c2w[:, :3, 3]).max() <= R - 0.3
        rot = c2w[:, :3, :3].astype(np.float64)
        assert np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=1e-5)
        assert np.allclose(np.linalg.det(rot), 1, atol=1e-5)
        step = np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=-1)
        assert step.max() < 0.15                                            # smooth


def test_synthetic_clip_revisits_and_determinism():
    clip = synthetic_clip(33, (32, 32), seed=4)
    f = clip["frames"]
    assert f.shape == (33, 32, 32, 3) and f.dtype == np.uint8
    assert clip["K"].shape == (33, 3, 3) and clip["K"].dtype == np.float32
    assert clip["c2w"].shape == (33, 4, 4) and clip["c2w"].dtype == np.float32
    assert (clip["fps"], clip["source"], clip["video_id"]) == (10, "synthetic", "synthetic-00004")
    assert (f[0] == f[16]).all() and (f[0] == f[-1]).all()                  # exact revisits
    diff = np.abs(f[1:16].astype(int) - f[0]).mean(axis=(1, 2, 3))
    assert (diff[3:] > 10).all()                                            # it really leaves
    again = synthetic_clip(33, (32, 32), seed=4)
    assert all(np.array_equal(clip[k], again[k]) for k in ("frames", "K", "c2w"))
    assert not np.array_equal(synthetic_clip(33, (32, 32), seed=5)["frames"], f)
    validate_clip(clip)


def test_render_is_fast():
    synthetic_clip(4, (16, 16), seed=0)                                     # warm up
    t0 = time.perf_counter()
    synthetic_clip(100, (64, 64), seed=0)
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- clip .npz

def test_clip_npz_round_trip(tmp_path):
    clip = synthetic_clip(12, (16, 16), seed=2)
    clip["actions"] = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    path = str(tmp_path / "c" / "clip.npz")
    save_clip(path, clip)
    assert os.listdir(tmp_path / "c") == ["clip.npz"]
    back = load_clip(path)
    assert set(back) == set(clip)
    for k, v in clip.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
        else:
            assert back[k] == v and type(back[k]) is type(v), k


def _set(a, idx, value):
    a = a.copy()
    a[idx] = value
    return a


def _bad(clip, key, value):
    out = dict(clip)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("key,make,pattern", [
    ("K", lambda c: None, r"'K' is missing"),
    ("video_id", lambda c: None, r"'video_id' is missing"),
    ("frames", lambda c: c["frames"].astype(np.float32), r"'frames' expected uint8"),
    ("K", lambda c: c["K"][:, :, 0], r"'K' expected float \[T,3,3\] with T=6 \(frames\), got shape \(6, 3\)"),
    ("c2w", lambda c: c["c2w"][:5], r"'c2w' expected float \[T,4,4\] with T=6"),
    ("c2w", lambda c: _set(c["c2w"], (2, 0, 3), np.nan), r"'c2w' expected finite"),
    ("K", lambda c: np.full_like(c["K"], np.inf), r"'K' expected finite"),
    ("c2w", lambda c: _set(c["c2w"], (slice(None), 3, 0), 0.01), r"'c2w' expected last row"),
    ("actions", lambda c: np.zeros((5, 2), np.float32), r"'actions' expected float \[T,A\] with T=6"),
    ("source", lambda c: np.array([1, 2]), r"'source' expected str"),
])
def test_load_clip_validation_names_file_and_key(tmp_path, key, make, pattern):
    clip = synthetic_clip(6, (8, 8), seed=0)
    bad = _bad(clip, key, make(clip))
    path = tmp_path / "broken.npz"
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in bad.items()})   # bypass save_clip's check
    with pytest.raises(ValueError, match=r"broken\.npz: key " + pattern):
        load_clip(str(path))
    with pytest.raises(ValueError, match=pattern):
        save_clip(str(tmp_path / "never.npz"), bad)
    assert not (tmp_path / "never.npz").exists()


def test_load_clip_not_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_clip(str(path))
