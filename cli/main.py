"""``decmem``: the one command-line entry point. Each subcommand is a stage a user can run alone; each group of
subcommands lives in its own module (data, train, evaluate, demo, bench), which adds its parsers here."""
from __future__ import annotations

import argparse
import sys

from decmem.cli import bench, data, demo, evaluate, train
from decmem.training.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="decmem",
        description="DecMem: camera-controlled video world models with sparse global + anchored local memory.",
        epilog="Each subcommand is one stage; `decmem SUBCOMMAND --help` for its options.",
    )
    # the deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is in the environment too)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for group in (bench, data, evaluate, train, demo):
        group.add_parsers(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:            # key=value overrides may follow options (`train CONFIG --nproc 2 train.cp=2`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"decmem: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
