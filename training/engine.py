"""The DeepSpeed engine around the model: the trained module, its DeepSpeed config (ZeRO stage, batch sizes,
clipping, precision), building it, and ZeRO-3-aware access to the weights (EMA on each rank's own partition, full
weights gathered one parameter at a time)."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from decmem.model.diffusion import DiffusionArgs, rectified_flow_loss
from decmem.model.factory import build_model as build_network
from decmem.model.factory import same_network
from decmem.model.rollout import self_history
from decmem.training.checkpoint_integrity import CheckpointRefused
from decmem.training.optim import build_optimizer, build_scheduler
from decmem.training.weights import load_weights

#################################################################################
#                      The Trained Module and Its Wrapping                      #
#################################################################################

class TrainModule(nn.Module):
    """The network (DiT or DecMem-Wan) and its objective in one forward, so DeepSpeed's engine (and ZeRO-3's
    hooks) drive every call."""

    def __init__(self, model: nn.Module, diffusion: DiffusionArgs):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, latents, K, c2w, chunk_starts, generators, actions=None, ctx=None, return_stats=False,
                own_history=None):
        # own_history (start, end): the memory stream encodes the model's own rollout of frames [start, end)
        # (DiffusionArgs.self_history). Every rank makes the whole rollout (same noise, no collective of its own);
        # the trainer gives every rank the same span, so ZeRO-3's parameter gathers stay uniform
        history = None
        if own_history is not None:
            history = self_history(self.model, self.diffusion, latents, K, c2w, *own_history, actions, generators)
        return rectified_flow_loss(self.model, latents, K, c2w, chunk_starts, self.diffusion, actions,
                                   generators, ctx, return_stats, history)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block (DiT or Wan) (memory and query stream) in backward instead of keeping its activations.

    Works at every ZeRO stage. Non-reentrant checkpoints keep one autograd graph per step, so a parameter's
    gradient hook fires once per step although a block runs once per stream and chunk (the reentrant form fires it
    once per use, and ZeRO-3 would overwrite the partition's gradient at the second). Under ZeRO-3 the recompute
    gathers the block's weights once more in backward; DeepSpeed >= 0.19.8 (setup.cfg) releases them after it
    without releasing the ones the surrounding backward holds (tests/test_trainer.py checks ZeRO-3 + recompute
    against ZeRO-3 without, every parameter partitioned).
    """
    for block in model.blocks:
        for name in ("forward", "encode_memory"):
            setattr(block, name, functools.partial(checkpoint, getattr(block, name), use_reentrant=False))


def deepspeed_config(cfg, world: int, precision: str) -> dict:
    t = cfg.train
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=t.zero3_persistence)
    return {
        # DeepSpeed's data-parallel group is the whole world: with cp each rank's loss is the full loss and the
        # cp ranks' gradients sum to cp x the true one, so the world average is the dp average (DESIGN §4)
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,         # torch AdamW: nothing to JIT-compile
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_model(cfg) -> nn.Module:
    """The network of ``cfg.model``, identical on every rank (seeded), from ``checkpoint.init_weights`` if set, else
    (Wan) from the pretrained folder ``model.wan.pretrained``."""
    torch.manual_seed(cfg.seed)                     # identical initial weights on every rank
    init = cfg.checkpoint.init_weights
    model = build_network(cfg.model, load_pretrained=cfg.model.backbone == "wan" and not init)
    if init:                                        # holds every tensor: the pretrained folder is not read
        init_from_weights(model, cfg.model, init)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def init_from_weights(model: nn.Module, args, weights_dir: str) -> None:
    try:
        src, wcfg = load_weights(weights_dir)
    except (ValueError, FileNotFoundError) as e:   # a changed or unreadable file: one line, on every rank alike
        err = CheckpointRefused(f"checkpoint.init_weights={weights_dir}: {e}")
        err.on_every_rank = True
        raise err from None
    if not same_network(wcfg.model, args):         # a changed read strategy is allowed: stage 1 -> stage 2
        raise ValueError(f"checkpoint.init_weights={weights_dir}: its model config differs from model.* of this run "
                         "(beyond model.attention's read settings)")
    model.load_state_dict(src.state_dict())


def build_engine(cfg, world: int, precision: str):
    """The model and its objective inside a DeepSpeed engine, with torch AdamW and the LR schedule
    -> (engine, scheduler)."""
    import deepspeed  # after init_distributed set DS_ACCELERATOR, which deepspeed reads once, at its first import

    module = TrainModule(build_model(cfg), cfg.diffusion)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=build_optimizer(module, cfg.optim),
        lr_scheduler=build_scheduler(cfg.optim, cfg.train.steps), config=deepspeed_config(cfg, world, precision),
        dist_init_required=False)
    return engine, scheduler


#################################################################################
#                                   EMA Shards                                  #
#################################################################################

def _local(p):
    """The part of a parameter this rank holds: its ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    """EMA of the weights, kept per rank on the rank's own ZeRO-3 partition (fp32), gathered only to export."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(_local(p).detach().float(), 1 - self.decay)

    def full(self, name: str) -> torch.Tensor:
        """Collective: the whole EMA tensor of one parameter."""
        p, s = self.params[name], self.shadow[name]
        if not hasattr(p, "ds_tensor"):
            return s
        parts = [torch.empty_like(s) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, s.contiguous())
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


def gather_state_dict(module: nn.Module, rank: int, ema: ShardedEMA | None = None, prefix: str = "model.") -> dict:
    """Collective: full fp32 weights of ``module`` (raw or EMA) on rank 0, one parameter at a time."""
    import deepspeed  # after init_distributed set DS_ACCELERATOR, which deepspeed reads once, at its first import

    out = {}
    for name, p in module.named_parameters():
        if ema is not None:
            full = ema.full(name)
        else:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.detach().float().clone() if rank == 0 else None
        if rank == 0:
            out[name[len(prefix):] if name.startswith(prefix) else name] = full.float().cpu()
    return out
