"""Codecs between video frames (uint8 [T, H, W, 3]) and latent frames (float [T', C, h, w]).

``pixels``: identity up to scaling to [-1, 1]; no weights. ``autoencoder:DIR``: a
diffusers autoencoder saved in DIR (``config.json`` + weights), loaded from the
local path only. Video autoencoders that compress time map 1 + t·n frames to
1 + n latents; latent i then stands for frame i·t (its camera is that frame's).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch


class PixelCodec:
    """Identity codec: frames scaled to [-1, 1], one latent per frame."""

    name = "pixels"
    temporal = 1
    spatial = 1

    def __init__(self, channels: int = 3):
        self.channels = channels

    def latent_frames(self, n_frames: int) -> int:
        return n_frames

    def frame_index(self, latent_index: int) -> int:
        return latent_index

    def encode(self, frames) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in [-1, 1]."""
        x = torch.as_tensor(np.asarray(frames))
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {tuple(x.shape)} {x.dtype}")
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """float [T, 3, H, W] -> uint8 [T, H, W, 3]."""
        x = ((latents.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()


class AutoencoderCodec:
    """A diffusers autoencoder from a local directory (image or video; with or without time compression)."""

    name = "autoencoder"

    def __init__(self, path: str, device="cpu", dtype=torch.float32):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"autoencoder codec: {cfg_path} not found (expected a diffusers save_pretrained folder)")
        with open(cfg_path) as f:
            cfg = json.load(f)
        import diffusers

        cls_name = cfg.get("_class_name")
        cls = getattr(diffusers, cls_name or "", None)
        if cls is None:
            raise ValueError(f"{cfg_path}: _class_name={cls_name!r} is not a diffusers autoencoder class")
        self.path, self.device, self.dtype = path, torch.device(device), dtype
        self.vae = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype,
                                       low_cpu_mem_usage=False).to(self.device).eval()
        self.video = cls_name in ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo",
                                  "AutoencoderKLHunyuanVideo", "AutoencoderKLMochi")
        self.temporal, self.spatial = _compression(cls_name, cfg)
        self.channels = cfg.get("z_dim") or cfg.get("latent_channels")
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None and len(mean) == len(std) == self.channels:
            self.shift = torch.tensor(mean).view(1, -1, 1, 1)
            self.scale = 1.0 / torch.tensor(std).view(1, -1, 1, 1)
        else:
            self.shift = torch.tensor(float(cfg.get("shift_factor") or 0.0)).view(1, 1, 1, 1)
            self.scale = torch.tensor(float(cfg.get("scaling_factor") or 1.0)).view(1, 1, 1, 1)

    def latent_frames(self, n_frames: int) -> int:
        return 1 + (n_frames - 1) // self.temporal

    def frame_index(self, latent_index: int) -> int:
        return latent_index * self.temporal

    def check_frames(self, n_frames: int) -> None:
        if self.temporal > 1 and (n_frames - 1) % self.temporal:
            lo = 1 + (n_frames - 1) // self.temporal * self.temporal
            raise ValueError(f"{self.path}: this autoencoder compresses time {self.temporal}x and takes 1 + "
                             f"{self.temporal}·n frames; got {n_frames} (use {lo})")

    @torch.no_grad()
    def encode(self, frames) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> normalised latents [T', C, h, w] (distribution mode: deterministic)."""
        x = PixelCodec().encode(frames).to(self.device, self.dtype)                    # [T, 3, H, W]
        self.check_frames(x.shape[0])
        if self.video:
            z = self.vae.encode(x.permute(1, 0, 2, 3).unsqueeze(0)).latent_dist.mode()  # [1, C, T', h, w]
            z = z[0].permute(1, 0, 2, 3)                                                # [T', C, h, w]
        else:
            z = self.vae.encode(x).latent_dist.mode()                                  # [T, C, h, w]
        return ((z.float() - self.shift.to(z.device)) * self.scale.to(z.device)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [T', C, h, w] -> uint8 [T, H, W, 3] (T = 1 + t·(T'-1) for video autoencoders)."""
        z = (latents.to(self.device).float() / self.scale.to(self.device) + self.shift.to(self.device)).to(self.dtype)
        if self.video:
            x = self.vae.decode(z.permute(1, 0, 2, 3).unsqueeze(0)).sample[0].permute(1, 0, 2, 3)  # [T, 3, H, W]
        else:
            x = self.vae.decode(z).sample
        return PixelCodec().decode(x)


def _compression(cls_name: str, cfg: dict) -> tuple[int, int]:
    """(temporal, spatial) compression factors from a diffusers autoencoder config."""
    if cls_name == "AutoencoderKLWan":
        return 2 ** sum(bool(t) for t in cfg.get("temperal_downsample", [False, True, True])), \
            2 ** (len(cfg.get("dim_mult", [1, 2, 4, 4])) - 1)
    if cls_name == "AutoencoderKLCogVideoX":
        return int(cfg.get("temporal_compression_ratio", 4)), 2 ** (len(cfg["block_out_channels"]) - 1)
    if "block_out_channels" in cfg:
        return 1, 2 ** (len(cfg["block_out_channels"]) - 1)
    raise ValueError(f"cannot tell the compression of a {cls_name}; supported: AutoencoderKL, AutoencoderKLWan, "
                     "AutoencoderKLCogVideoX")


def make_codec(spec: str, device="cpu", dtype=torch.float32):
    """'pixels' or 'autoencoder:DIR' -> a codec object."""
    if spec == "pixels":
        return PixelCodec()
    if spec.startswith("autoencoder:"):
        return AutoencoderCodec(spec.split(":", 1)[1], device, dtype)
    raise ValueError(f"codec: expected 'pixels' or 'autoencoder:DIR', got {spec!r}")
