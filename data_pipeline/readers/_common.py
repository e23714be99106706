"""Helpers shared by the source readers: ids, file discovery, npz access, rotation checks, video decoding.

Every error raised here is a ``ValueError`` (or ``FileNotFoundError``) whose message starts with the
file name, so a reader can let it propagate unchanged.
"""
from __future__ import annotations

import os
import re
import zipfile

import av
import numpy as np

ROT_TOL = 1e-3            # max |R R^T - I| accepted for a rotation read from a file
SKIP_DIRS = {"__pycache__"}


# ----------------------------------------------------------------------------- ids and discovery

def make_id(root: str, path: str) -> str:
    """Stable id of ``path`` relative to ``root``: extension dropped, '/' -> '__', '.' -> '_'."""
    rel = os.path.relpath(path, root)
    if rel == ".":                                   # the root itself (e.g. a scene directory)
        rel = os.path.basename(os.path.abspath(root))
    rel = os.path.splitext(rel)[0] if os.path.isfile(path) else rel
    return rel.replace(os.sep, "__").replace("/", "__").replace(".", "_")


def unique_ids(descs: list[dict], key: str) -> list[dict]:
    """``descs`` sorted by id; ValueError naming both inputs if two map to the same id (e.g. a.b / a_b)."""
    descs = sorted(descs, key=lambda d: d["id"])
    for a, b in zip(descs, descs[1:]):
        if a["id"] == b["id"]:
            raise ValueError(f"{a.get(key) or a} and {b.get(key) or b} both map to id {a['id']!r}; "
                             "rename one of them")
    return descs


def walk_files(root: str, suffix: str) -> list[str]:
    """All files under ``root`` whose name ends with ``suffix`` (hidden dirs skipped), sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: input directory not found")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(suffix) and not f.startswith(".")]
    return sorted(out)


def natural_key(s: str) -> list:
    """Sort key comparing digit runs as numbers, so frame_2 sorts before frame_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


# ----------------------------------------------------------------------------- npz

def load_npz(path: str) -> dict:
    """Load every array of an .npz (no pickle) into a dict; errors name the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read .npz ({e})") from e


def get_key(data: dict, key: str, path: str, ndim: int | None = None, last: int | None = None,
            numeric: bool = True) -> np.ndarray:
    """``data[key]`` checked for presence, rank, trailing size and finiteness; errors name file and key."""
    if key not in data:
        raise ValueError(f"{path}: key {key!r} is missing (found keys: {', '.join(sorted(data)) or 'none'})")
    a = data[key]
    if ndim is not None and a.ndim != ndim or last is not None and a.shape[-1] != last:
        want = f"{ndim}-d" + (f" [..., {last}]" if last else "")
        raise ValueError(f"{path}: key {key!r} expected a {want} array, got shape {a.shape}")
    if numeric:
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ValueError(f"{path}: key {key!r} expected numbers, got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{path}: key {key!r} has {int((~np.isfinite(a)).sum())} non-finite values")
    return a


# ----------------------------------------------------------------------------- geometry

def rotation_problem(R: np.ndarray, tol: float = ROT_TOL) -> str | None:
    """None if the 3x3 ``R`` is a proper rotation within ``tol``, else a description of the problem."""
    err = float(np.abs(R @ R.T - np.eye(3)).max())
    if err > tol:
        return f"rotation not orthonormal (max |R R^T - I| = {err:.2e} > {tol:g})"
    det = float(np.linalg.det(R))
    if det <= 0:
        return f"rotation has det {det:.3f} <= 0 (a reflection)"
    return None


def rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Stack rotations [T,3,3] and translations [T,3] into float64 [T,4,4] homogeneous matrices."""
    M = np.zeros((len(R), 4, 4))
    M[:, :3, :3], M[:, :3, 3], M[:, 3, 3] = R, t, 1.0
    return M


def intrinsics(fx, fy, cx, cy) -> np.ndarray:
    """float32 [T,3,3] pinhole matrices from per-frame (or broadcast) fx, fy, cx, cy in pixels."""
    fx, fy, cx, cy = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (fx, fy, cx, cy)))
    K = np.zeros(fx.shape + (3, 3))
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1.0
    return K.astype(np.float32)


# ----------------------------------------------------------------------------- video

def _open(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: video file not found")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot open video ({e})") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: contains no video stream")
    return container


def _frame_time_us(frame) -> float | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return float(frame.pts * frame.time_base * 1_000_000)


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def decode_all(path: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Decode every frame -> (uint8 [T,H,W,3], times_us float64 [T], stream fps or None)."""
    container = _open(path)
    frames, times = [], []
    try:
        stream = container.streams.video[0]
        fps = _rate(stream)
        for i, frame in enumerate(container.decode(stream)):
            t = _frame_time_us(frame)
            times.append(t if t is not None else (i * 1e6 / fps if fps else float(i)))
            frames.append(frame.to_ndarray(format="rgb24"))         # [H, W, 3]
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot decode video after {len(frames)} frames ({e})") from e
    finally:
        container.close()
    if not frames:
        raise ValueError(f"{path}: video decoded to zero frames")
    return np.stack(frames), np.asarray(times), fps


def decode_at(path: str, ts_us: np.ndarray, seek_margin_us: float = 2e6):
    """Nearest decoded frame to each sorted timestamp, accepted within half a frame period.

    Returns (frames: list of uint8 [H,W,3] or None per timestamp, frame_time_us float64 [P] (nan when
    unmatched), period_us). Only frames that are some timestamp's best candidate so far are converted
    to RGB, decoding starts at a key frame before the first timestamp and stops after the last one,
    so a long source video costs neither memory nor a full decode.
    """
    ts = np.asarray(ts_us, dtype=np.float64)
    P = len(ts)
    best_d, best_t = np.full(P, np.inf), np.full(P, np.nan)
    best_f: list = [None] * P
    times: list[float] = []
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _rate(stream)
        # A frame farther than half a period cannot be the accepted match; two nominal periods leave
        # margin for a nominal rate that differs from the real one. Without a rate, every frame counts.
        window = 2e6 / fps if fps else np.inf
        start = ts[0] - seek_margin_us
        if start > 0 and stream.time_base:
            try:                                            # seek lands on a key frame at or before start
                container.seek(int(start / 1e6 / stream.time_base), stream=stream, backward=True)
            except av.error.FFmpegError:
                container.seek(0, stream=stream)
        for frame in container.decode(stream):
            t = _frame_time_us(frame)
            if t is None:
                continue
            times.append(t)
            lo, hi = np.searchsorted(ts, t - window), np.searchsorted(ts, t + window, side="right")
            if lo < hi:
                d = np.abs(ts[lo:hi] - t)                   # [n] distances to nearby timestamps
                better = d < best_d[lo:hi]
                if better.any():
                    rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3], shared by every pose it wins
                    for j in np.nonzero(better)[0]:
                        best_d[lo + j], best_t[lo + j], best_f[lo + j] = d[j], t, rgb
            if t > ts[-1] + window:
                break
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot decode video after {len(times)} frames ({e})") from e
    finally:
        container.close()
    if not times:
        raise ValueError(f"{path}: video decoded to zero frames")
    steps = np.diff(np.unique(np.asarray(times)))
    period = float(np.median(steps)) if len(steps) else (1e6 / fps if fps else 0.0)
    ok = best_d <= period / 2 + 0.5                         # +0.5 us: time bases round timestamps
    frames = [f if k else None for f, k in zip(best_f, ok)]
    best_t[~ok] = np.nan
    return frames, best_t, period
