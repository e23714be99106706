"""Every tensor the training job hands to a collective lives on the process group's device (issue #19).

Under NCCL (every multi-GPU run) a CPU tensor in a collective raises "No backend type associated with device type
cpu" at the first step; gloo and one-GPU runs never show it. A real 2-rank training (gloo, CPU) declares its
collective device as cuda:0 and records the device of every tensor decmem code passes to a collective
(tests/collective_check.py explains how).
"""
from __future__ import annotations

import json
import os

import torch.multiprocessing as mp

from decmem.training.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "debug.yaml")


def _entry(rank, world, port, config, overrides, out_dir):
    from collective_check import run_rank

    run_rank(rank, world, port, config, overrides, out_dir)


def test_collectives_use_the_declared_cuda_device(tmp_path, data):
    # train.ema=0 and cp=1: EMA shards and the cp collectives carry the engine's own tensors, which are on the
    # compute device (the CPU in this run, the GPU in a CUDA run); this checks the tensors the job makes itself
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.data={data}", "train.steps=2", "train.ema=0", "train.cp=1",
                 "log.every_steps=1", "log.heatmap_every=0", "log.progress=false", "checkpoint.every_steps=2"]
    world = 2
    mp.start_processes(_entry, args=(world, free_port(), CONFIG, overrides, str(tmp_path)), nprocs=world,
                       start_method="spawn", join=True)
    records = []
    for rank in range(world):
        with open(tmp_path / f"rank-{rank}.json") as f:
            got = json.load(f)
        assert got["outcome"] == "done"
        records += got["records"]
    sites = sorted({r["site"] for r in records})
    # the loss-finiteness agreement, the stop/save agreement and the metric means at least: not a vacuous pass
    assert len(sites) >= 3, f"too few collective call sites recorded: {sites}"
    wrong = sorted({f"{r['site']} {r['op']} on {r['devices']}" for r in records
                    if not r["devices"] or any(d != "cuda:0" for d in r["devices"])})
    assert not wrong, "collectives handed tensors off the process group's device (cuda:0):\n  " + "\n  ".join(wrong)


def test_collective_device_follows_the_backend(monkeypatch):
    """NCCL -> the current GPU; gloo, or a group with a CPU backend beside NCCL -> the CPU; no process group -> CPU."""
    import torch
    import torch.distributed as dist

    from decmem.training.distributed import collective_device

    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, expected in (("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device() == torch.device(expected), backend
