"""Argument types and helpers every subcommand group shares."""
from __future__ import annotations

import argparse
import sys

from decmem.model.attention import STRATEGIES
from decmem.model.block_sparse import SPARSE_BACKENDS
from decmem.training.config import load_config
from decmem.training.run_config import RunConfig


def int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got '{s}'")
    return vals


def strategies(s: str) -> list[str]:
    vals = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in vals if v not in STRATEGIES]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown strategy {bad or s!r}; expected a comma-separated subset of {','.join(STRATEGIES)}")
    return vals


def sparse_backends(s: str) -> list[str]:
    vals = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in vals if v not in SPARSE_BACKENDS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown sparse backend {bad or s!r}; expected a comma-separated subset of "
                                         f"{','.join(SPARSE_BACKENDS)}")
    return vals


ALL_STRATEGIES = ",".join(STRATEGIES)


def add_config_args(p) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML run config (configs/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.attention.top_k=8")


def load_run_config(args) -> RunConfig:
    return load_config(RunConfig, args.config, args.overrides)


def fail(message: str, code: int = 2) -> int:
    """Report a user-facing error in one line (no traceback) and return the exit code."""
    print(f"decmem: {message}", file=sys.stderr)
    return code


def log(s: str) -> None:
    print(s, flush=True)
