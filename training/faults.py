"""Fault injection for tests of failure handling, from the environment (it reaches SLURM and torchrun tasks too):

    DECMEM_FAULT=crash:rank=R:step=N            rank R raises at the start of step N
    DECMEM_FAULT=nan:rank=R:step=N[:count=K]    rank R's loss is NaN at steps N .. N+K-1
    DECMEM_FAULT=kill:rank=R:step=N             rank R SIGKILLs itself in the middle of step N (after the
                                                first forward, before backward: the other ranks are inside
                                                ZeRO-3's collectives when it dies)
    DECMEM_FAULT=killsave[:rank=R]:step=N       rank R (every rank when rank is left out) SIGKILLs itself while
                                                saving step N: after DeepSpeed wrote its files into step-N/,
                                                before the trainstate, weights, SHA256SUMS, COMPLETE and ``latest``

A kill prints one line first (``DECMEM_FAULT: rank R (pid P) SIGKILL at step N, t=<unix time>``) so a test can
measure how long the rest of the job takes to notice. Absent, the hooks cost nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import time

KINDS = ("crash", "nan", "kill", "killsave")
USAGE = ("expected crash:rank=R:step=N, nan:rank=R:step=N[:count=K], kill:rank=R:step=N or "
         "killsave[:rank=R]:step=N")
ALL_RANKS = -1


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def parse(spec: str) -> dict:
    kind, *parts = spec.split(":")
    try:
        fields = {k: int(v) for k, v in (p.split("=", 1) for p in parts)}
    except ValueError:
        raise ValueError(f"DECMEM_FAULT={spec!r}: {USAGE}") from None
    needed = {"step"} if kind == "killsave" else {"rank", "step"}
    if kind not in KINDS or not needed <= set(fields) or not set(fields) <= {"rank", "step", "count"}:
        raise ValueError(f"DECMEM_FAULT={spec!r}: {USAGE}")
    return {"kind": kind, "count": 1, "rank": ALL_RANKS, **fields}


_SPEC = parse(os.environ["DECMEM_FAULT"]) if os.environ.get("DECMEM_FAULT") else None


def _hit(kind: str, rank: int, step: int) -> bool:
    s = _SPEC
    return (s is not None and s["kind"] == kind and s["rank"] in (rank, ALL_RANKS)
            and s["step"] <= step < s["step"] + s["count"])


def _sigkill_self(rank: int, step: int) -> None:
    print(f"DECMEM_FAULT: rank {rank} (pid {os.getpid()}) SIGKILL at step {step}, t={time.time():.3f}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail(rank: int, step: int) -> None:
    if _hit("crash", rank, step):
        raise InjectedFault(f"injected fault (DECMEM_FAULT): rank {rank} crashes at step {step}")


def maybe_nan(loss, rank: int, step: int):
    """The loss, or NaN in its place when a nan fault is set for this rank and step."""
    return loss * float("nan") if _hit("nan", rank, step) else loss


def maybe_kill(rank: int, step: int) -> None:
    """Mid-step: a rank lost without a word (OOM killer, node failure)."""
    if _hit("kill", rank, step):
        _sigkill_self(rank, step)


def maybe_kill_in_save(rank: int, step: int) -> None:
    """Mid-save: the job killed while step-N/ holds only part of its files."""
    if _hit("killsave", rank, step):
        _sigkill_self(rank, step)
