"""Process-group set-up for every launcher, and the one-machine launcher behind ``decmem train --nproc N``.

Launchers and what they export:
  torchrun / --nproc      RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  deepspeed launcher      the same, plus ``--local_rank`` on the command line
  SLURM (srun / submitit) SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST (see slurm/)
  nothing                 one process: a private rendezvous on a free loopback port
"""
from __future__ import annotations

import os
import socket
import sys
import warnings
from datetime import timedelta

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_rank_world() -> tuple[int, int, int]:
    """(rank, local_rank, world) from the launcher's environment; (0, 0, 1) when launched alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu (or auto)")
    return device


def init_distributed(device: str, timeout_s: int) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU) -> (rank, local_rank, world)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # read when deepspeed is first imported
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's ZeRO-3 still calls the collectives torch 2.13 renamed; the warning is theirs, once per call
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated. Please use `torch.distributed")
    rank, local_rank, world = env_rank_world()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run: launch with torchrun, the deepspeed "
                               "launcher, `decmem train --nproc N` or `decmem submit`")
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    if device == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if os.environ["MASTER_ADDR"] in ("127.0.0.1", "localhost")
                              else os.environ.get("GLOO_SOCKET_IFNAME", ""))
        if not os.environ["GLOO_SOCKET_IFNAME"]:
            del os.environ["GLOO_SOCKET_IFNAME"]
        # the shared-memory comm op is JIT-compiled (~50 s) on first use; plain gloo is enough here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    return rank, local_rank, world


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``decmem <argv>`` in nproc local processes under torchrun's agent (a dead rank stops the others)."""
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                       "--module", "training.cli", *argv])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(args)
    except Exception as e:  # torchrun's ChildFailedError carries each failed rank's exit code and traceback
        print(f"decmem: training failed: {e}", file=sys.stderr)
        return 1
    return 0
