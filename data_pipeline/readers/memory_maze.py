"""Memory Maze reader: one offline-dataset episode ``<traj>.npz``.

Source convention (memory-maze offline datasets, ``global_observables=True``):
  * ``image`` uint8 [T,64,64,3]; ``action`` int [T] or one-hot float [T,6];
  * ``agent_pos`` [T,2] grid units (MuJoCo floor x, y divided by the 2 m cell size, shifted so the maze
    corner is (0, 0)); ``agent_dir`` [T,2] unit heading in the same x, y plane (MuJoCo z is up, so the
    (x, y) pair is right-handed seen from above);
  * optional ``maze_layout`` [n,n], ``reward`` [T], ``targets_pos`` ... (only the first two are kept);
  * camera constants (DESIGN 2.2): vertical FOV 80 deg, 0.9 m above the floor, pitched 5.7 deg down;
    square pixels, principal point at the image centre; control rate 4 Hz.
Conversion:
  * world frame (OpenCV-like, y down): x = 2 * grid x, z = 2 * grid y, y = -height, so the camera
    centre is (2 gx, -0.9, 2 gy); this maps MuJoCo (X, Y, Z-up) to (X, -Z, Y) up to scale: a rotation,
    so the world stays right-handed and images are not mirrored;
  * heading (dx, dy) -> level forward h = (dx, 0, dy); pitched down: forward = cos(p) h + sin(p) (0, 1, 0);
    right = (dy, 0, -dx) (= down x forward, right-handed); camera down = forward x right;
  * fy = fx = (H / 2) / tan(40 deg); cx = W / 2, cy = H / 2;
  * actions as one-hot float32 [T, 6] (integer actions are expanded; one-hot input is kept as is).
"""
from __future__ import annotations

import math
import os

import numpy as np

from decmem.data_pipeline.clip import validate_clip
from decmem.data_pipeline.readers._common import get_key, intrinsics, load_npz, make_id, rigid, unique_ids, walk_files

SOURCE = "memory_maze"
VFOV_DEG = 80.0
CAMERA_HEIGHT_M = 0.9
PITCH_DOWN_DEG = 5.7
CELL_M = 2.0
N_ACTIONS = 6
FPS = 4.0                               # memory-maze DEFAULT_CONTROL_FREQ


def find_inputs(root: str) -> list[dict]:
    """Every ``*.npz`` episode under ``root``: [{"id", "npz"}], sorted by id."""
    return unique_ids([{"id": make_id(root, p), "npz": p} for p in walk_files(root, ".npz")], "npz")


def heading_to_c2w(pos: np.ndarray, heading: np.ndarray) -> np.ndarray:
    """Grid positions [T,2] and unit headings [T,2] -> float64 c2w [T,4,4] (OpenCV axes, y-down world)."""
    dx, dy = heading[:, 0], heading[:, 1]
    z = np.zeros_like(dx)
    level = np.stack([dx, z, dy], -1)                                   # [T, 3] forward before pitching
    p = math.radians(PITCH_DOWN_DEG)
    fwd = math.cos(p) * level + math.sin(p) * np.array([0.0, 1.0, 0.0])  # +y is down in this world
    right = np.stack([dy, z, -dx], -1)                                  # [T, 3] horizontal, unaffected by pitch
    down = np.cross(fwd, right)                                         # [T, 3] completes x right, y down, z fwd
    R = np.stack([right, down, fwd], -1)                                # [T, 3, 3] columns = camera axes
    centre = np.stack([CELL_M * pos[:, 0], np.full_like(dx, -CAMERA_HEIGHT_M), CELL_M * pos[:, 1]], -1)
    return rigid(R, centre)


def _actions(a: np.ndarray, path: str) -> np.ndarray:
    """``action`` [T] ints or [T,n] one-hot -> float32 [T,n] (n = 6 for integer input)."""
    if a.ndim == 2:
        return a.astype(np.float32)
    if a.ndim != 1:
        raise ValueError(f"{path}: key 'action' expected [T] integers or [T,{N_ACTIONS}] one-hot, got shape {a.shape}")
    if not np.array_equal(a, np.round(a)) or a.min(initial=0) < 0 or a.max(initial=0) >= N_ACTIONS:
        raise ValueError(f"{path}: key 'action' expected integers in [0, {N_ACTIONS}), "
                         f"got range {a.min()}..{a.max()}")
    return np.eye(N_ACTIONS, dtype=np.float32)[a.astype(np.int64)]     # [T, 6]


def read(desc: dict) -> dict:
    """Read one episode described by ``find_inputs`` -> validated canonical clip."""
    path = desc["npz"]
    data = load_npz(path)
    image = get_key(data, "image", path, ndim=4, last=3)                # [T, H, W, 3]
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: key 'image' expected uint8 [T,H,W,3], got dtype {image.dtype}")
    T, H, W = image.shape[:3]
    if T < 1:
        raise ValueError(f"{path}: key 'image' has zero frames")
    pos = get_key(data, "agent_pos", path, ndim=2, last=2).astype(np.float64)    # [T, 2] grid units
    heading = get_key(data, "agent_dir", path, ndim=2, last=2).astype(np.float64)  # [T, 2]
    action = get_key(data, "action", path)
    for key, a in (("agent_pos", pos), ("agent_dir", heading), ("action", action)):
        if len(a) != T:
            raise ValueError(f"{path}: key {key!r} has {len(a)} rows but key 'image' has {T} frames; "
                             "expected one row per frame")
    norm = np.linalg.norm(heading, axis=-1)                             # [T]
    if (norm < 1e-6).any():
        raise ValueError(f"{path}: key 'agent_dir' has a zero heading at frame {int(np.argmin(norm))}; "
                         "expected unit vectors")
    heading = heading / norm[:, None]
    f = (H / 2) / math.tan(math.radians(VFOV_DEG / 2))
    clip = {
        "frames": np.ascontiguousarray(image),
        "K": intrinsics(np.full(T, f), f, W / 2, H / 2),
        "c2w": heading_to_c2w(pos, heading).astype(np.float32),
        "actions": _actions(action, path),
        "fps": FPS,
        "source": SOURCE,
        "video_id": desc.get("id") or make_id(os.path.dirname(path), path),
    }
    if "maze_layout" in data:
        clip["maze_layout"] = np.asarray(data["maze_layout"])
    if "reward" in data and np.shape(data["reward"]) == (T,):
        clip["reward"] = data["reward"].astype(np.float32)              # [T]
    return validate_clip(clip, name=path)
