"""Streaming long-video generation: chunk by chunk along a camera path, each finished chunk encoded into the bank once."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from decmem.model.bank import MemoryBank
from decmem.model.diffusion import DiffusionArgs, euler_sample


@dataclass
class Rollout:
    """Generated latents with their timing (and, with keep_stats, the memory read's dispersion)."""

    latents: torch.Tensor                                 # [B, N + M, C, h, w]: init frames then generated ones
    init_frames: int
    chunk_seconds: list[float] = field(default_factory=list)
    chunk_frames: list[int] = field(default_factory=list)
    attended_tokens: list[int] = field(default_factory=list)
    bank: MemoryBank | None = None
    # per chunk: (chunk_start, [(selected [B, H, G, k], valid [B, H, G, k]) per layer]) of its last denoising step
    selections: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    # per generated latent (batch element 0), from its chunk's last denoising step: attention mass on keys of
    # weight < 0.02 / > 0.05 in the memory read (mean over layers, heads and the frame's tokens)
    dispersion_low: list[float] = field(default_factory=list)
    dispersion_high: list[float] = field(default_factory=list)

    def seconds_per_latent(self) -> list[float]:
        """Per generated latent frame: its chunk's wall time (sampling + encoding) / frames kept."""
        return [s / n for s, n in zip(self.chunk_seconds, self.chunk_frames) for _ in range(n)]


@torch.no_grad()
def rollout(model, args: DiffusionArgs, init_latents, K, c2w, n_new: int, actions=None, generator=None,
            gt_latents=None, teacher_forcing: bool = False, bank: MemoryBank | None = None, on_chunk=None,
            keep_selections: bool = False, keep_stats: bool = False) -> Rollout:
    """Generate n_new latent frames after init_latents [B, N, C, h, w] along cameras K/c2w [B, >= N + n_new, ...].

    The bank starts from the N given frames (or from ``bank`` when resuming a
    paused rollout) and grows by one memory-stream encode of each chunk. With
    teacher_forcing the bank takes the ground-truth chunk (gt_latents) instead
    of the generated one: a diagnostic of how well the model reads its memory.
    keep_selections records which bank blocks each chunk read (for recall@k); keep_stats the dispersion of
    each generated frame's read (one more forward at its chunk's last denoising step's input computes the read
    statistics; chunk_seconds leave it out).
    """
    B, N = init_latents.shape[:2]
    C = model.args.chunk_frames
    total = N + n_new
    if K.shape[1] < total or c2w.shape[1] < total:
        raise ValueError(f"camera path has {min(K.shape[1], c2w.shape[1])} frames, need {total} (init {N} + new {n_new})")
    if teacher_forcing and (gt_latents is None or gt_latents.shape[1] < total):
        raise ValueError("teacher_forcing needs gt_latents covering every generated frame")
    dev, dt = init_latents.device, init_latents.dtype
    act = (lambda a, b: actions[:, a:b]) if actions is not None else (lambda a, b: None)
    if bank is None:
        bank = model.encode_memory(init_latents, K[:, :N], c2w[:, :N], 0, act(0, N)) if N else None
    out = [init_latents]
    res = Rollout(init_latents, N, bank=bank)
    t = N if bank is None else bank.frame_offset + bank.frames
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    while t < total:
        sync()                                                         # time the chunk, not queued GPU work
        start = time.perf_counter()
        idx = torch.arange(t, t + C).clamp(max=K.shape[1] - 1)        # past the path's end: hold the last camera
        Kc, cc = K[:, idx], c2w[:, idx]
        ac = actions[:, idx] if actions is not None else None
        x, stats = euler_sample(model, (B, C, *init_latents.shape[2:]), Kc, cc, t, bank, args, ac, generator, dev, dt,
                                keep_last_input=keep_stats)
        sync()
        seconds = time.perf_counter() - start
        if keep_stats:
            # the read statistics: one more forward at the last step's input, outside the chunk's time (they cost
            # about as much again as the memory read; a diagnostic is not generation)
            x_in, tau = stats.pop("last_input")
            stats = model(x_in, tau, Kc, cc, t, bank, ac, None, True)[1]
        start = time.perf_counter()
        keep = min(C, total - t)
        new = gt_latents[:, t:t + keep].to(dev, dt) if teacher_forcing else x[:, :keep]
        enc = model.encode_memory(new, Kc[:, :keep], cc[:, :keep], t, act(t, t + keep), past=bank)
        if bank is None:
            bank = enc
        else:
            bank.append(enc)
        out.append(x[:, :keep])
        sync()
        res.chunk_seconds.append(seconds + time.perf_counter() - start)
        res.chunk_frames.append(keep)
        res.attended_tokens.append(int(stats["attended_tokens"]))
        if keep_selections:
            res.selections.append((t, [(s["selected"].cpu(), s["selected_valid"].cpu())
                                       for s in stats.get("layers", []) if "selected" in s]))
        if keep_stats:
            res.dispersion_low += stats["dispersion_low"][0, :keep].tolist()              # [keep]
            res.dispersion_high += stats["dispersion_high"][0, :keep].tolist()
        t += keep
        if on_chunk is not None:
            on_chunk(t - N, n_new, res)
    res.latents, res.bank = torch.cat(out, dim=1), bank
    return res



@torch.no_grad()
def self_history(model, args: DiffusionArgs, latents, K, c2w, start: int, end: int, actions=None,
                 generator=None) -> torch.Tensor:
    """A training clip's frames [0, end) as the model itself would have made them -> [B, end, C, h, w].

    Frames before ``start`` are the clip's own (what a rollout's bank starts from); frames [start, end) are
    generated chunk by chunk with ``args.self_history_steps`` Euler steps, each chunk reading the bank built so
    far, as ``rollout`` does. Training on it (``DiffusionArgs.self_history``) shows the reads the bank they meet
    at inference, which holds generated frames, not ground truth.
    """
    if end <= start:
        return latents[:, :end]
    sampling = DiffusionArgs(**{**vars(args), "sample_steps": args.self_history_steps, "action_cfg": 1.0})
    return rollout(model, sampling, latents[:, :start], K, c2w, end - start, actions, generator).latents
