"""Rectified flow: x_τ = (1-τ)·x0 + τ·ε, the network predicts v = ε - x0; Euler sampling from τ=1 to 0."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decmem.model.memory import LOCAL


@dataclass
class DiffusionArgs:
    """Training-time noise and inference-time sampling."""

    logit_normal_mean: float = 0.0    # τ = sigmoid(N(mean, std)) (SD3's logit-normal sampling)
    logit_normal_std: float = 1.0
    sample_steps: int = 20            # Euler steps per generated chunk
    shift: float = 1.0                # τ' = shift·τ / (1 + (shift-1)·τ): >1 spends more steps at high noise
    window_dropout: float = 0.0       # training: chance that a target chunk of a sample loses its ALM window, so that
                                      # the loss can only be lowered by what SGM reads from older frames
    memory_noise: float = 0.0         # training: each bank frame is noised to τ_m ~ U(0, memory_noise) and encoded at
                                      # τ_m, so reads learn to cope with imperfect history (at inference: generated)
    action_dropout: float = 0.0       # training: chance that a target chunk of a sample gets the null action (zeros),
                                      # so one network also predicts without actions (what action_cfg needs)
    action_cfg: float = 1.0           # sampling: v = v(null) + s·(v(actions) - v(null)); 1 = no guidance, one pass
                                      # (the paper uses 7.5 on a model trained with action dropout)
    self_history: float = 0.0         # training: chance that a step's history after the first target is the model's
                                      # own rollout (no gradient) instead of the clip's frames; the targets stay the
                                      # clip's frames, so reads learn what a generated bank is worth (exposure bias).
                                      # Measured at 0.5: -2.5 dB on held-out revisits (BENCHMARKS.md, "Over a minute")
    self_history_steps: int = 2       # Euler steps per chunk of that rollout (cost: ~1 step's work at 2)

    def __post_init__(self):
        if not 0.0 <= self.memory_noise < 1.0:
            raise ValueError(f"memory_noise: expected a noise level in [0, 1), got {self.memory_noise}")
        if not 0.0 <= self.action_dropout <= 1.0:
            raise ValueError(f"action_dropout: expected a probability in [0, 1], got {self.action_dropout}")
        if self.action_cfg < 0:
            raise ValueError(f"action_cfg: expected a guidance scale >= 0, got {self.action_cfg}")
        if not 0.0 <= self.window_dropout < 1.0:
            raise ValueError(f"window_dropout: expected a probability in [0, 1), got {self.window_dropout}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps: expected >= 1, got {self.sample_steps}")
        if not 0.0 <= self.self_history <= 1.0:
            raise ValueError(f"self_history: expected a probability in [0, 1], got {self.self_history}")
        if self.self_history_steps < 1:
            raise ValueError(f"self_history_steps: expected >= 1, got {self.self_history_steps}")
        if self.logit_normal_std <= 0 or self.shift <= 0:
            raise ValueError("logit_normal_std: expected > 0" if self.logit_normal_std <= 0 else "shift: expected > 0")


def randn(shape, generator=None, dtype=None, device="cpu") -> torch.Tensor:
    """Normal noise; ``generator`` may be one per sample (a list), so a sample's noise is the same in any batch."""
    return _draw(torch.randn, shape, generator, dtype, device)


def rand(shape, generator=None, dtype=None, device="cpu") -> torch.Tensor:
    """Uniform [0, 1) draws, one or one generator per sample like ``randn``."""
    return _draw(torch.rand, shape, generator, dtype, device)


def _draw(fn, shape, generator, dtype, device) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} per-sample generators for a batch of {shape[0]}")
        return torch.cat([fn((1, *shape[1:]), generator=g, dtype=dtype, device=device) for g in generator])
    return fn(shape, generator=generator, dtype=dtype, device=device)


def sample_tau(n: int, args: DiffusionArgs, generator=None, device="cpu") -> torch.Tensor:
    z = randn((n,), generator, device=device) * args.logit_normal_std + args.logit_normal_mean
    return torch.sigmoid(z)


def rectified_flow_loss(model, latents, K, c2w, chunk_starts, args: DiffusionArgs, actions=None, generator=None,
                        ctx=None, return_stats=False, history=None):
    """Mean-squared velocity error on the target chunks only.

    latents [B, T, C, h, w] (clean), K/c2w [B, T, ...]; chunk_starts: frame index of
    each target chunk. The memory stream encodes frames [0, max start) once; each
    chunk reads only the frames before its own start. ``generator``: one, or a list
    with one per sample (then the loss of a sample does not depend on its batch).
    With ``args.window_dropout`` > 0 each (chunk, sample) first draws whether it keeps
    its ALM window, with ``args.action_dropout`` > 0 whether its actions become the null
    action (the bank's frames keep theirs: the past's actions are known); with ``args.memory_noise`` > 0 every bank frame is first noised. The
    draws come from the same generators, for the whole bank, so every cp rank agrees. ``history`` [B, >= max
    start, ...]: what the memory stream encodes instead of ``latents`` (the model's own rollout, see
    ``model.rollout.self_history``); the targets are always ``latents``.
    """
    B, T = latents.shape[:2]
    C = model.args.chunk_frames
    if not chunk_starts or min(chunk_starts) < 0 or max(chunk_starts) + C > T:
        raise ValueError(f"chunk starts {list(chunk_starts)} must lie in [0, {T - C}] for clips of {T} frames and chunks of {C}")
    last = max(chunk_starts)
    act = (lambda a, b: actions[:, a:b]) if actions is not None else (lambda a, b: None)
    bank = None
    if last:
        # under context parallelism each rank encodes only its shard [lo, hi) of the bank frames
        lo, hi = ctx.shard(last) if ctx is not None else (0, last)
        mem, tau_m = (latents if history is None else history)[:, :last], None
        if args.memory_noise > 0:                   # drawn for every bank frame, then sliced: ranks agree
            tau_m = rand((B, last), generator, latents.dtype, latents.device) * args.memory_noise       # [B, last]
            eps_m = randn(mem.shape, generator, mem.dtype, mem.device)
            mem = (1 - tau_m.view(B, last, 1, 1, 1)) * mem + tau_m.view(B, last, 1, 1, 1) * eps_m
            tau_m = tau_m[:, lo:hi]
        bank = model.encode_memory(mem[:, lo:hi], K[:, lo:hi], c2w[:, lo:hi], lo, act(lo, hi), ctx=ctx, tau=tau_m)
    # every chunk's draws, in chunk order, on every rank: a rank that runs only some chunks (sharded query
    # stream) still consumes the generators exactly as one process does
    draws = []
    for t0 in chunk_starts:
        x0 = latents[:, t0:t0 + C]
        keep = rand((B,), generator, device=x0.device) >= args.window_dropout if args.window_dropout > 0 else None
        a = act(t0, t0 + C)                                                          # [B, C, A] or None
        if a is not None and args.action_dropout > 0:
            a = a * (rand((B,), generator, device=a.device) >= args.action_dropout).view(B, 1, 1).to(a.dtype)
        eps = randn(x0.shape, generator, x0.dtype, x0.device)
        tau = sample_tau(B, args, generator, x0.device).to(x0.dtype)                # [B]
        draws.append((keep, a, eps, tau))
    ctx_ = ctx if ctx is not None else LOCAL
    idle_chunk = min(range(len(chunk_starts)), key=lambda i: chunk_starts[i])     # cheapest: reads the least history
    losses, idle, stats = [], [], {}
    for i in ctx_.query_slots(len(chunk_starts)):
        j = idle_chunk if i is None else i     # a slot without a chunk of its own still joins every collective
        t0, (keep, a, eps, tau) = chunk_starts[j], draws[j]
        x0 = latents[:, t0:t0 + C]
        x_t = (1 - tau.view(B, 1, 1, 1, 1)) * x0 + tau.view(B, 1, 1, 1, 1) * eps
        pred, stats = model(x_t, tau, K[:, t0:t0 + C], c2w[:, t0:t0 + C], t0, bank, a, ctx, return_stats,
                            alm_keep=keep)
        (losses if i is not None else idle).append((pred.float() - (eps - x0).float()).pow(2).mean())
    stats["bank_tokens"] = last * model.layout(*latents.shape[-2:]).tokens
    if ctx is not None:
        stats["cp_bytes"] = ctx.bytes_moved()
        stats["cp_load"] = ctx.load()
    return ctx_.chunk_loss(losses, idle, len(chunk_starts)), stats


def timesteps(args: DiffusionArgs, device="cpu") -> torch.Tensor:
    t = torch.linspace(1.0, 0.0, args.sample_steps + 1, device=device)
    return args.shift * t / (1 + (args.shift - 1) * t)


@torch.no_grad()
def euler_sample(model, shape, K, c2w, chunk_start, bank, args: DiffusionArgs, actions=None, generator=None,
                 device="cpu", dtype=torch.float32, ctx=None, keep_last_input=False):
    """Denoise one chunk from pure noise (τ=1) to data (τ=0) with Euler steps -> ([B, C, C_lat, h, w], last stats).

    ``keep_last_input`` puts the last step's (x, τ) in the returned stats as ``last_input``, so that a caller can
    compute the read statistics (entropy, dispersion) in a forward of its own, outside the sampling. With actions and ``args.action_cfg`` != 1 each step runs a second, null-action forward (same bank) and
    extrapolates from it (classifier-free guidance).
    """
    x = randn(shape, generator, dtype, device)         # one generator, or one per sample
    ts = timesteps(args, device)
    last: dict = {}
    guided = actions is not None and args.action_cfg != 1.0
    for i in range(args.sample_steps):
        tau = ts[i].expand(shape[0]).to(dtype)
        v, last = model(x, tau, K, c2w, chunk_start, bank, actions, ctx)
        if keep_last_input and i == args.sample_steps - 1:
            last["last_input"] = (x, tau)
        if guided:
            v_null, _ = model(x, tau, K, c2w, chunk_start, bank, torch.zeros_like(actions), ctx, False)
            v = v_null + args.action_cfg * (v - v_null)
        x = x + (ts[i + 1] - ts[i]).to(dtype) * v
    return x, last
