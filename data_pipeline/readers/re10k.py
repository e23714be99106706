"""RealEstate10K reader: ``<clip>.txt`` camera file + the user's copy of the video.

Source convention (RealEstate10K release):
  line 1      the YouTube URL of the source video
  line 2..    ``timestamp_us fx fy cx cy k1 k2 p00 p01 p02 p03 p10 ... p23`` (19 numbers)
              fx, cx normalised by the image width, fy, cy by the image height;
              k1 k2 radial distortion (0 in practice);
              p = row-major 3x4 **world-to-camera** [R|t], OpenCV camera axes (x right, y down, z forward);
              translation scale is arbitrary per clip (not metres).
Conversion:
  K_px   = [[fx*W, 0, cx*W], [0, fy*H, cy*H], [0, 0, 1]] with (W, H) the decoded video's size.
  c2w    = inverse([R|t; 0 0 0 1]) -- camera axes are already OpenCV, the world frame is RE10K's own.
  frames = for each pose line, the decoded frame nearest its timestamp (frame time = pts * time_base
           in us), accepted within half a frame period; unmatched lines are dropped and their
           timestamps listed in ``clip["missing"]`` (an error only when nothing matches).
Extra keys: ``frame_timestamps_us`` int64 [T], ``missing`` int64 [M], ``distortion`` float32 [T,4]
(k1, k2, p1=0, p2=0, OpenCV order), ``url`` str, ``video_fps`` float.

Discovery: ``find_inputs(root)`` lists every ``root/**/<clip>.txt`` whose first line is a single token
(the URL), so READMEs and other text files are skipped; the video is ``root/videos/<clip>.{mp4,webm,mkv}``,
else ``<clip>.{mp4,webm,mkv}`` next to the txt, else ``None`` (``read`` then raises FileNotFoundError).
A video that no camera file claims is listed too, with ``poses=None`` and id ``<path>_<ext>``, so that
``read`` raises FileNotFoundError for it and preprocessing records it as skipped instead of ignoring it.
"""
from __future__ import annotations

import os

import numpy as np

from decmem.data_pipeline.clip import validate_clip
from decmem.data_pipeline.readers._common import (
    decode_at,
    intrinsics,
    make_id,
    rotation_problem,
    unique_ids,
    walk_files,
)

SOURCE = "re10k"
VIDEO_EXTS = (".mp4", ".webm", ".mkv")
N_COLS = 19


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def _find_video(root: str, txt: str) -> str | None:
    stem = os.path.splitext(os.path.basename(txt))[0]
    for folder in (os.path.join(root, "videos"), os.path.dirname(txt)):
        for ext in VIDEO_EXTS:
            p = os.path.join(folder, stem + ext)
            if os.path.isfile(p):
                return p
    return None


def find_inputs(root: str) -> list[dict]:
    """List pose files under ``root`` with their videos, and videos without one: [{"id", "poses", "video"}] by id."""
    out = []
    for txt in walk_files(root, ".txt"):
        line = _first_line(txt)
        if not line or len(line.split()) != 1:                 # not a camera file (no URL line)
            continue
        out.append({"id": make_id(root, txt), "poses": txt, "video": _find_video(root, txt)})
    stems = {os.path.splitext(os.path.basename(d["poses"]))[0] for d in out}
    txts = {d["poses"] for d in out}
    videos_dir = os.path.join(root, "videos")
    for ext in VIDEO_EXTS:
        for video in walk_files(root, ext):
            stem = os.path.splitext(os.path.basename(video))[0]
            paired = (stem in stems if os.path.dirname(video) == videos_dir
                      else os.path.join(os.path.dirname(video), stem + ".txt") in txts)
            if not paired:                                     # the extension keeps x.mp4 / x.webm apart
                out.append({"id": f"{make_id(root, video)}_{ext[1:]}", "poses": None, "video": video})
    return unique_ids(out, "poses")


def parse_poses(path: str) -> dict:
    """Parse and validate a camera file -> dict(url, ts [P] int64, intr [P,4], dist [P,2], w2c [P,3,4])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pose file not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path} line 1: expected the video URL, found an empty line")
    url = lines[0].strip()
    if len(url.split()) != 1:
        raise ValueError(f"{path} line 1: expected the video URL (one token), found {len(url.split())} fields")
    rows, prev = [], None
    for n, line in enumerate(lines[1:], start=2):                # n = 1-based line number in the file
        if not line.strip():
            continue                                             # blank lines (e.g. trailing) carry nothing
        where = f"{path} line {n}"
        cols = line.split()
        if len(cols) != N_COLS:
            raise ValueError(f"{where}: expected {N_COLS} numbers (timestamp_us fx fy cx cy k1 k2 + 12 of a "
                             f"3x4 world-to-camera matrix), found {len(cols)}")
        try:
            v = np.array([float(c) for c in cols])
        except ValueError:
            bad = next(c for c in cols if not _is_float(c))
            raise ValueError(f"{where}: expected numbers, found {bad!r}") from None
        if not np.isfinite(v).all():
            raise ValueError(f"{where}: expected finite numbers, found {cols[int(np.argmin(np.isfinite(v)))]!r}")
        if v[0] < 0 or v[0] != np.round(v[0]):
            raise ValueError(f"{where}: expected a non-negative integer timestamp in microseconds, found {cols[0]!r}")
        if prev is not None and v[0] <= prev[1]:
            raise ValueError(f"{where}: timestamp {int(v[0])} is not after {int(prev[1])} (line {prev[0]}); "
                             "expected strictly increasing timestamps")
        if v[1] <= 0 or v[2] <= 0:
            raise ValueError(f"{where}: expected positive focal lengths fx, fy, found {cols[1]} {cols[2]}")
        problem = rotation_problem(v[7:].reshape(3, 4)[:, :3])
        if problem:
            raise ValueError(f"{where}: {problem}")
        rows.append(v)
        prev = (n, v[0])
    if not rows:
        raise ValueError(f"{path}: no pose lines after the URL line; expected at least one line of {N_COLS} numbers")
    a = np.stack(rows)                                           # [P, 19]
    return {"url": url, "ts": a[:, 0].astype(np.int64), "intr": a[:, 1:5], "dist": a[:, 5:7],
            "w2c": a[:, 7:].reshape(-1, 3, 4)}


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read(desc: dict) -> dict:
    """Read one clip described by ``find_inputs`` -> validated canonical clip."""
    path = desc.get("poses")
    video = desc.get("video")
    if not path:
        stem = os.path.splitext(os.path.basename(video or "?"))[0]
        raise FileNotFoundError(f"{video}: no camera file for this video; expected {stem}.txt (first line the URL, "
                                f"then one line of {N_COLS} numbers per frame) next to it, or anywhere under the "
                                "input folder for a video in videos/")
    p = parse_poses(path)
    if not video:
        raise FileNotFoundError(f"{path}: no video found for this clip (looked for videos/<clip> and next to "
                                f"the txt with extensions {', '.join(VIDEO_EXTS)})")
    frames, frame_t, period = decode_at(video, p["ts"])
    keep = np.array([f is not None for f in frames])            # [P] pose lines with a frame
    if not keep.any():
        raise ValueError(f"{video}: no decoded frame lies within half a frame period ({period / 2:.0f} us) of any "
                         f"of the {len(keep)} pose timestamps of {path} "
                         f"({p['ts'][0]}..{p['ts'][-1]} us); is this the right video?")
    imgs = [f for f in frames if f is not None]
    H, W = imgs[0].shape[:2]
    if any(f.shape != imgs[0].shape for f in imgs):
        raise ValueError(f"{video}: frame size changes within the video; expected one size {W}x{H}")
    intr = p["intr"][keep]                                      # [T, 4] normalised fx fy cx cy
    w2c = np.zeros((int(keep.sum()), 4, 4))
    w2c[:, :3], w2c[:, 3, 3] = p["w2c"][keep], 1.0
    c2w = np.linalg.inv(w2c)                                    # [T, 4, 4] exact inverse, float64
    ts = p["ts"][keep]
    video_fps = 1e6 / period if period > 0 else None
    fps = 1e6 / float(np.median(np.diff(ts))) if len(ts) > 1 else (video_fps or 30.0)
    dist = np.zeros((len(ts), 4), np.float32)
    dist[:, :2] = p["dist"][keep]
    clip = {
        "frames": np.stack(imgs),                               # [T, H, W, 3]
        "K": intrinsics(intr[:, 0] * W, intr[:, 1] * H, intr[:, 2] * W, intr[:, 3] * H),
        "c2w": c2w.astype(np.float32),
        "fps": float(fps),
        "source": SOURCE,
        "video_id": desc.get("id") or make_id(os.path.dirname(path), path),
        "frame_timestamps_us": ts,
        "missing": p["ts"][~keep],
        "distortion": dist,
        "url": p["url"],
        "video_fps": float(video_fps or fps),
    }
    return validate_clip(clip, name=path)
