"""Clip transforms for preprocessing: frame-rate subsampling, centre-crop + resize with K kept exact, segmenting."""
from __future__ import annotations

import numpy as np
from PIL import Image


def subsample_fps(clip: dict, fps: float | None) -> dict:
    """Keep every k-th frame so the clip plays at about ``fps`` (never upsamples)."""
    src = float(clip.get("fps") or 0)
    if not fps or not src or fps >= src:
        return clip
    step = max(1, int(round(src / fps)))
    out = _take(clip, np.arange(0, clip["frames"].shape[0], step))
    out["fps"] = src / step
    return out


def resize_clip(clip: dict, hw: tuple[int, int] | None) -> dict:
    """Centre-crop to the target aspect ratio, then resize; K follows the crop and the scale exactly."""
    if hw is None:
        return clip
    H, W = clip["frames"].shape[1:3]
    th, tw = hw
    if (H, W) == (th, tw):
        return clip
    # largest centred crop with the target aspect ratio
    if W * th > H * tw:
        ch, cw = H, int(round(H * tw / th))
    else:
        ch, cw = int(round(W * th / tw)), W
    y0, x0 = (H - ch) // 2, (W - cw) // 2
    frames = np.stack([np.asarray(Image.fromarray(f[y0:y0 + ch, x0:x0 + cw]).resize((tw, th), Image.BICUBIC))
                       for f in clip["frames"]])                                     # [T, th, tw, 3]
    K = clip["K"].astype(np.float64).copy()                                          # [T, 3, 3]
    K[:, 0, 2] -= x0
    K[:, 1, 2] -= y0
    sx, sy = tw / cw, th / ch
    K[:, 0, :] *= sx                                                                 # pixel-centre convention:
    K[:, 1, :] *= sy                                                                 # u' + .5 = (u + .5) * s
    out = dict(clip, frames=frames, K=K.astype(np.float32))
    if "depth" in clip:
        out["depth"] = np.stack([np.asarray(Image.fromarray(d[y0:y0 + ch, x0:x0 + cw].astype(np.float32))
                                            .resize((tw, th), Image.NEAREST)) for d in clip["depth"]]).astype(np.float16)
    return out


def segments(n_frames: int, segment_frames: int | None, min_frames: int = 1) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of ``segment_frames``; a shorter tail is kept if >= min_frames."""
    if not segment_frames or segment_frames >= n_frames:
        return [(0, n_frames)] if n_frames >= min_frames else []
    out = [(s, min(s + segment_frames, n_frames)) for s in range(0, n_frames, segment_frames)]
    return [(a, b) for a, b in out if b - a >= min_frames]


def take_frames(clip: dict, a: int, b: int) -> dict:
    return _take(clip, np.arange(a, b))


PER_SCENE = ("object_names", "object_positions", "object_sizes", "maze_layout")  # not indexed by frame


def _take(clip: dict, idx: np.ndarray) -> dict:
    T = clip["frames"].shape[0]
    out = {}
    for k, v in clip.items():
        per_frame = isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == T and k not in PER_SCENE
        out[k] = v[idx] if per_frame else v
    base = clip.get("frame_indices")
    out["frame_indices"] = (np.asarray(base)[idx] if base is not None else idx).astype(np.int64)
    return out
