"""Fault injection for tests of failure handling, from the environment (it reaches SLURM and torchrun tasks too):

    DECMEM_FAULT=crash:rank=R:step=N            rank R raises at step N
    DECMEM_FAULT=nan:rank=R:step=N[:count=K]    rank R's loss is NaN at steps N .. N+K-1

Absent, it costs nothing.
"""
from __future__ import annotations

import os

KINDS = ("crash", "nan")
USAGE = "expected crash:rank=R:step=N or nan:rank=R:step=N[:count=K]"


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def parse(spec: str) -> dict:
    kind, *parts = spec.split(":")
    try:
        fields = {k: int(v) for k, v in (p.split("=", 1) for p in parts)}
    except ValueError:
        raise ValueError(f"DECMEM_FAULT={spec!r}: {USAGE}") from None
    if kind not in KINDS or not {"rank", "step"} <= set(fields) or not set(fields) <= {"rank", "step", "count"}:
        raise ValueError(f"DECMEM_FAULT={spec!r}: {USAGE}")
    return {"kind": kind, "count": 1, **fields}


_SPEC = parse(os.environ["DECMEM_FAULT"]) if os.environ.get("DECMEM_FAULT") else None


def _hit(kind: str, rank: int, step: int) -> bool:
    s = _SPEC
    return s is not None and s["kind"] == kind and s["rank"] == rank and s["step"] <= step < s["step"] + s["count"]


def maybe_fail(rank: int, step: int) -> None:
    if _hit("crash", rank, step):
        raise InjectedFault(f"injected fault (DECMEM_FAULT): rank {rank} crashes at step {step}")


def maybe_nan(loss, rank: int, step: int):
    """The loss, or NaN in its place when a nan fault is set for this rank and step."""
    return loss * float("nan") if _hit("nan", rank, step) else loss
