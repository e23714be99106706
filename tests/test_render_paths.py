"""Camera path kinds of the MiniWorld renderer (data_pipeline/render.py): the ``path`` spec key, "tour" kept as it
was, "revisit" smooth and inside the rooms, and ``revisit_fraction`` on known and rendered paths."""
import importlib.util
import json
import os

import numpy as np
import pytest

from decmem.data_pipeline import render


def _gl_missing():
    """Why nothing can be rendered here, or None (importing pyglet.gl opens pyglet's hidden EGL context)."""
    if importlib.util.find_spec("miniworld") is None:   # not importorskip: importing miniworld opens a GL context
        return "miniworld not installed (pip install miniworld==2.1.0)"
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyglet
    pyglet.options["headless"] = True
    try:
        import pyglet.gl
    except Exception as e:  # pyglet raises assorted types when EGL / Mesa libraries are missing
        return f"no headless EGL (apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri): {e!r}"
    return None


GL = _gl_missing()
needs_gl = pytest.mark.skipif(GL is not None, reason=str(GL))

# Poses of `_path(_scene(seed), 256, seed)` recorded from the code before the `path` key existed:
# seed -> ({frame: (x, z, yaw, pitch)}, column sums). Seed 1024 is the demo's held-out scene, chosen by its path.
TOUR = {
    0: ({0: (-2.0, 2.0, 13.0, 0.0), 1: (-2.0, 2.0, 4.0, 0.0), 17: (-2.0, 2.0, -17.111111111111114, 0.0),
         100: (-2.0, 2.0, -57.71428571428571, -6.428571428571428), 255: (-1.2, 2.0, 0.0, 0.0)},
        (-58.0, 512.0, -9119.5, -90.0)),
    1: ({0: (-2.0, -2.0, -123.0, 0.0), 1: (-2.0, -2.0, -114.42857142857143, 0.0), 17: (-1.4, -2.0, 0.0, 0.0),
         100: (-2.0, -2.0, 42.85714285714286, 0.0), 255: (-2.0, -2.0, 137.1428571428571, 0.0)},
        (101.79999999999997, -512.0, -4121.571428571428, -142.5)),
    1024: ({0: (2.0, -2.0, 157.0, 0.0), 1: (2.0, -2.0, 148.42857142857144, 0.7142857142857142),
            17: (2.0, -2.0, 37.0, 2.5), 100: (2.0, -2.0, 14.800000000000011, 1.0), 255: (-0.4, -2.0, -180.0, 0.0)},
           (84.39999999999999, -512.0, -13218.5, 158.57142857142856)),
}


def test_path_key_parses():
    d = render.find_inputs("scenes=2,frames=16,hw=16x16,seed=3,path=revisit")
    assert d == [{"id": f"render-{s:05d}", "seed": s, "frames": 16, "hw": [16, 16], "path": "revisit"} for s in (3, 4)]
    tour = render.find_inputs("scenes=2,frames=16,hw=16x16,seed=3")
    assert [x["path"] for x in tour] == ["tour", "tour"] and [x["id"] for x in tour] == [x["id"] for x in d]
    assert render.find_inputs("path=tour,seed=3,scenes=2,frames=16,hw=16") == tour


def test_path_key_in_files(tmp_path):
    (tmp_path / "r.yaml").write_text("scenes: 1\nframes: 8\npath: revisit\n")
    (tmp_path / "r.json").write_text(json.dumps({"scenes": 1, "frames": 8, "path": "revisit"}))
    want = [{"id": "render-00000", "seed": 0, "frames": 8, "hw": [64, 64], "path": "revisit"}]
    assert render.find_inputs(str(tmp_path / "r.yaml")) == render.find_inputs(str(tmp_path / "r.json")) == want


@pytest.mark.parametrize("spec", ["path=loop", "path=", "path=Tour", "path=1", "seed=2,path=tour revisit"])
def test_bad_path_is_refused(spec):
    with pytest.raises(ValueError, match="for 'path' .expected one of tour, revisit"):
        render.find_inputs(spec)


@pytest.mark.parametrize("value", [1, None, ["revisit"], True])
def test_bad_path_types_are_refused(tmp_path, value):
    (tmp_path / "r.json").write_text(json.dumps({"path": value}))
    with pytest.raises(ValueError, match="for 'path' .expected one of tour, revisit"):
        render.find_inputs(str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="'path'"):
        render.read({"seed": 0, "frames": 4, "hw": [16, 16], "path": value})


@pytest.mark.parametrize("seed", sorted(TOUR))
def test_tour_is_unchanged(seed):
    rows, sums = TOUR[seed]
    for poses in (render._path(render._scene(seed), 256, seed), render._path(render._scene(seed), 256, seed, "tour")):
        assert poses.shape == (256, 4)
        for t, row in rows.items():
            np.testing.assert_array_equal(poses[t], row)
        np.testing.assert_allclose(poses.sum(0), sums, rtol=0, atol=1e-9)


def _steps(poses):
    """Per-frame position step (m), yaw step (deg, wrapped) and pitch step (deg) of poses [T, 4]."""
    d = np.diff(poses, axis=0)
    return np.hypot(d[:, 0], d[:, 1]), np.abs((d[:, 2] + 180) % 360 - 180), np.abs(d[:, 3])


def _wall_crossings(poses):
    """Points where consecutive positions cross a wall line x = 0 or z = 0 (doorways lie on them)."""
    out = []
    for p, q in zip(poses[:-1, :2], poses[1:, :2]):
        for ax in (0, 1):
            if p[ax] * q[ax] <= 0 and (p[ax] != 0 or q[ax] != 0):
                out.append(p + p[ax] / (p[ax] - q[ax]) * (q - p) if p[ax] != q[ax] else p)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_revisit_path_is_smooth_and_stays_in_rooms(seed):
    scene = render._scene(seed)
    poses = render._path(scene, 640, seed, "revisit")
    assert poses.shape == (640, 4)
    move, turn, tilt = _steps(poses)
    assert move.max() <= render.MOVE + 1e-9 and turn.max() <= render.TURN + 1e-9 and tilt.max() <= render.TILT + 1e-9
    assert (move + turn + tilt > 0).all()                                      # never standing still
    assert np.abs(poses[:, 3]).max() <= 20
    x, z = poses[:, 0], poses[:, 1]
    half = render.ROOM / 2
    assert (np.minimum(np.abs(np.abs(x) - half), np.abs(np.abs(z) - half)) < 1e-9).all()   # on the centre lines
    assert np.abs(poses[:, :2]).max() <= render.ROOM - 0.5                    # >= 0.5 m from the outer walls
    doors = [(render.CENTRES[a] + render.CENTRES[b]) / 2 for a, b in scene["links"]]
    crossings = _wall_crossings(poses)
    assert crossings                                                           # it does change rooms
    for c in crossings:                                                        # ... through doorway centres only
        assert min(np.linalg.norm(c - d) for d in doors) < 1e-9, (c, scene["links"])


def test_revisit_paths_cover_ring_and_u_scenes():
    assert {len(render._scene(s)["links"]) for s in range(6)} == {3, 4}         # the test above saw both layouts


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_revisit_path_explores_and_comes_back(seed):
    poses = render._path(render._scene(seed), 640, seed, "revisit")
    rooms = [render._room_of(x, z) for x, z in poses[:, :2]]
    assert len(set(rooms) - {-1}) >= 3
    last, away = {}, 0
    for t, r in enumerate(rooms):
        if r >= 0:
            away = max(away, t - last.get(r, t))
            last[r] = t
    assert away >= 100                                                         # back in a room left long before
    first = {}
    exact = sum(first.setdefault(tuple(p), t) != t for t, p in enumerate(poses))
    assert exact >= 0.05 * len(poses)                                          # many exact pose revisits


def test_revisit_path_is_deterministic_and_differs():
    a = render._path(render._scene(3), 200, 3, "revisit")
    np.testing.assert_array_equal(a, render._path(render._scene(3), 200, 3, "revisit"))
    np.testing.assert_array_equal(a[:1], render._path(render._scene(3), 200, 3)[:1])   # same start as the tour
    assert not np.array_equal(a, render._path(render._scene(3), 200, 3))
    assert not np.array_equal(a, render._path(render._scene(4), 200, 4, "revisit"))
    np.testing.assert_array_equal(a[:50], render._path(render._scene(3), 50, 3, "revisit"))   # prefix of longer


@needs_gl
def test_read_renders_the_descriptors_path():
    for kind in ("tour", "revisit"):
        clip = render.read({"seed": 1, "frames": 40, "hw": [16, 16], "path": kind})
        poses = render._path(render._scene(1), 40, 1, kind)
        np.testing.assert_allclose(clip["c2w"][:, [0, 2], 3], poses[:, :2], atol=1e-5)
        fwd = clip["c2w"][:, :3, 2].astype(np.float64)                        # camera z = view direction
        yaw = np.degrees(np.arctan2(-fwd[:, 2], fwd[:, 0]))                   # MiniWorld: dir_vec = (cos, 0, -sin)
        np.testing.assert_allclose((yaw - poses[:, 2] + 180) % 360 - 180, 0, atol=1e-3)
        np.testing.assert_allclose(np.degrees(np.arcsin(fwd[:, 1])), poses[:, 3], atol=1e-3)
    old = render.read({"seed": 1, "frames": 40, "hw": [16, 16]})               # descriptors without a path: tour
    spec = render.read(render.find_inputs("seed=1,scenes=1,frames=40,hw=16")[0])
    np.testing.assert_array_equal(old["c2w"], spec["c2w"])
    np.testing.assert_allclose(old["c2w"][:, [0, 2], 3], render._path(render._scene(1), 40, 1)[:, :2], atol=1e-5)


def _pan(room, yaw0, steps):
    """Render a pan at a room centre: yaw0 + 9 deg * each entry of steps, level."""
    cx, cz = render.CENTRES[room]
    return render.render_poses(0, [[cx, cz, yaw0 + render.TURN * k, 0.0] for k in steps], [32, 32])


@needs_gl
@pytest.mark.parametrize("room, yaw0", [(0, 0.0), (2, 100.0), (3, -60.0)])
def test_revisit_fraction_of_a_pan_out_and_back(room, yaw0):
    clip = _pan(room, yaw0, [0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0])
    m = render.revisit_fraction(clip, 4, 11)
    # Frames 4-10 are scored: 4, 5 turn on into unseen views; 6 (pose of 4) shows nothing frames 3-5 do not;
    # 7-10 (poses 3..0) show again what frames 3..0 saw, 4, 6, 8, 10 frames before.
    assert m["samples"] == 1
    assert m["revisit"] == pytest.approx(4 / 7) and m["gap"] == pytest.approx(7.0)
    assert m["novel"] == pytest.approx(2 / 7) and m["in_window"] == pytest.approx(1 / 7)
    # Samples of 9 frames (w = 0, 1, 2): frame 7 counts in 3, frame 8 in 3, frame 9 in 1 (w=1), frame 10 in none.
    assert render.revisit_fraction(clip, 4, 9)["revisit"] == pytest.approx(7 / 15)


@needs_gl
def test_revisit_fraction_walking_ahead_needs_no_memory():
    cx, cz = render.CENTRES[0]
    clip = render.render_poses(0, [[cx - render.MOVE * k, cz, 180.0, 0.0] for k in range(8)], [32, 32])
    m = render.revisit_fraction(clip, 4, 8)
    assert m["in_window"] == 1.0 and m["revisit"] == 0.0 and m["novel"] == 0.0
    assert m["covered"] == 1.0                                                 # what whole-frame coverage misses
    for window, clip_frames in ((0, 8), (4, 4), (4, 9)):
        with pytest.raises(ValueError, match="revisit_fraction"):
            render.revisit_fraction(clip, window, clip_frames)


@needs_gl
def test_revisit_path_revisits_beyond_the_window_and_tour_does_not():
    got = {kind: [render.revisit_fraction(render.read({"seed": s, "frames": 96, "hw": [32, 32], "path": kind}), 4, 24)
                  for s in range(4)] for kind in ("tour", "revisit")}
    revisit = np.mean([m["revisit"] for m in got["revisit"]])
    assert revisit >= 0.5, got["revisit"]                                      # the target, demo-sized clips
    assert all(m["revisit"] < 0.2 for m in got["tour"]), got["tour"]
    assert revisit >= 3 * np.mean([m["revisit"] for m in got["tour"]])
    assert all(0.1 <= m["novel"] <= 0.45 for m in got["revisit"]), got["revisit"]   # new views keep coming
    assert all(m["gap"] <= 12 for m in got["revisit"])


@pytest.mark.parametrize("seed", range(4))
def test_return_path_cuts_between_views_and_comes_back(seed):
    poses = render._path(render._scene(seed), 400, seed, "return")
    assert poses.shape == (400, 4)
    move, turn, tilt = _steps(poses)
    cut = (move > render.MOVE + 1e-9) | (turn > render.TURN + 1e-9) | (tilt > render.TILT + 1e-9)
    assert 0.15 <= cut.mean() <= 0.4                                           # a cut every 3-6 frames
    assert (move + turn + tilt > 0).all() and np.abs(poses[:, 3]).max() <= 12
    half = render.ROOM / 2
    assert np.allclose(np.abs(poses[:, :2]), half)                             # room centres only
    starts = np.flatnonzero(np.r_[True, cut])                                   # first frame of each stay at a view
    first, back = {}, 0
    for i, t in enumerate(starts):
        key = tuple(poses[t])
        if key in first:                                                       # a return: the view's first pose
            back += 1
            assert t - first[key] > 4                                          # ... left more than a window ago
        first.setdefault(key, t)
        # the stay just before ends >= 90 - 2 turn steps away in yaw when at the same position
        if i and np.array_equal(poses[t, :2], poses[t - 1, :2]):
            assert abs((poses[t, 2] - poses[t - 1, 2] + 180) % 360 - 180) >= 90 - 2 * render.TURN - 1e-9
    assert back >= 0.4 * len(starts)                                           # most cuts go back


def test_return_path_is_deterministic_and_a_prefix_of_longer():
    a = render._path(render._scene(2), 120, 2, "return")
    np.testing.assert_array_equal(a, render._path(render._scene(2), 120, 2, "return"))
    np.testing.assert_array_equal(a[:1], render._path(render._scene(2), 120, 2)[:1])
    np.testing.assert_array_equal(a[:40], render._path(render._scene(2), 40, 2, "return"))


@needs_gl
def test_revisit_fraction_far_counts_what_only_memory_holds():
    # view A (3 frames), cut to the opposite view B (4 frames), cut back to A's first pose, then 2 frames of A
    cx, cz = render.CENTRES[1]
    a, b = [[cx, cz, 30.0 + render.TURN * k, 0.0] for k in range(3)], [[cx, cz, -150.0 + render.TURN * k, 0.0]
                                                                       for k in range(4)]
    clip = render.render_poses(0, a + b + a[:3], [32, 32])
    m = render.revisit_fraction(clip, 4, 10)
    # Scored frames 4..9: 4-6 are B (the window holds B, nothing older saw more of it), 7 is A's first pose again
    # (the window, frames 4-6, holds only B; frames 0-2 saw it): far. 8 and 9 are revisits too, but frame 7 in
    # their window already shows most of them.
    assert m["far"] == pytest.approx(1 / 6) and m["revisit"] == pytest.approx(3 / 6)
    # Samples of 7 frames (w = 0..3, frames w+4..w+6 scored): frame 7 is far where the sample still holds A's
    # frame 1 or 2 (w = 1, 2; each sees >= 70% of it), not where it starts at B (w = 3): 2 of 12 pairs.
    assert render.revisit_fraction(clip, 4, 7)["far"] == pytest.approx(2 / 12)


@needs_gl
def test_return_path_needs_memory_where_revisit_does_not():
    got = {kind: [render.revisit_fraction(render.read({"seed": s, "frames": 64, "hw": [32, 32], "path": kind}), 4, 24)
                  for s in range(2)] for kind in ("revisit", "return")}
    assert all(m["far"] == 0.0 for m in got["revisit"]), got["revisit"]         # its window always holds most
    assert all(m["far"] >= 0.05 for m in got["return"]), got["return"]
