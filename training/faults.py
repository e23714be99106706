"""Fault injection for tests of failure handling: ``DECMEM_FAULT=crash:rank=R:step=N`` makes rank R raise at step N.

Read once from the environment (it reaches SLURM and torchrun tasks with the rest of it); absent, it costs nothing.
"""
from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def parse(spec: str) -> dict:
    kind, *parts = spec.split(":")
    if kind != "crash":
        raise ValueError(f"DECMEM_FAULT={spec!r}: expected crash:rank=R:step=N")
    try:
        fields = {k: int(v) for k, v in (p.split("=", 1) for p in parts)}
    except ValueError:
        raise ValueError(f"DECMEM_FAULT={spec!r}: expected crash:rank=R:step=N") from None
    if set(fields) != {"rank", "step"}:
        raise ValueError(f"DECMEM_FAULT={spec!r}: expected crash:rank=R:step=N")
    return {"kind": kind, **fields}


_SPEC = parse(os.environ["DECMEM_FAULT"]) if os.environ.get("DECMEM_FAULT") else None


def maybe_fail(rank: int, step: int) -> None:
    if _SPEC is not None and _SPEC["rank"] == rank and _SPEC["step"] == step:
        raise InjectedFault(f"injected fault (DECMEM_FAULT): rank {rank} crashes at step {step}")
