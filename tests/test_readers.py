"""Tests for data_pipeline.readers: each source written in its own layout, conventions checked by geometry.

Geometry is checked against the source's own meaning (an OpenGL camera looks along -z, Minecraft yaw 90
looks west, a Memory Maze heading is right-handed seen from above, ...), never by re-running the
reader's conversion formulas.
"""
import glob
import json
import math
import os
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from decmem.data_pipeline.clip import load_clip, save_clip
from decmem.data_pipeline.readers import READERS, memory_maze, nerfstudio, re10k, worldmem

RE10K_DIR = "/work/shared/data/re10k_poses"
RE10K_FILES = sorted(glob.glob(os.path.join(RE10K_DIR, "*.txt")))
TB_US = Fraction(1, 1_000_000)


# ----------------------------------------------------------------------------- helpers

def level(i: int) -> int:
    """Grey level identifying frame ``i`` of a synthetic video (survives H.264 on flat frames)."""
    assert 0 <= i < 17
    return 10 + 15 * i


def write_video(path, times_us=None, n=None, size=(36, 64), fps=10, two_digit=False):
    """Flat-grey H.264 video: frame i has grey level(i); pts = times_us (µs) if given, else n frames at fps.

    ``two_digit``: frame i has level(i // 16) in its left half and level(i % 16) in its right half.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    times = list(times_us) if times_us is not None else [round(i * 1e6 / fps) for i in range(n)]
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        s.time_base = s.codec_context.time_base = TB_US
        for i, t in enumerate(times):
            img = np.full((*size, 3), level(i % 16 if two_digit else i), np.uint8)
            if two_digit:
                img[:, : size[1] // 2] = level(i // 16)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(t), TB_US
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_ids(frames) -> list:
    """Recover the synthetic frame indices from their grey levels."""
    return [int(round((float(f.mean()) - 10) / 15)) for f in frames]


def two_digit_ids(frames) -> list:
    w = frames.shape[2]
    return [16 * frame_ids(f[None, :, 4: w // 2 - 4])[0] + frame_ids(f[None, :, w // 2 + 4: -4])[0] for f in frames]


def roundtrip(clip, tmp_path):
    """The clip, extra keys included, must survive save_clip / load_clip (no pickle)."""
    path = str(tmp_path / f"rt_{clip['source']}.npz")
    save_clip(path, clip)
    back = load_clip(path)
    assert set(back) == set(clip) and np.array_equal(back["c2w"], clip["c2w"])


def project(K, c2w, X):
    """OpenCV projection of world point X [3] -> (u, v, z_cam)."""
    x = np.linalg.inv(c2w.astype(np.float64)) @ np.append(X, 1.0)
    return K[0, 0] * x[0] / x[2] + K[0, 2], K[1, 1] * x[1] / x[2] + K[1, 2], x[2]


def check_rotations(c2w, tol=1e-3):
    R = c2w[:, :3, :3].astype(np.float64)
    assert np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max() < tol
    assert np.allclose(np.linalg.det(R), 1.0, atol=tol)


def test_registry():
    assert set(READERS) == {"re10k", "nerfstudio", "worldmem", "memory_maze"}
    for mod in READERS.values():
        assert callable(mod.find_inputs) and callable(mod.read) and mod.__doc__
    assert READERS["re10k"] is re10k


# ----------------------------------------------------------------------------- RealEstate10K

def pose_times(txt):
    with open(txt) as f:
        return [int(line.split()[0]) for line in f.read().splitlines()[1:] if line.strip()]


@pytest.fixture(scope="module")
def re10k_root(tmp_path_factory):
    """All real camera files in root/, each with a 64x36 video in root/videos/ whose frames sit at the pose times."""
    root = tmp_path_factory.mktemp("re10k")
    for txt in RE10K_FILES:
        shutil.copy(txt, root)
        write_video(str(root / "videos" / os.path.basename(txt).replace(".txt", ".mp4")), pose_times(txt))
    return root


def test_re10k_real_files(re10k_root):
    assert len(RE10K_FILES) == 10
    descs = re10k.find_inputs(str(re10k_root))
    assert [d["id"] for d in descs] == [os.path.basename(f)[:-4] for f in RE10K_FILES]   # README.md not listed
    for desc, txt in zip(descs, RE10K_FILES):
        clip = re10k.read(desc)
        ts = pose_times(txt)
        assert clip["frames"].shape == (len(ts), 36, 64, 3) and len(clip["missing"]) == 0
        assert frame_ids(clip["frames"]) == list(range(len(ts)))          # each pose got its own frame
        assert clip["frame_timestamps_us"].tolist() == ts
        assert clip["source"] == "re10k" and clip["video_id"] == desc["id"]
        check_rotations(clip["c2w"])
        K = clip["K"].astype(np.float64)
        # Square pixels: the normalised intrinsics give fx_px == fy_px at 640x360 (and at 64x36, same aspect).
        K640 = K * np.array([[10, 1, 10], [1, 10, 10], [1, 1, 1]])       # 64x36 -> 640x360 pixels
        assert np.allclose(K640[:, 0, 0], K640[:, 1, 1], rtol=1e-3)
        assert np.allclose(K[:, 0, 2], 32) and np.allclose(K[:, 1, 2], 18)  # cx = cy = 0.5 -> centre
        # The file's 3x4 maps world to camera: x_cam = R X + t must equal inv(c2w) X.
        with open(txt) as f:
            rows = np.array([[float(v) for v in line.split()] for line in f.read().splitlines()[1:] if line.strip()])
        X = np.array([0.3, -0.2, 1.7, 1.0])
        for P, c2w in zip(rows[:, 7:].reshape(-1, 3, 4), clip["c2w"].astype(np.float64)):
            assert np.allclose(P @ X, (np.linalg.inv(c2w) @ X)[:3], atol=1e-4)
        # Continuous trajectory: no jump between consecutive camera centres or orientations.
        C = clip["c2w"][:, :3, 3].astype(np.float64)
        steps = np.linalg.norm(np.diff(C, axis=0), axis=1)
        assert steps.max() < 0.35 * steps.sum(), (desc["id"], steps)
        R = clip["c2w"][:, :3, :3].astype(np.float64)
        cos = (np.einsum("tij,tij->t", R[1:], R[:-1]) - 1) / 2            # cos of relative rotation angle
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 20


def test_re10k_missing_and_jittered_frames(tmp_path):
    txt = RE10K_FILES[0]
    ts = pose_times(txt)
    shutil.copy(txt, tmp_path / "clip.txt")
    drop = {3, 7}
    kept = [t for i, t in enumerate(ts) if i not in drop]
    jitter = [t + (40_000 if i % 2 else -40_000) for i, t in enumerate(kept)]   # < half a ~267 ms period
    write_video(str(tmp_path / "clip.mp4"), jitter)                             # video next to the txt
    [desc] = re10k.find_inputs(str(tmp_path))
    assert desc["video"] == str(tmp_path / "clip.mp4")
    clip = re10k.read(desc)
    assert clip["missing"].tolist() == [ts[i] for i in sorted(drop)]
    assert clip["frame_timestamps_us"].tolist() == kept
    assert frame_ids(clip["frames"]) == list(range(len(kept)))
    assert clip["K"].shape == (len(kept), 3, 3) and clip["c2w"].shape == (len(kept), 4, 4)
    # A video from another part of the source: nothing matches -> error naming both files.
    write_video(str(tmp_path / "clip.mp4"), [t + 10_000_000 for t in ts])
    with pytest.raises(ValueError, match=r"clip\.mp4.*clip\.txt"):
        re10k.read(desc)


def test_re10k_dense_video(tmp_path):
    """A 29.97 fps video starting 3 s before the first pose: each pose takes its nearest frame."""
    ts = np.array(pose_times(RE10K_FILES[1]))
    t_frames = np.round(ts[0] - 3e6 + np.arange(256) * 1001000 / 30).astype(np.int64)   # [F] µs
    assert t_frames[-1] > ts[-1]
    shutil.copy(RE10K_FILES[1], tmp_path / "d.txt")
    write_video(str(tmp_path / "videos" / "d.mp4"), t_frames, fps=Fraction(30000, 1001), two_digit=True)
    clip = re10k.read(re10k.find_inputs(str(tmp_path))[0])
    assert len(clip["missing"]) == 0
    nearest = np.abs(t_frames[None] - ts[:, None]).argmin(1)                            # [P]
    assert two_digit_ids(clip["frames"]) == nearest.tolist()
    assert clip["video_fps"] == pytest.approx(30000 / 1001, rel=1e-3)
    assert clip["fps"] == pytest.approx(1e6 / np.median(np.diff(ts)))
    roundtrip(clip, tmp_path)


LINE = "9000 0.5 0.9 0.5 0.5 0 0 1 0 0 0.1 0 1 0 0.2 0 0 1 0.3"    # valid: identity rotation


@pytest.mark.parametrize("bad, what", [
    (LINE.rsplit(" ", 1)[0], "expected 19 numbers"),
    (LINE.replace("0.9", "nan"), "finite"),
    (LINE.replace("0.9", "inf"), "finite"),
    (LINE.replace("0.9", "abc"), "'abc'"),
    (LINE.replace(" 1 0 0 0.1", " 1.2 0 0 0.1"), "not orthonormal"),
    (LINE.replace(" 1 0 0 0.1", " -1 0 0 0.1"), "det"),
    (LINE.replace(" 0.5 0.9", " -0.5 0.9"), "positive focal"),
    (LINE.replace("9000", "500"), "strictly increasing"),
])
def test_re10k_malformed_line(tmp_path, bad, what):
    good = [LINE.replace("9000", str(1000 * k)) for k in (1, 2, 3)]       # lines 2-4; the bad one is line 5
    path = tmp_path / "bad.txt"
    path.write_text("https://www.youtube.com/watch?v=x\n" + "\n".join(good + [bad]) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.txt line 5: .*{what}"):
        re10k.read({"id": "bad", "poses": str(path), "video": None})


def test_re10k_empty_and_missing(tmp_path):
    (tmp_path / "empty.txt").write_text("https://www.youtube.com/watch?v=x\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: no pose lines"):
        re10k.read({"id": "empty", "poses": str(tmp_path / "empty.txt"), "video": None})
    shutil.copy(RE10K_FILES[0], tmp_path / "novideo.txt")
    with pytest.raises(FileNotFoundError, match=r"novideo\.txt: no video"):
        re10k.read({"id": "novideo", "poses": str(tmp_path / "novideo.txt"), "video": None})


def test_re10k_find_inputs_tree(tmp_path):
    for rel in ("train/b.c.txt", "train/a.txt", "test/z.txt"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(RE10K_FILES[0], tmp_path / rel)
    (tmp_path / "train" / "notes.txt").write_text("some notes about the data\n")   # not a camera file
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.webm").write_bytes(b"")
    (tmp_path / "test" / "z.mkv").write_bytes(b"")
    descs = re10k.find_inputs(str(tmp_path))
    assert descs == re10k.find_inputs(str(tmp_path))
    json.dumps(descs)
    assert [d["id"] for d in descs] == ["test__z", "train__a", "train__b_c"]
    assert [d["video"] for d in descs] == [str(tmp_path / "test" / "z.mkv"), str(tmp_path / "videos" / "a.webm"), None]
    assert all("." not in d["id"] for d in descs)


# ----------------------------------------------------------------------------- nerfstudio / DL3DV

FULL_W, FULL_H, DOWN = 642, 481, 4              # not divisible by 4: sx != sy, as in real downscales
SX, SY = (FULL_W // DOWN) / FULL_W, (FULL_H // DOWN) / FULL_H       # actual / full-resolution size
INTR = dict(fl_x=500.0, fl_y=520.0, cx=330.0, cy=235.0, w=FULL_W, h=FULL_H)
TARGET = np.array([0.3, -0.2, 0.5])          # the point every camera looks at (nerfstudio world, z up)


def look_at_gl(eye, target, up=(0.0, 0.0, 1.0)):
    """Blender/OpenGL camera-to-world: the camera looks along its -z, y is up, x right."""
    back = eye - target
    back /= np.linalg.norm(back)
    x = np.cross(up, back)
    x /= np.linalg.norm(x)
    M = np.eye(4)
    M[:3, :3] = np.stack([x, np.cross(back, x), back], 1)
    M[:3, 3] = eye
    return M


def gl_backproject(M, intr, u, v, depth):
    """World point seen at full-res pixel (u, v) at ``depth`` metres, in the OpenGL camera convention."""
    d = np.array([(u - intr["cx"]) / intr["fl_x"], -(v - intr["cy"]) / intr["fl_y"], -1.0])  # y up, -z ahead
    return M[:3, 3] + depth * (M[:3, :3] @ d)


def make_scene(scene, names, eyes, per_frame=None):
    """transforms.json (frames in the given order) + images at 1/4 resolution in images_4/ only."""
    os.makedirs(os.path.join(scene, "images_4"), exist_ok=True)
    frames = []
    for k, (name, eye) in enumerate(zip(names, eyes)):
        img = np.full((FULL_H // DOWN, FULL_W // DOWN, 3), level(k), np.uint8)
        Image.fromarray(img).save(os.path.join(scene, "images_4", name))
        fr = {"file_path": f"images/{name}", "transform_matrix": look_at_gl(np.array(eye), TARGET).tolist()}
        fr.update((per_frame or {}).get(k, {}))
        frames.append(fr)
    with open(os.path.join(scene, "transforms.json"), "w") as f:
        json.dump(dict(INTR, camera_model="OPENCV", k1=0.01, k2=0.0, p1=0.0, p2=0.0, frames=frames), f)


def test_nerfstudio_geometry(tmp_path):
    scene = str(tmp_path / "scene")
    names = ["frame_10.png", "frame_2.png", "frame_1.png"]           # json order != file-name order
    eyes = [(2.0, 0.0, 1.0), (0.0, 2.5, 0.5), (-1.5, -1.5, 2.0)]
    per = {1: dict(fl_x=450.0, cx=300.0)}                              # per-frame override for frame_2
    make_scene(scene, names, eyes, per)
    [desc] = nerfstudio.find_inputs(str(tmp_path))
    assert desc["images"] == "images_4" and desc["id"] == "scene"
    clip = nerfstudio.read(desc)
    assert clip["frames"].shape == (3, FULL_H // DOWN, FULL_W // DOWN, 3)
    order = [2, 1, 0]                                                  # frame_1, frame_2, frame_10
    assert frame_ids(clip["frames"]) == order
    check_rotations(clip["c2w"])
    for t, k in enumerate(order):
        intr = dict(INTR, **per.get(k, {}))
        M = look_at_gl(np.array(eyes[k]), TARGET)
        K, c2w = clip["K"][t].astype(np.float64), clip["c2w"][t]
        assert np.allclose(c2w[:3, 3], eyes[k], atol=1e-5)           # centres unchanged
        u, v, z = project(K, c2w, TARGET)                              # looked-at point: ahead, at the centre
        assert z > 0 and abs(u - intr["cx"] * SX) < 1e-3 and abs(v - intr["cy"] * SY) < 1e-3
        for (pu, pv) in [(100.0, 50.0), (600.0, 400.0), (20.0, 460.0)]:  # full-res pixels, OpenGL back-projection
            u, v, z = project(K, c2w, gl_backproject(M, intr, pu, pv, depth=3.0))
            assert z > 0 and abs(u - pu * SX) < 1e-3 and abs(v - pv * SY) < 1e-3
    assert np.allclose(clip["distortion"][:, 0], 0.01)
    roundtrip(clip, tmp_path)


def test_nerfstudio_errors(tmp_path):
    scene = str(tmp_path / "s")
    make_scene(scene, ["a.png", "b.png"], [(2.0, 0.0, 1.0), (0.0, 2.0, 1.0)])
    js = os.path.join(scene, "transforms.json")
    meta = json.load(open(js))
    desc = {"id": "s", "transforms": js, "images": None}                 # images/ does not exist
    with pytest.raises(FileNotFoundError, match=r"images/a\.png"):
        nerfstudio.read(desc)
    desc["images"] = "images_4"
    bad = json.loads(json.dumps(meta))
    bad["frames"][1]["transform_matrix"][0][0] = 3.0
    json.dump(bad, open(js, "w"))
    with pytest.raises(ValueError, match=r"transforms\.json: frames\[1\]: key 'transform_matrix'.*orthonormal"):
        nerfstudio.read(desc)
    bad = dict(meta)
    del bad["fl_y"]
    json.dump(bad, open(js, "w"))
    with pytest.raises(ValueError, match=r"frames\[0\]: key 'fl_y' is missing"):
        nerfstudio.read(desc)
    open(js, "w").write("{not json")
    with pytest.raises(ValueError, match=r"transforms\.json: cannot parse JSON"):
        nerfstudio.read(desc)


# ----------------------------------------------------------------------------- WorldMem Minecraft

W_SIZE = (36, 64)
#                x     y     z   pitch  yaw
MC_POSES = np.array([[10.5, 64.0, -5.5, 0.0, 0.0],
                     [10.5, 64.0, -5.5, 0.0, 90.0],
                     [11.0, 65.0, -4.0, 0.0, 180.0],
                     [12.0, 65.0, -3.0, 0.0, -90.0],
                     [12.0, 65.0, -3.0, 30.0, 0.0],
                     [12.0, 66.0, -2.0, -45.0, 270.0]])


def write_episode(folder, name, poses=MC_POSES, n_frames=None, drop_key=None):
    os.makedirs(folder, exist_ok=True)
    T = len(poses)
    arrays = {"actions": np.random.default_rng(0).integers(0, 3, (T, 8)), "poses": poses}
    arrays.pop(drop_key, None)
    np.savez(os.path.join(folder, name + ".npz"), **arrays)
    write_video(os.path.join(folder, name + ".mp4"), n=n_frames or T, size=W_SIZE)


def test_worldmem_geometry(tmp_path):
    write_episode(str(tmp_path), "ep1")
    [desc] = worldmem.find_inputs(str(tmp_path))
    clip = worldmem.read(desc)
    H, W = W_SIZE
    assert clip["frames"].shape == (6, H, W, 3) and frame_ids(clip["frames"]) == list(range(6))
    assert clip["actions"].shape == (6, 8) and clip["actions"].dtype == np.float32
    assert np.allclose(clip["K"][:, 0, 0], 0.35 * W) and np.allclose(clip["K"][:, 1, 1], 0.35 * H)
    assert np.allclose(clip["K"][:, 0, 2], W / 2) and np.allclose(clip["K"][:, 1, 2], H / 2)
    assert clip["fps"] == pytest.approx(10)
    check_rotations(clip["c2w"])
    c2w = clip["c2w"].astype(np.float64)
    assert np.allclose(c2w[:, :3, 3], MC_POSES[:, :3], atol=1e-5)      # blocks = metres, no eye height
    fwd = c2w[:, :3, 2]
    s30 = math.sin(math.radians(30))
    r2 = math.sqrt(0.5)
    expect = [(0, 0, 1), (-1, 0, 0), (0, 0, -1), (1, 0, 0),            # yaw 0/90/180/-90: south, west, north, east
              (0, -s30, math.cos(math.radians(30))),                   # pitch 30: looking down (y-up world)
              (r2, r2, 0)]                                             # yaw 270 == -90 (east), pitch -45: up
    assert np.allclose(fwd, expect, atol=1e-5)
    K = clip["K"][0].astype(np.float64)
    C = MC_POSES[0, :3]
    # Facing south (+z): east (+x) is on the player's left, the sky (+y) above the image centre.
    u, v, z = project(K, c2w[0], C + [1.0, 0.0, 5.0])
    assert z > 0 and u < W / 2 and abs(v - H / 2) < 1e-3
    u, v, z = project(K, c2w[0], C + [0.0, 1.0, 5.0])
    assert z > 0 and v < H / 2 and abs(u - W / 2) < 1e-3
    # Facing west (-x): north (-z) is on the right.
    u, v, z = project(K, c2w[1], C + [-5.0, 0.0, -1.0])
    assert z > 0 and u > W / 2
    # Looking 30 deg down: a point straight ahead at eye level appears above the centre.
    u, v, z = project(K, c2w[4], MC_POSES[4, :3] + [0.0, 0.0, 5.0])
    assert z > 0 and v < H / 2
    roundtrip(clip, tmp_path)


def test_worldmem_errors(tmp_path):
    write_episode(str(tmp_path / "a"), "nokey", drop_key="poses")
    with pytest.raises(ValueError, match=r"nokey\.npz: key 'poses' is missing"):
        worldmem.read(worldmem.find_inputs(str(tmp_path / "a"))[0])
    write_episode(str(tmp_path / "b"), "short", n_frames=4)
    with pytest.raises(ValueError, match=r"short\.npz: 6 poses.*short\.mp4 decodes to 4 frames"):
        worldmem.read(worldmem.find_inputs(str(tmp_path / "b"))[0])
    write_episode(str(tmp_path / "c"), "trunc")
    mp4 = tmp_path / "c" / "trunc.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"trunc\.mp4"):
        worldmem.read(worldmem.find_inputs(str(tmp_path / "c"))[0])
    for empty in (b"", None):                                            # empty file; mp4 with zero frames
        if empty is None:
            with av.open(str(mp4), "w") as c:
                s = c.add_stream("libx264", rate=10)
                s.width, s.height, s.pix_fmt = 64, 36, "yuv420p"
        else:
            mp4.write_bytes(empty)
        with pytest.raises(ValueError, match=r"trunc\.mp4"):
            worldmem.read(worldmem.find_inputs(str(tmp_path / "c"))[0])
    mp4.unlink()
    with pytest.raises(FileNotFoundError, match=r"trunc\.npz.*\.mp4"):
        worldmem.read(worldmem.find_inputs(str(tmp_path / "c"))[0])


def test_worldmem_find_inputs(tmp_path):
    for folder, name in (("x", "ep.2"), ("x", "ep1"), ("", "ep0")):
        write_episode(str(tmp_path / folder), name, poses=MC_POSES[:2])
    descs = worldmem.find_inputs(str(tmp_path))
    assert descs == worldmem.find_inputs(str(tmp_path))
    json.dumps(descs)
    assert [d["id"] for d in descs] == ["ep0", "x__ep1", "x__ep_2"]
    assert all(d["video"].endswith(".mp4") and d["npz"].endswith(".npz") for d in descs)
    write_episode(str(tmp_path / "x"), "ep_2", poses=MC_POSES[:2])          # same id as x/ep.2
    with pytest.raises(ValueError, match=r"ep.2\.npz and .*ep_2\.npz both map to id 'x__ep_2'"):
        worldmem.find_inputs(str(tmp_path))


# ----------------------------------------------------------------------------- Memory Maze

def write_maze(path, pos, heading, action=None, drop=None):
    T = len(pos)
    arrays = {"image": np.stack([np.full((64, 64, 3), level(i), np.uint8) for i in range(T)]),
              "action": np.arange(T) % 6 if action is None else action,
              "agent_pos": np.asarray(pos, float), "agent_dir": np.asarray(heading, float),
              "reward": np.zeros(T, np.float32), "maze_layout": np.ones((9, 9), np.uint8)}
    arrays.pop(drop, None)
    np.savez(path, **arrays)


def test_memory_maze_geometry(tmp_path):
    s = math.sqrt(0.5)
    pos = [(1.5, 2.5), (3.0, 4.0), (7.2, 0.4), (5.5, 5.5)]
    heading = [(1, 0), (0, 1), (-1, 0), (s, s)]
    write_maze(tmp_path / "ep.npz", pos, heading)
    [desc] = memory_maze.find_inputs(str(tmp_path))
    clip = memory_maze.read(desc)
    assert clip["frames"].shape == (4, 64, 64, 3) and clip["fps"] == 4
    assert np.array_equal(clip["actions"], np.eye(6, dtype=np.float32)[np.arange(4)])
    check_rotations(clip["c2w"])
    c2w = clip["c2w"].astype(np.float64)
    pos, heading = np.array(pos), np.array(heading)
    assert np.allclose(c2w[:, :3, 3], np.stack([2 * pos[:, 0], np.full(4, -0.9), 2 * pos[:, 1]], 1), atol=1e-5)
    fwd = c2w[:, :3, 2]
    assert np.allclose(fwd[:, 1], math.sin(math.radians(5.7)), atol=1e-5)     # pitched down in a y-down world
    horiz = fwd[:, [0, 2]] / np.linalg.norm(fwd[:, [0, 2]], axis=1, keepdims=True)
    assert np.allclose(horiz, heading, atol=1e-5)
    K = clip["K"][0].astype(np.float64)
    # Vertical FOV 80 deg: rays through the top and bottom image edges (centre column) are 80 deg apart.
    top, bot = np.linalg.inv(K) @ [32, 0, 1], np.linalg.inv(K) @ [32, 64, 1]
    ang = math.degrees(math.acos(top @ bot / np.linalg.norm(top) / np.linalg.norm(bot)))
    assert ang == pytest.approx(80, abs=1e-3) and K[0, 0] == pytest.approx(K[1, 1])
    for t in range(4):
        C = c2w[t, :3, 3]
        h3 = np.array([heading[t, 0], 0, heading[t, 1]])
        # A point ahead at camera height: centre column, above the centre row (the camera looks down).
        u, v, z = project(K, c2w[t], C + 4 * h3)
        assert z > 0 and abs(u - 32) < 1e-3 and v < 32
        # A point on the floor ahead at the distance where a 5.7 deg ray hits it: the image centre.
        d = 0.9 / math.tan(math.radians(5.7))
        u, v, z = project(K, c2w[t], np.array([C[0], 0.0, C[2]]) + d * h3)
        assert abs(u - 32) < 1e-3 and abs(v - 32) < 1e-3
        # Left of the heading, counter-clockwise seen from above (grid x, y right-handed, z up): u < centre.
        left_grid = np.array([-heading[t, 1], heading[t, 0]])
        u, v, z = project(K, c2w[t], C + 4 * h3 + 2 * np.array([left_grid[0], 0, left_grid[1]]))
        assert z > 0 and u < 32
    roundtrip(clip, tmp_path)


def test_memory_maze_actions_and_errors(tmp_path):
    pos, heading = [(1.0, 1.0)] * 3, [(1.0, 0.0)] * 3
    onehot = np.eye(6, dtype=np.float32)[[0, 5, 2]]
    write_maze(tmp_path / "oh.npz", pos, heading, action=onehot)
    assert np.array_equal(memory_maze.read({"id": "oh", "npz": str(tmp_path / "oh.npz")})["actions"], onehot)
    write_maze(tmp_path / "nodir.npz", pos, heading, drop="agent_dir")
    with pytest.raises(ValueError, match=r"nodir\.npz: key 'agent_dir' is missing"):
        memory_maze.read({"id": "nodir", "npz": str(tmp_path / "nodir.npz")})
    write_maze(tmp_path / "rows.npz", pos[:2], heading[:2])
    data = dict(np.load(tmp_path / "rows.npz"))
    data["image"] = data["image"][:1].repeat(3, 0)
    np.savez(tmp_path / "rows.npz", **data)
    with pytest.raises(ValueError, match=r"rows\.npz: key 'agent_pos' has 2 rows but key 'image' has 3"):
        memory_maze.read({"id": "rows", "npz": str(tmp_path / "rows.npz")})
    write_maze(tmp_path / "act.npz", pos, heading, action=np.array([0, 7, 1]))
    with pytest.raises(ValueError, match=r"act\.npz: key 'action' expected integers in \[0, 6\)"):
        memory_maze.read({"id": "act", "npz": str(tmp_path / "act.npz")})
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read"):
        memory_maze.read({"id": "junk", "npz": str(tmp_path / "junk.npz")})
    with pytest.raises(FileNotFoundError, match=r"gone\.npz"):
        memory_maze.read({"id": "gone", "npz": str(tmp_path / "gone.npz")})


def test_memory_maze_find_inputs(tmp_path):
    for rel in ("train/b.npz", "train/a.npz", "eval/a.npz"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        write_maze(tmp_path / rel, [(1.0, 1.0)], [(0.0, 1.0)])
    descs = memory_maze.find_inputs(str(tmp_path))
    assert descs == memory_maze.find_inputs(str(tmp_path))
    json.dumps(descs)
    assert [d["id"] for d in descs] == ["eval__a", "train__a", "train__b"]
