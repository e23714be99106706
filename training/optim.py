"""AdamW and its learning-rate schedule (linear warmup, cosine decay to a floor)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimArgs:
    """AdamW, warmup + cosine, gradient clipping."""

    lr: float = 3e-4
    weight_decay: float = 0.0        # applied to matrices only (not biases)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_steps: int = 100
    lr_min_ratio: float = 0.1        # the cosine ends at lr * lr_min_ratio at train.steps
    grad_clip: float = 1.0           # max global grad norm, 0 = off

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"lr_min_ratio: expected in [0, 1], got {self.lr_min_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay: expected >= 0")


def lr_factor(step: int, args: OptimArgs, total_steps: int) -> float:
    """Multiplier of args.lr at optimizer step ``step`` (0-based): linear warmup, then cosine to lr_min_ratio."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    span = max(1, total_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.lr_min_ratio + (1 - args.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, args: OptimArgs) -> torch.optim.Optimizer:
    """torch AdamW (DeepSpeed wraps it; no fused op to compile on CPU); no decay on 1-d tensors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def build_scheduler(args: OptimArgs, total_steps: int):
    """A callable DeepSpeed gives its wrapped optimizer to; the scheduler then lives in its checkpoints."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args, total_steps))
