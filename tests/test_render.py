"""MiniWorld renderer (data_pipeline/render.py): camera conventions checked against the pixels."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest

if importlib.util.find_spec("miniworld") is None:   # not importorskip: importing miniworld opens a GL context
    pytest.skip("miniworld not installed (pip install miniworld==2.1.0)", allow_module_level=True)


def _probe_egl():
    """Skip when no headless GL exists (importing pyglet.gl opens pyglet's hidden EGL context)."""
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyglet
    pyglet.options["headless"] = True
    try:
        import pyglet.gl  # noqa: F401
    except Exception as e:  # pyglet raises assorted types when EGL / Mesa libraries are missing
        pytest.skip(f"no headless EGL (apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri): {e!r}",
                    allow_module_level=True)


_probe_egl()

from decmem.data_pipeline import render  # noqa: E402
from decmem.data_pipeline.clip import load_clip, save_clip, validate_clip  # noqa: E402

NOMINAL = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "purple": (0.44, 0.15, 0.76)}


@pytest.fixture(scope="module")
def clip():
    return render.read(render.find_inputs("scenes=1,frames=256,hw=64x64,seed=1")[0])


def _project(clip, pos):
    """World point [3] -> camera points q [T, 3] and pixel coordinates uv [T, 2] (continuous)."""
    w2c = np.linalg.inv(clip["c2w"].astype(np.float64))
    q = np.einsum("tij,j->ti", w2c[:, :3, :3], pos) + w2c[:, :3, 3]
    uvw = np.einsum("tij,tj->ti", clip["K"].astype(np.float64), q)
    with np.errstate(divide="ignore", invalid="ignore"):
        return q, uvw[:, :2] / uvw[:, 2:]


def _visible_centres(clip, kinds=("box", "ball")):
    """(t, object index, q, u, v) where a coloured object's centre is in view and unoccluded around it."""
    T, H, W = clip["frames"].shape[:3]
    out = []
    for i, (name, pos, size) in enumerate(zip(clip["object_names"], clip["object_positions"], clip["object_sizes"])):
        colour, kind = name.split("_")
        if kind not in kinds or colour not in NOMINAL:
            continue
        q, uv = _project(clip, pos.astype(np.float64))
        inside = (q[:, 2] > 0.5) & (uv[:, 0] >= 2) & (uv[:, 0] < W - 2) & (uv[:, 1] >= 2) & (uv[:, 1] < H - 2)
        for t in np.nonzero(inside)[0]:
            u, v = int(uv[t, 0]), int(uv[t, 1])
            # Nothing in front within the 3x3 neighbourhood (so no partial occluder's edge either): the
            # centre ray enters a ball or cube at most size * sqrt(3) / 2 before the centre.
            near = q[t, 2] - 0.87 * size * q[t, 2] / np.linalg.norm(q[t]) - 0.03
            if (clip["depth"][t, v - 1:v + 2, u - 1:u + 2] > near).all():
                out.append((t, i, q[t], u, v))
    return out


def _cosine(px, colour):
    px, nom = np.asarray(px, np.float64), np.asarray(NOMINAL[colour], np.float64)
    return px @ nom / (np.linalg.norm(px) * np.linalg.norm(nom) + 1e-9)


def test_clip_is_canonical_and_saves(clip, tmp_path):
    validate_clip(clip, "render")
    T, H, W = 256, 64, 64
    assert clip["frames"].shape == (T, H, W, 3) and clip["frames"].dtype == np.uint8
    assert clip["K"].dtype == np.float32 and clip["c2w"].dtype == np.float32
    assert clip["depth"].shape == (T, H, W) and clip["depth"].dtype == np.float16
    assert clip["fps"] == 10 and clip["source"] == "render" and clip["video_id"] == "render-00001"
    n = len(clip["object_names"])
    assert n >= 8 and clip["object_positions"].shape == (n, 3) and clip["object_sizes"].shape == (n,)
    assert len(set(clip["object_names"].tolist())) == n                       # every object distinct
    save_clip(tmp_path / "c.npz", clip)                                          # no pickle needed
    back = load_clip(tmp_path / "c.npz")
    assert back["object_names"].tolist() == clip["object_names"].tolist()
    np.testing.assert_array_equal(back["frames"], clip["frames"])


def test_conventions(clip):
    K = clip["K"][0].astype(np.float64)
    f = 32 / math.tan(math.radians(30))
    np.testing.assert_allclose(K, [[f, 0, 32], [0, f, 32], [0, 0, 1]], rtol=1e-6)
    R = clip["c2w"][:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    np.testing.assert_allclose(clip["c2w"][:, 1, 3], 1.5, atol=1e-6)            # camera 1.5 m above the floor
    assert np.abs(R[:, 1, 0]).max() < 1e-6                                     # no roll: camera x stays level
    level = np.abs(R[:, 1, 2]) < 1e-6                                          # frames with pitch 0
    assert level.sum() > 10 and (R[level][:, 1, 1] < -0.999).all()             # image down = world -y (y is up)


def test_object_straight_ahead_projects_to_centre():
    clip = render.read({"seed": 2, "frames": 1, "hw": [48, 64]})
    i = next(i for i, n in enumerate(clip["object_names"]) if n.endswith("_box") and n.split("_")[0] in NOMINAL)
    name, (x, y, z) = clip["object_names"][i], clip["object_positions"][i].astype(np.float64)
    room = min(range(4), key=lambda r: np.hypot(*(render.CENTRES[r] - [x, z])))
    cx, cz = render.CENTRES[room]
    yaw = math.degrees(math.atan2(-(z - cz), x - cx))                         # MiniWorld: dir_vec = (cos, 0, -sin)
    pitch = math.degrees(math.atan2(y - 1.5, math.hypot(x - cx, z - cz)))     # positive pitch looks up
    out = render.render_poses(2, [[cx, cz, yaw, pitch]], [48, 64])
    _, uv = _project(out, np.array([x, y, z]))
    np.testing.assert_allclose(uv[0], [32, 24], atol=1e-3)                     # optical axis = image centre
    ray = np.array([x - cx, y - 1.5, z - cz])
    np.testing.assert_allclose(out["c2w"][0, :3, 2], ray / np.linalg.norm(ray), atol=1e-5)   # camera z = view ray
    centre = out["frames"][0, 23:25, 31:33].reshape(-1, 3)                     # the 4 pixels around (32, 24)
    assert all(_cosine(px, name.split("_")[0]) > 0.95 for px in centre), (name, centre)


def test_projected_object_centres_land_on_their_colour(clip):
    checks = _visible_centres(clip)
    assert len(checks) >= 30 and len({i for _, i, *_ in checks}) >= 3, len(checks)
    bad = [(t, clip["object_names"][i], clip["frames"][t, v, u].tolist()) for t, i, _, u, v in checks
           if _cosine(clip["frames"][t, v, u], clip["object_names"][i].split("_")[0]) <= 0.95]
    assert not bad, bad[:5]
    # The check can tell conventions apart: with the image upside down most would miss.
    flipped = sum(_cosine(clip["frames"][t, 63 - v, u], clip["object_names"][i].split("_")[0]) > 0.95
                  for t, i, _, u, v in checks)
    assert flipped < len(checks) / 2


def test_depth_is_z_along_optical_axis(clip):
    balls = [c for c in _visible_centres(clip, kinds=("ball",))]
    boxes = [c for c in _visible_centres(clip, kinds=("box",))]
    assert len(balls) >= 5 and len(boxes) >= 5
    # Tolerance: 16-bit depth buffer steps (~4e-4 z^2), float16, a pixel's offset from the exact centre ray.
    tol = lambda z: 0.03 + 1e-3 * z ** 2                                       # noqa: E731
    for t, i, q, u, v in balls:                              # the centre ray enters the sphere r before the centre
        r, cos = clip["object_sizes"][i] / 2, q[2] / np.linalg.norm(q)
        assert abs(float(clip["depth"][t, v, u]) - (q[2] - r * cos)) < tol(q[2])
    for t, i, q, u, v in boxes:                              # ... and a cube between s/2 and s*sqrt(3)/2 before it
        s, cos = clip["object_sizes"][i], q[2] / np.linalg.norm(q)
        assert q[2] - 0.87 * s * cos - tol(q[2]) < float(clip["depth"][t, v, u]) < q[2] - 0.5 * s * cos + tol(q[2])


def test_matches_miniworld_gl_matrices():
    out = render.render_poses(3, [[2.0, -1.3, 40.0, -12.0], [-2.0, 2.0, -170.0, 8.0]], [48, 80])
    from pyglet.gl import GL_MODELVIEW_MATRIX, GL_PROJECTION_MATRIX, GLfloat, glGetFloatv
    P, M = (GLfloat * 16)(), (GLfloat * 16)()
    glGetFloatv(GL_PROJECTION_MATRIX, P)                                       # state of the last render
    glGetFloatv(GL_MODELVIEW_MATRIX, M)
    P, M = (np.array(a, np.float64).reshape(4, 4).T for a in (P, M))         # OpenGL is column-major
    c2w = out["c2w"][-1].astype(np.float64)
    pc = np.random.default_rng(0).uniform([-2, -1, 0.5], [2, 1, 8], (200, 3))  # points in front, camera frame
    pw = np.c_[pc @ c2w[:3, :3].T + c2w[:3, 3], np.ones(200)]                  # [200, 4] world, homogeneous
    ndc = (P @ M @ pw.T).T
    ndc = ndc[:, :3] / ndc[:, 3:]
    uv_gl = np.c_[(ndc[:, 0] + 1) / 2 * 80, (1 - ndc[:, 1]) / 2 * 48]          # viewport, then row 0 on top
    q = (np.linalg.inv(c2w) @ pw.T).T[:, :3]                                   # [200, 3] camera frame again
    uv = (out["K"][-1].astype(np.float64) @ q.T).T
    np.testing.assert_allclose(uv[:, :2] / uv[:, 2:], uv_gl, atol=1e-3)
    np.testing.assert_allclose(-(M @ pw.T)[2], q[:, 2], atol=1e-4)             # OpenGL looks down -z


def test_revisits_are_pixel_identical_after_leaving(clip):
    rev = clip["revisit_of"]
    ts = np.nonzero(rev >= 0)[0]
    assert len(ts) > 0
    for t in ts:
        np.testing.assert_array_equal(clip["frames"][t], clip["frames"][rev[t]])
        np.testing.assert_array_equal(clip["c2w"][t], clip["c2w"][rev[t]])
    pos = clip["c2w"][:, [0, 2], 3]
    away = max(np.linalg.norm(pos[rev[t]:t] - pos[t], axis=1).max() for t in ts)
    assert away >= 3.0, away                                                   # left for another room and came back


def test_camera_path_is_smooth_and_clear(clip):
    pos = clip["c2w"][:, [0, 2], 3].astype(np.float64)
    half = render.ROOM / 2
    # On the ring through room centres and doorway centres: far from walls, doorways crossed in the middle.
    assert (np.minimum(np.abs(np.abs(pos[:, 0]) - half), np.abs(np.abs(pos[:, 1]) - half)) < 1e-5).all()
    for p, s in zip(clip["object_positions"][:, [0, 2]], clip["object_sizes"]):
        assert np.linalg.norm(pos - p, axis=1).min() > s / math.sqrt(2) + 0.3
    assert np.linalg.norm(np.diff(pos, axis=0), axis=1).max() <= render.MOVE + 1e-6
    fwd = clip["c2w"][:, :3, 2].astype(np.float64)
    turn = np.degrees(np.arccos(np.clip((fwd[1:] * fwd[:-1]).sum(1), -1, 1)))
    assert turn.max() < 10 and (turn + np.linalg.norm(np.diff(pos, axis=0), axis=1) > 0).all()


def test_deterministic_given_seed(clip):
    other = render.read({"seed": 5, "frames": 32, "hw": [64, 64]})             # load another scene in between
    again = render.read(render.find_inputs("scenes=1,frames=256,hw=64x64,seed=1")[0])
    for k in ("frames", "depth", "K", "c2w", "revisit_of", "object_positions"):
        np.testing.assert_array_equal(again[k], clip[k])
    assert not np.array_equal(other["frames"], clip["frames"][:32])


def test_find_inputs(tmp_path):
    d = render.find_inputs("scenes=3,frames=16,hw=48x80,seed=7")
    assert d == [{"id": f"render-{s:05d}", "seed": s, "frames": 16, "hw": [48, 80], "path": "tour"} for s in (7, 8, 9)]
    assert render.find_inputs("") == render.find_inputs("scenes=4,frames=128,hw=64x64,seed=0")
    assert all("." not in x["id"] for x in d) and json.loads(json.dumps(d)) == d
    (tmp_path / "r.json").write_text(json.dumps({"scenes": 2, "hw": [32, 32]}))
    (tmp_path / "r.yaml").write_text("scenes: 2\nhw: 32x32\nseed: 0\n")
    assert render.find_inputs(str(tmp_path / "r.json")) == render.find_inputs(str(tmp_path / "r.yaml"))
    want = {"id": "render-00001", "seed": 1, "frames": 128, "hw": [32, 32], "path": "tour"}
    assert render.find_inputs(str(tmp_path / "r.json"))[1] == want


@pytest.mark.parametrize("spec, word", [
    ("scenes=0", "scenes"), ("frames=abc", "frames"), ("hw=64x", "hw"), ("hw=4x64", "hw"),
    ("seed=-1", "seed"), ("size=3", "size"), ("scenes=2,scenes=3", "scenes"), ("frames", "frames"),
    ("missing.yaml", "missing.yaml"), ("frames=2.5", "frames"), ("path=spiral", "path"),
])
def test_find_inputs_rejects_bad_specs(spec, word):
    with pytest.raises(ValueError, match=word.replace(".", r"\.")):
        render.find_inputs(spec)


def test_find_inputs_rejects_bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.json").write_text(json.dumps({"hw": [64, 64, 3]}))
    for name, word in (("list.yaml", "mapping"), ("bad.json", "hw")):
        with pytest.raises(ValueError, match=word):
            render.find_inputs(str(tmp_path / name))
    with pytest.raises(ValueError, match="seed"):
        render.read({"frames": 4, "hw": [64, 64]})
