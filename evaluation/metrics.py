"""The image metrics of every evaluation (``decmem generate``, ``score``, ``eval``, the trainer's images):
PSNR, SSIM and (when its weights are cached) LPIPS, on uint8 RGB frames."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_CAP = 100.0     # dB for identical frames: a finite value keeps JSON valid


def psnr_frames(gt: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """PSNR [N] in dB of uint8 frames [N, ...] on 0..255, capped at PSNR_CAP for identical frames."""
    gt, gen = np.asarray(gt), np.asarray(gen)
    n = gt.shape[0]
    mse = ((gt.astype(np.float64) - gen.astype(np.float64)) ** 2).reshape(n, -1).mean(axis=1)     # [N]
    with np.errstate(divide="ignore"):
        out = np.where(mse <= 255.0 ** 2 * 1e-10, PSNR_CAP, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-300)))
    return out.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (one frame), capped as :func:`psnr_frames`."""
    return float(psnr_frames(np.asarray(a)[None], np.asarray(b)[None])[0])


def frame_metrics(gt: np.ndarray, gen: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (psnr [N] dB on 0..255, capped at 100 for identical frames; ssim [N], torchmetrics' gaussian
    11/1.5 SSIM with data_range 255, averaged over RGB) of uint8 [N,H,W,3] frames."""
    gt, gen = np.asarray(gt), np.asarray(gen)
    if gt.shape != gen.shape or gt.ndim != 4 or gt.shape[-1] != 3:
        raise ValueError(f"frame_metrics: expected two uint8 [N,H,W,3] arrays of one shape, "
                         f"got {gt.shape} and {gen.shape}")
    n = gt.shape[0]
    ssim = np.empty(n, dtype=np.float64)
    for s in range(0, n, batch):
        a = torch.from_numpy(gt[s:s + batch]).permute(0, 3, 1, 2).double()         # [b, 3, H, W]
        b = torch.from_numpy(gen[s:s + batch]).permute(0, 3, 1, 2).double()
        ssim[s:s + batch] = structural_similarity_index_measure(b, a, data_range=255.0, reduction="none").numpy()
    return psnr_frames(gt, gen), ssim


def lpips_fn():
    """(per-frame LPIPS function or None, why not). Never downloads: the AlexNet weights must be cached."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "unavailable: torchvision is not installed (LPIPS needs its AlexNet; weights are never downloaded)"
    ckpt = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.isfile(ckpt):
        return None, f"unavailable: AlexNet weights not in the local torch hub cache ({ckpt}); never downloaded"
    # torchmetrics' LPIPS module imports torchvision at import time: imported only once torchvision is known present
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity as lp

    def fn(gt, gen):
        a = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 127.5 - 1
        b = torch.from_numpy(gen).permute(0, 3, 1, 2).float() / 127.5 - 1
        return np.array([float(lp(b[i:i + 1], a[i:i + 1], net_type="alex")) for i in range(a.shape[0])])
    return fn, f"computed (torchmetrics, AlexNet from {ckpt})"
