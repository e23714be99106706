"""Process-group set-up for every launcher, and the one-machine launcher behind ``decmem train --nproc N``.

Launchers and what they export:
  torchrun / --nproc      RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  deepspeed launcher      the same, plus ``--local_rank`` on the command line
  SLURM (srun / submitit) SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST (see slurm/)
  nothing                 one process: a private rendezvous on a free loopback port
"""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_loopback_group(rank: int, world: int, port: int, timeout_s: float = 120) -> None:
    """A gloo process group on 127.0.0.1:port for processes spawned on this machine (benchmarks, tests).

    The timeout makes a mismatched collective fail instead of hanging."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=timeout_s))


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


def collective_device(group=None) -> torch.device:
    """The device a tensor handed to a collective on ``group`` (default: the world) must live on.

    NCCL registers only CUDA: a CPU tensor there raises "No backend type associated with device type cpu", which
    gloo and one-process runs never show. Backends that take CPU tensors (gloo) get them, so host-made flags and sums
    need no copy.
    """
    if not torch.distributed.is_initialized():
        return torch.device("cpu")
    backend = str(torch.distributed.get_backend(group))
    if "cpu" in torch.distributed.Backend.backend_capability.get(backend, ["cpu"]):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def world_size() -> int:
    """The world's size once torch.distributed is up; 1 before (a one-process run or a tool without a group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1


def gather_objects(obj) -> list:
    """Collective: every rank's ``obj`` (small Python objects), in rank order; also a barrier."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Collective: rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def init_distributed(device: str, timeout_s: int) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU) -> (rank, local_rank, world)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # read when deepspeed is first imported
    import deepspeed  # here, not at the top: only after DS_ACCELERATOR is set (the line above)
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


class RunFailed(RuntimeError):
    """A rank's run ended on a failure it can state in one line (no traceback): ``decmem train`` prints it, exits
    with ``exit_code``."""

    exit_code = 1
    on_every_rank = False        # every rank raised the same message (agreed): only rank 0 prints it


class PeerLost(RunFailed):
    """A collective failed because another rank of the job is gone (killed, crashed): this rank stops too."""

    exit_code = 6                # tells the launcher this rank stopped because of another one (see describe_failures)


# what gloo (and NCCL, with its async error handling) say when the other end of a collective disappeared
_PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


def peer_lost(e: BaseException, rank: int) -> PeerLost | None:
    """A PeerLost in place of a collective's error when that error means another rank died, else None."""
    text = str(e)
    if isinstance(e, RuntimeError) and any(s in text for s in _PEER_LOSS):
        first = text.strip().splitlines()[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]   # gloo's source location, advice
        return PeerLost(f"rank {rank}: another rank of the job is gone ({first[:160]}); stopping. The launcher "
                        "names the rank that failed first.")
    return None


def _consequence(f) -> bool:
    """A rank that stopped because another failed: the launcher SIGTERMed it, or it lost a peer (PeerLost)."""
    return f.exitcode in (-signal.SIGTERM, PeerLost.exit_code)


def describe_failures(failures: dict) -> str:
    """One line from torchrun's per-rank failures: which ranks failed and how, the cause(s) first.

    Ranks that only stopped because another one failed (SIGTERMed by the launcher, or exit code 6: PeerLost) come
    last, as consequences, so the line names the rank that was killed or crashed whichever the agent noticed first.
    """
    def how(f) -> str:
        if f.exitcode < 0:
            try:
                name = signal.Signals(-f.exitcode).name
            except ValueError:
                name = "unknown signal"
            return f"was killed by signal {-f.exitcode} ({name})"
        return f"exited with code {f.exitcode}"

    ranks = sorted(failures)
    causes = [r for r in ranks if not _consequence(failures[r])] or ranks
    others = [r for r in ranks if r not in causes]
    line = "; ".join(f"rank {r} (pid {failures[r].pid}) {how(failures[r])}" for r in causes)
    if others:
        line += "; then " + ", ".join(f"rank {r} (pid {failures[r].pid})" for r in others) + " stopped as a result"
    return line


def failure_exit_code(failures: dict) -> int:
    """The ranks' own exit code when every failed rank (consequences aside) exited with the same one (4: non-finite
    loss, 5: a checkpoint error, ...), else 1 (a signal, or mixed codes)."""
    codes = {f.exitcode for f in failures.values() if not _consequence(f)}
    return codes.pop() if len(codes) == 1 and min(codes, default=0) > 0 else 1


def launch_local(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m <module> <argv>`` (the CLI's module, which passes its own name) in nproc local processes under torchrun's agent (a dead rank stops the others).

    The agent notices a dead worker within its monitor interval (0.1 s) and SIGTERMs the rest; a survivor blocked
    in a collective with the dead rank gets gloo's "connection closed" at once and exits (PeerLost). On failure this
    prints one line naming the rank(s) that failed and how, e.g. ``rank 1 (pid 123) was killed by signal 9
    (SIGKILL)``, instead of the agent's multi-line report.
    """
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                       "--module", module, *argv])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(args)
    except ChildFailedError as e:
        print(f"decmem: training failed: {describe_failures(e.failures)}", file=sys.stderr, flush=True)
        return failure_exit_code(e.failures)
    except Exception as e:  # the agent itself failed (rendezvous, spawning): its own message
        print(f"decmem: training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
