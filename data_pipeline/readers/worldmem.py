"""WorldMem Minecraft reader: ``<ep>.mp4`` + ``<ep>.npz`` (``actions`` [T,8], ``poses`` [T,5]).

Source convention (WorldMem / MineDojo recordings):
  * ``poses[t] = (x, y, z, pitch, yaw)``: position in blocks, angles in degrees, Minecraft world axes
    x east, y up, z south; yaw 0 looks along +z (south), yaw 90 along -x (west); positive pitch looks down;
  * ``actions[t]``: the raw MineDojo action vector (8 ints), kept as float32 [T,8] unchanged;
  * no intrinsics are stored: WorldMem uses fx = 0.35 W, fy = 0.35 H, principal point at the centre.
Conversion:
  * world frame = Minecraft's own axes (x east, y up, z south), 1 block = 1 metre (not OpenCV-like: y up);
  * camera axes OpenCV: at yaw = pitch = 0 the camera looks south with right = west (-x), down = -y,
    i.e. R0 = diag(-1, -1, 1); then c2w[:3,:3] = R_y(-yaw) @ R0 @ R_x(-pitch) -- yaw about the world y
    axis (negated: Minecraft yaw turns from south towards west, a negative turn about +y), pitch about
    the camera x axis (negated: OpenCV y points down, so looking down is a negative x rotation);
  * camera centre = (x, y, z) exactly as stored; no eye height is added (whether the recorded y is
    the feet or the eye depends on the recorder; Minecraft's eye is 1.62 blocks above the feet);
  * T of the npz must equal the number of decoded frames (error naming both counts and both files).
Extra keys: ``poses_raw`` float32 [T,5], ``frame_timestamps_us`` int64 [T].
"""
from __future__ import annotations

import os

import numpy as np

from decmem.data_pipeline.clip import validate_clip
from decmem.data_pipeline.readers._common import (
    decode_all,
    get_key,
    intrinsics,
    load_npz,
    make_id,
    rigid,
    unique_ids,
    walk_files,
)

SOURCE = "worldmem"
FOCAL_FRAC = 0.35                       # WorldMem's fixed intrinsics: fx = 0.35 W, fy = 0.35 H
DEFAULT_FPS = 20.0                      # MineDojo's tick-rate recording, used if the video carries no rate
R0 = np.diag([-1.0, -1.0, 1.0])         # camera (right, down, forward) at yaw = pitch = 0, world coords


def _rot_y(a: np.ndarray) -> np.ndarray:
    c, s, z, o = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _rot_x(a: np.ndarray) -> np.ndarray:
    c, s, z, o = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def poses_to_c2w(poses: np.ndarray) -> np.ndarray:
    """Minecraft (x, y, z, pitch, yaw) [T,5] -> float64 c2w [T,4,4] with OpenCV camera axes."""
    pitch, yaw = np.deg2rad(poses[:, 3]), np.deg2rad(poses[:, 4])
    R = _rot_y(-yaw) @ R0 @ _rot_x(-pitch)                  # [T, 3, 3]
    return rigid(R, poses[:, :3])


def find_inputs(root: str) -> list[dict]:
    """Episodes under ``root`` (an .mp4 and/or .npz per stem): [{"id", "video", "npz"}], sorted by id."""
    stems: dict[str, dict] = {}
    for ext, key in ((".npz", "npz"), (".mp4", "video")):
        for path in walk_files(root, ext):
            stem = path[: -len(ext)]
            stems.setdefault(stem, {"id": make_id(root, path), "video": None, "npz": None})[key] = path
    return unique_ids(list(stems.values()), "npz")


def read(desc: dict) -> dict:
    """Read one episode described by ``find_inputs`` -> validated canonical clip."""
    npz, video = desc.get("npz"), desc.get("video")
    if not npz or not video:
        have = npz or video
        raise FileNotFoundError(f"{have}: episode needs both <ep>.mp4 and <ep>.npz; "
                                f"missing the {'.npz' if not npz else '.mp4'}")
    data = load_npz(npz)
    poses = get_key(data, "poses", npz, ndim=2, last=5).astype(np.float64)        # [T, 5]
    actions = get_key(data, "actions", npz, ndim=2).astype(np.float32)            # [T, A]
    if len(actions) != len(poses):
        raise ValueError(f"{npz}: key 'actions' has {len(actions)} rows but key 'poses' has {len(poses)}; "
                         "expected one row per frame in both")
    frames, times, rate = decode_all(video)                                        # [T, H, W, 3]
    if len(frames) != len(poses):
        raise ValueError(f"{npz}: {len(poses)} poses/actions but {video} decodes to {len(frames)} frames; "
                         "expected equal counts (truncated video or mismatched files?)")
    H, W = frames.shape[1:3]
    T = len(frames)
    steps = np.diff(times)
    fps = rate or (1e6 / float(np.median(steps)) if T > 1 and np.median(steps) > 0 else DEFAULT_FPS)
    clip = {
        "frames": frames,
        "K": intrinsics(np.full(T, FOCAL_FRAC * W), FOCAL_FRAC * H, W / 2, H / 2),
        "c2w": poses_to_c2w(poses).astype(np.float32),
        "actions": actions,
        "fps": float(fps),
        "source": SOURCE,
        "video_id": desc.get("id") or make_id(os.path.dirname(npz), npz),
        "poses_raw": poses.astype(np.float32),
        "frame_timestamps_us": np.round(times).astype(np.int64),
    }
    return validate_clip(clip, name=npz)
