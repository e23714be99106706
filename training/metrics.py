"""Training metrics: reduced across ranks, written by rank 0 to TensorBoard and a console progress bar."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from decmem.training.distributed import collective_device


@dataclass
class LogArgs:
    """What is logged and how often."""

    every_steps: int = 10            # scalars (averaged over all ranks) every N optimizer steps
    heatmap_every: int = 50          # retrieval heatmap image every N steps (0 = off)
    rollout_every: int = 0           # short rollout next to ground truth every N steps (0 = off)
    rollout_frames: int = 8          # latent frames generated per rollout (the rest of the clip is the bank)
    rollout_steps: int = 8           # Euler steps per chunk in those rollouts
    progress: bool = True            # console progress bar on rank 0

    def __post_init__(self):
        for key in ("every_steps", "rollout_frames", "rollout_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)}")
        if self.heatmap_every < 0 or self.rollout_every < 0:
            raise ValueError("heatmap_every / rollout_every: expected >= 0")


class MetricLogger:
    """Per-step scalars accumulated locally, averaged over every rank at log steps, written by rank 0.

    Every rank must call ``log`` at the same steps with the same keys (it all-reduces).
    """

    def __init__(self, args: LogArgs, run_dir: str, rank: int, world: int, total_steps: int, start_step: int):
        self.args, self.rank, self.world = args, rank, world
        self.device = collective_device()               # NCCL reduces only GPU tensors
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)      # per key: a skipped step has no loss or grad norm
        self.writer = self.bar = self.jsonl = None
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            if start_step:
                drop_rows_after(path, start_step)
            self.jsonl = open(path, "a")             # the same numbers, machine-readable

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step or None)
            if args.progress:
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                desc=os.path.basename(run_dir.rstrip("/")) or "train")

    def add(self, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def log(self, step: int) -> dict[str, float]:
        """Mean of each scalar over the steps since the last call and over all ranks; rank 0 writes them."""
        keys = sorted(self.sums)
        vec = [self.sums[k] for k in keys] + [float(self.counts[k]) for k in keys]
        if dist.is_initialized() and self.world > 1:
            summed = torch.tensor(vec, dtype=torch.float64, device=self.device)
            dist.all_reduce(summed)                 # every rank logs the same keys at the same steps
            vec = summed.tolist()                   # one device-to-host read for every key
        n = len(keys)
        means = {k: vec[i] / max(vec[n + i], 1.0) for i, k in enumerate(keys)}
        self.sums.clear()
        self.counts.clear()
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        return means

    def write_line(self, step: int, means: dict[str, float]) -> None:
        if self.jsonl is not None:
            row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in means.items()}
            self.jsonl.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")   # strict JSON: NaN -> null
            self.jsonl.flush()

    def progress(self, step: int, means: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if means:
            self.bar.set_postfix({"loss": f"{means.get('train/loss', float('nan')):.4f}",
                                  "tok/s": f"{means.get('perf/tokens_per_s', 0):.0f}",
                                  "lr": f"{means.get('train/lr', 0):.2e}"}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def drop_rows_after(path: str, step: int) -> int:
    """Remove the rows of steps after ``step`` from a metrics.jsonl -> how many were removed.

    On resume they belong to steps a killed run took after its last checkpoint, which are taken again now: like
    TensorBoard's purge_step, this keeps one row per step. An unreadable (torn last) line is dropped too.
    """
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped
