"""Inference weights: one self-describing folder, ``model.safetensors`` + ``config.yaml``, loaded without pickle.

config.yaml records the sha256 of model.safetensors: a file changed after it was written (corrupted, or values
edited) is refused by name instead of loading silently different weights.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from decmem.model.diffusion import DiffusionArgs
from decmem.model.dit import ModelArgs
from decmem.model.factory import build_model
from decmem.training.config import ConfigError, dump_config, load_config

FORMAT = "decmem-weights/1"


@dataclass
class WeightsConfig:
    """What a weights folder says about itself."""

    format: str = FORMAT
    codec: str = "pixels"                 # how frames became the latents the model was trained on
    frame_hw: list[int] = field(default_factory=lambda: [0, 0])  # frame size the codec was fed (0 = any)
    model: ModelArgs = field(default_factory=ModelArgs)
    diffusion: DiffusionArgs = field(default_factory=DiffusionArgs)
    sha256: str = ""                      # of model.safetensors, written with it ("" in older folders: not checked)


def save_weights(model: nn.Module, out_dir: str, diffusion: DiffusionArgs | None = None, codec: str = "pixels",
                 frame_hw=(0, 0), state_dict: dict | None = None, model_args: ModelArgs | None = None) -> str:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml`` (temporary names, then renamed).

    ``model_args``: the run's model.* (default ``model.args``, a VideoDiT's). For a Wan model it carries
    model.wan.transformer, so the folder rebuilds the network without the pretrained download.
    """
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT})
    cfg = WeightsConfig(codec=codec, frame_hw=list(frame_hw), model=model_args or model.args, diffusion=diffusion or DiffusionArgs(),
                        sha256=file_sha256(tmp))
    dump_config(cfg, os.path.join(out_dir, "config.yaml.tmp"))
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    os.replace(os.path.join(out_dir, "config.yaml.tmp"), os.path.join(out_dir, "config.yaml"))
    return out_dir


def load_weights(weights_dir: str, device="cpu", dtype=torch.float32, overrides=()) -> tuple[nn.Module, WeightsConfig]:
    """Build the model from ``config.yaml`` and load ``model.safetensors`` strictly (no pickle); a Wan model is
    built from the recorded model.wan.transformer, never from the pretrained folder."""
    cfg_path, st_path = os.path.join(weights_dir, "config.yaml"), os.path.join(weights_dir, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"weights folder {weights_dir}: missing {os.path.basename(p)} "
                                    "(expected model.safetensors + config.yaml, as written by save_weights)")
    cfg = load_config(WeightsConfig, cfg_path, overrides)
    if cfg.format != FORMAT:
        raise ConfigError(f"{cfg_path}: format {cfg.format!r} is not {FORMAT!r}")
    model = build_model(cfg.model)
    try:
        sd = load_file(st_path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{st_path}: not a readable safetensors file ({e})") from None
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
              for k in sorted(set(sd) & set(want)) if sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{st_path} does not match the model described by {cfg_path}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            lines.append("  shape mismatches: " + "; ".join(shapes[:8]))
        raise ValueError("\n".join(lines))
    if cfg.sha256:                        # after the structure checks: their messages say more when both fail
        got = file_sha256(st_path)
        if got != cfg.sha256:
            raise ValueError(f"{st_path}: refused: its sha256 {got[:16]}... differs from the one recorded in {cfg_path} "
                             f"when it was written ({cfg.sha256[:16]}...): the file was modified or corrupted since")
    model.load_state_dict(sd, strict=True)
    return model.to(device, dtype).eval(), cfg


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 4 MiB pieces (weights and checkpoint shards can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
