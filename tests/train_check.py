"""Worker for multi-process trainer checks: explicit micro-batches through the real engine, weights out.

The layout and gradient-accumulation tests give every rank exactly the
samples it should hold (the loader's own dp split would give a different
global batch per layout), take real DeepSpeed optimizer steps, and write the
gathered weights for comparison with another layout.
"""
from __future__ import annotations

import os

import torch


def run_steps(rank: int, world: int, port: int, config: str, overrides: list[str], steps: list[list[list[dict]]],
              out_path: str) -> None:
    """steps[i][rank] = the micro-batches rank takes in optimizer step i; rank 0 saves the final weights."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from decmem.training.config import load_config
    from decmem.training.distributed import init_distributed
    from decmem.training.engine import gather_state_dict
    from decmem.training.run_config import RunConfig
    from decmem.training.trainer import Trainer

    cfg = load_config(RunConfig, config, overrides)
    init_distributed("cpu", 120)
    try:
        trainer = Trainer(cfg, rank, world, "cpu")
        losses, norms = [], []
        for per_rank in steps:
            scalars, _ = trainer.train_step(per_rank[rank])
            losses.append(scalars["train/loss"])
            norms.append(scalars["train/grad_norm"])
        # ZeRO-3 splits a parameter over the ranks unless it is under train.zero3_persistence elements
        partitioned = sum(not getattr(p, "ds_persist", True) for p in trainer.engine.module.parameters())
        sd = gather_state_dict(trainer.engine.module, rank)
        if rank == 0:
            torch.save({"weights": sd, "losses": losses, "grad_norms": norms, "partitioned": partitioned}, out_path)
    finally:
        dist.destroy_process_group()
