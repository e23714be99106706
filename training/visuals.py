"""TensorBoard visuals the trainer writes on rank 0: retrieval heatmaps and ground-truth vs generated GIFs.

Everything here is a pure function of tensors/arrays except the two ``add_*``
helpers, which only hand finished images to a ``SummaryWriter``. No matplotlib:
the colormap is a handful of hard-coded viridis anchors, and GIFs go through
Pillow and a raw image summary (``SummaryWriter.add_video`` silently does
nothing without ``moviepy<2``, while TensorBoard's images plugin plays GIFs).
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

# Viridis sampled at 8 evenly spaced points: perceptually ordered and readable in greyscale.
_VIRIDIS = np.array([
    [68, 1, 84], [70, 50, 126], [54, 92, 141], [39, 127, 142],
    [31, 161, 135], [74, 193, 109], [160, 218, 57], [253, 231, 37],
], dtype=np.float64)


def retrieval_heatmap(layers: list[dict], chunk_frames: int, blocks_per_frame: int,
                      bank_frames: int) -> np.ndarray:
    """Fraction of each query frame's valid block selections landing in each bank frame: [chunk_frames, bank_frames]."""
    counts = torch.zeros(chunk_frames, bank_frames, dtype=torch.float64)
    for stats in layers:
        if "selected" not in stats:
            continue  # dense / dense_decay layers retrieve nothing
        # stats may live on the GPU; the counting is tiny, so do it on the CPU
        sel, valid = stats["selected"].detach().cpu().long(), stats["selected_valid"].detach().cpu().bool()
        if sel.dim() != 4 or sel.shape != valid.shape:
            raise ValueError(f"selected {tuple(sel.shape)} and selected_valid {tuple(valid.shape)} "
                             "must both be [B, H, n_qb, k]")
        n_qb = sel.shape[2]
        # only valid entries are checked: padding may hold any value (e.g. -1 or a stale index)
        bank_frame = torch.div(sel, blocks_per_frame, rounding_mode="floor")  # [B, H, n_qb, k]
        bad = valid & ((bank_frame >= bank_frames) | (sel < 0))
        if bad.any():
            i = int(sel[bad][0])
            raise ValueError(f"selected bank block {i} (bank frame {i // blocks_per_frame}) is outside "
                             f"bank_frames={bank_frames} with blocks_per_frame={blocks_per_frame}")
        if n_qb == 1:
            # one query group reads for the whole chunk: every query frame shares its row
            row = torch.bincount(bank_frame[valid], minlength=bank_frames).double()  # [bank_frames]
            counts += row.unsqueeze(0)
            continue
        if n_qb % chunk_frames:
            raise ValueError(f"n_qb={n_qb} query blocks do not split evenly into chunk_frames={chunk_frames}")
        qb_per_frame = n_qb // chunk_frames
        q_frame = (torch.arange(n_qb) // qb_per_frame).view(1, 1, n_qb, 1).expand_as(sel)  # [B, H, n_qb, k]
        flat = q_frame[valid] * bank_frames + bank_frame[valid]                     # [n_valid]
        counts += torch.bincount(flat, minlength=chunk_frames * bank_frames).double().view(chunk_frames, bank_frames)
    totals = counts.sum(dim=1, keepdim=True)                                        # [chunk_frames, 1]
    # rows with no valid selection stay all-zero instead of dividing by zero
    return (counts / totals.clamp_min(1)).numpy()


def _colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to viridis RGB uint8 by linear interpolation between the anchors."""
    pos = np.clip(x, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(_VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac                       # [..., 3]
    return np.round(rgb).astype(np.uint8)


def heatmap_image(mat: np.ndarray, cell: int = 8, max_width: int = 1024) -> np.ndarray:
    """Render a 2-D matrix as a viridis image with one cell x cell patch per entry: uint8 [H, W, 3]."""
    mat = np.asarray(mat, dtype=np.float64)
    if mat.ndim != 2:
        raise ValueError(f"heatmap_image needs a 2-D matrix, got shape {mat.shape}")
    rows, cols = mat.shape
    # wide banks would make unreadably large images: shrink cells, but never below one pixel
    cell = max(1, min(cell, max_width // max(cols, 1)))
    peak = mat.max() if mat.size else 0.0
    scaled = mat / peak if peak > 0 else np.zeros_like(mat)  # all-zero -> darkest colour
    rgb = _colormap(scaled)                                                         # [rows, cols, 3]
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)                    # [rows*cell, cols*cell, 3]


def to_rgb_frames(latents: torch.Tensor) -> np.ndarray:
    """Latents/pixels [T, C, h, w] -> uint8 RGB frames [T, h, w, 3] for display."""
    x = latents.detach().float().cpu()
    if x.dim() != 4:
        raise ValueError(f"to_rgb_frames needs [T, C, h, w], got {tuple(x.shape)}")
    C = x.shape[1]
    if C == 3:
        # 3 channels means pixels in [-1, 1]: fixed mapping so brightness is comparable across clips
        img = ((x + 1) * 127.5).clamp(0, 255).round()
    else:
        x = x[:, :3] if C >= 3 else x[:, :1].expand(-1, 3, -1, -1)               # [T, 3, h, w]
        lo, hi = x.min(), x.max()
        # one range for the whole clip so frames stay comparable to each other
        img = torch.full_like(x, 128.0) if hi <= lo else ((x - lo) / (hi - lo) * 255).round()
    return img.permute(0, 2, 3, 1).to(torch.uint8).numpy()                          # [T, h, w, 3]


def side_by_side_gif(gt: np.ndarray, gen: np.ndarray, fps: float = 4.0, scale: int = 2, gap: int = 2) -> bytes:
    """Looping GIF whose frames are [ground truth | white gap | generated], nearest-upscaled by scale."""
    gt, gen = np.asarray(gt), np.asarray(gen)
    if gt.shape != gen.shape or gt.ndim != 4 or gt.shape[-1] != 3 or gt.shape[0] == 0:
        raise ValueError(f"gt {gt.shape} and gen {gen.shape} must be the same non-empty [T, h, w, 3]")
    T, h, w, _ = gt.shape
    white = np.full((T, h, gap, 3), 255, dtype=np.uint8)
    strip = np.concatenate([gt.astype(np.uint8), white, gen.astype(np.uint8)], axis=2)  # [T, h, 2w+gap, 3]
    strip = np.repeat(np.repeat(strip, scale, axis=1), scale, axis=2)                 # [T, h*s, (2w+gap)*s, 3]
    frames = [Image.fromarray(np.ascontiguousarray(f)) for f in strip]
    buf = io.BytesIO()
    # Pillow quantises each frame to its own palette and may merge identical consecutive frames
    # (summing their durations), so playback time is preserved even if the frame count drops
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(1, int(round(1000 / fps))), loop=0)
    return buf.getvalue()


def add_gif(writer, tag: str, gif: bytes, step: int) -> None:
    """Write encoded GIF bytes as a TensorBoard image summary (the images plugin animates them)."""
    with Image.open(io.BytesIO(gif)) as im:
        width, height = im.size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    writer._get_file_writer().add_summary(summary, step)


def add_heatmap(writer, tag: str, mat: np.ndarray, step: int) -> None:
    """Write a matrix as a viridis heatmap image summary."""
    writer.add_image(tag, heatmap_image(mat), step, dataformats="HWC")
