"""``decmem bench WHAT``: one subcommand per benchmark (the benchmarks themselves live in bench/)."""
from __future__ import annotations

import json
import os

from decmem.bench.attention import format_table as attention_table
from decmem.bench.attention import run_attention_bench
from decmem.bench.cp import run_cp_bench
from decmem.bench.data import run_data_bench
from decmem.bench.generate import format_table as generate_table
from decmem.bench.generate import run_generate_bench
from decmem.bench.memory import ablation_table, parse_runs, run_memory_bench
from decmem.bench.memory import format_table as memory_table
from decmem.bench.outputs import write_bench_outputs
from decmem.bench.sp import run_sp_bench
from decmem.bench.train import cli_main as train_bench_main
from decmem.cli.common import add_config_args, int_list, load_run_config, log, sparse_backends, strategies
from decmem.training.config import dump_config


def _dump_config(cfg, json_path) -> None:
    if json_path:
        dump_config(cfg, os.path.splitext(json_path)[0] + ".config.yaml")  # the resolved config behind the rows


def _print_rows(rows, format_table, json_path) -> int:
    print()
    print(format_table(rows))
    if json_path:
        print(f"\nwrote {len(rows)} rows to {json_path}")
    return 0


def cmd_bench_attention(args) -> int:
    cfg = load_run_config(args)
    if args.repeats is not None:
        cfg.bench.repeats = args.repeats
    _dump_config(cfg, args.json)
    rows = run_attention_bench(cfg, args.strategies, args.bank_frames, json_path=args.json, log=log,
                               sparse_backends=args.sparse_backends)
    rc = _print_rows(rows, attention_table, args.json)
    write_bench_outputs("attention", args.json)      # with --json: <stem>.png, <stem>.targets.json, targets table
    return rc


def cmd_bench_generate(args) -> int:
    cfg = load_run_config(args)
    _dump_config(cfg, args.json)
    rows = run_generate_bench(cfg, args.strategies, args.bank_frames, args.json, log=log)
    rc = _print_rows(rows, generate_table, args.json)
    write_bench_outputs("generate", args.json)
    return rc


def cmd_bench_train(args) -> int:
    rc = train_bench_main(load_run_config(args), args, log=log)
    write_bench_outputs("train", args.json)
    return rc


def cmd_bench_memory(args) -> int:
    cfg = load_run_config(args)
    if args.steps is not None:
        cfg.bench_memory.steps = args.steps
    runs = parse_runs(args.strategies, args.variant, args.ablation)
    _dump_config(cfg, args.json)
    rows = run_memory_bench(cfg, runs, args.json, args.jobs, log=log)
    print()
    print(memory_table(rows, cfg.bench_memory.taus, last_only=True))
    if any(r["run"] == "window" for r in rows):
        print()
        print(ablation_table(rows))
    write_bench_outputs("memory", args.json)
    return 0


def cmd_bench_data(args) -> int:
    rows = run_data_bench(load_run_config(args), args.spec, args.clip_frames, args.samples, args.json, log=log,
                          fmt=args.format)
    print()
    for r in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    write_bench_outputs("data", args.json)
    return 0


def cmd_bench_cp(args) -> int:
    run_cp_bench(load_run_config(args), args.cp, args.bank_frames, args.json, log=log)
    if args.json:
        print(f"wrote {args.json}")
    write_bench_outputs("cp", args.json)
    return 0


def cmd_bench_sp(args) -> int:
    run_sp_bench(load_run_config(args), args.clip_frames, args.cp, args.bank_frames, args.json, args.steps, log=log,
                 rounds=args.rounds)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: time components side by side, write JSON + a table",
                           description="Benchmarks that time components side by side in one process.")
    bsub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    att = bsub.add_parser("attention", help="one attention layer per strategy and memory-bank size",
                          description="Time one DecMem attention layer (query stream reading a synthetic bank) "
                                      "for every strategy and bank size; median of repeats, same inputs.")
    att.add_argument("--strategies", type=strategies, default=strategies("decmem,dense,dense_decay,fov_frames,window"),
                     help="comma-separated strategies (default: all)")
    att.add_argument("--bank-frames", type=int_list, default=[8, 32, 128, 512], help="comma-separated bank sizes in frames")
    att.add_argument("--sparse-backends", type=sparse_backends, default=None,
                     help="comma-separated selected-block reads to time for decmem and fov_frames (gather, flex); "
                          "default: model.attention.sparse_backend. Rows other than gather are labelled strategy[backend]")
    att.add_argument("--json", default=None, help="write the result rows as a JSON list to this path")
    att.add_argument("--repeats", type=int, default=None, help="timed repeats per point (overrides bench.repeats)")
    add_config_args(att)
    att.set_defaults(func=cmd_bench_attention)

    gen = bsub.add_parser("generate", help="seconds per generated latent and peak memory vs bank size",
                          description="Stream-generate chunks after a pre-filled memory bank for every strategy and "
                                      "bank size (each point in a fresh process); median seconds per latent, peak RSS.")
    gen.add_argument("--strategies", type=strategies, default=strategies("decmem,dense,window"),
                     help="comma-separated strategies (default: decmem,dense,window)")
    gen.add_argument("--bank-frames", type=int_list, default=[56, 112, 224, 448], help="bank sizes in latent frames")
    gen.add_argument("--json", default=None, help="write the result rows as a JSON list to this path")
    add_config_args(gen)
    gen.set_defaults(func=cmd_bench_generate)

    trn = bsub.add_parser("train", help="training tokens/s and step memory vs bank size; longest bank per memory budget",
                          description="Full training steps (rectified-flow loss, backward, AdamW) of the configured "
                                      "model, one target chunk after a bank of L latent frames, each point in a fresh "
                                      "process: median step time, training tokens/s, the step's own RSS, the peak "
                                      "of live tensors and `decmem train --dry-run`'s estimate of the same step; then the "
                                      "longest bank each strategy fits under --memory-gb (doubling, then bisection).")
    trn.add_argument("--strategies", type=strategies, default=strategies("decmem,dense"),
                     help="comma-separated strategies (default: decmem,dense)")
    trn.add_argument("--bank-frames", type=int_list, default=[16, 32, 64, 128], help="bank sizes in latent frames")
    trn.add_argument("--memory-gb", type=float, default=2.0,
                     help="budget for one training step's own working set (RSS above the pre-step RSS), GiB")
    trn.add_argument("--no-search", action="store_true", help="only the timed points, no memory-fit search")
    trn.add_argument("--steps", type=int, default=3, help="timed steps per point (the median is reported)")
    trn.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    trn.add_argument("--cap", type=int, default=4096, help="longest bank the search tries, in frames")
    trn.add_argument("--timeout", type=float, default=600.0,
                     help="seconds per point; a point that runs longer counts as not fitting")
    trn.add_argument("--json", default=None, help="write the result rows as a JSON list to this path")
    add_config_args(trn)
    trn.set_defaults(func=cmd_bench_train)

    mem = bsub.add_parser("memory", help="the exact-revisit probe: does the model learn to read its memory?",
                          description="Train the configured model per strategy (and variant) on the exact-revisit "
                                      "probe: bank frames of random textures, each with its own camera; the target "
                                      "chunk revisits old bank frames with their cameras. Held-out velocity loss at "
                                      "bench_memory.taus and recall@k of the true source blocks, every "
                                      "bench_memory.eval_every steps.")
    mem.add_argument("--strategies", type=strategies, default=strategies("decmem,dense,window"),
                     help="comma-separated strategies, each trained with the config as is (default: decmem,dense,window)")
    mem.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                     help="one more run: decmem (or model.attention.strategy=...) with these overrides; repeatable")
    mem.add_argument("--ablation", action="store_true",
                     help="add one decmem run per option of the memory recipe switched against the config")
    mem.add_argument("--steps", type=int, default=None, help="training steps per run (overrides bench_memory.steps)")
    mem.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    mem.add_argument("--json", default=None, help="write the rows (every evaluation of every run) to this path")
    add_config_args(mem)
    mem.set_defaults(func=cmd_bench_memory)

    dat = bsub.add_parser("data", help="preprocess frames/s, loader samples/s (local vs S3 on loopback) vs trainer need",
                          description="Preprocess built-in synthetic clips, time the loader from local disk and from a "
                                      "real S3-compatible server on loopback, and time what one training step of the "
                                      "configured model consumes; all in one run.")
    dat.add_argument("--format", default="synthetic", choices=("synthetic", "render"), help="built-in source")
    dat.add_argument("--spec", default="clips=16,frames=128,hw=64x64,seed=0",
                     help="source spec (synthetic: clips=..., render: scenes=...), with hw=HxW")
    dat.add_argument("--clip-frames", type=int, default=16, help="frames per training sample")
    dat.add_argument("--samples", type=int, default=48, help="samples timed per loader run")
    dat.add_argument("--json", default=None)
    add_config_args(dat)
    dat.set_defaults(func=cmd_bench_data)

    cpb = bsub.add_parser("cp", help="bytes moved by context parallelism vs a K/V all-gather, bank memory per rank",
                          description="Run the query read over a bank sharded across cp real processes (gloo) and "
                                      "count bytes moved per layer, per-rank bank memory and selected-block imbalance.")
    cpb.add_argument("--cp", type=int_list, default=[1, 2, 4], help="comma-separated cp sizes")
    cpb.add_argument("--bank-frames", type=int_list, default=[56, 224], help="bank sizes in frames")
    cpb.add_argument("--json", default=None)
    add_config_args(cpb)
    cpb.set_defaults(func=cmd_bench_cp)

    spb = bsub.add_parser("sp", help="sharded vs replicated query stream under cp: step time and bytes per layer",
                          description="Step time of one clip (every chunk a target) at cp=1, cp=2 replicated and cp=2 "
                                      "sharded, and query-stream bytes per layer of both layouts vs a K/V all-gather "
                                      "or ring pass, real processes (gloo).")
    spb.add_argument("--clip-frames", type=int, default=36, help="frames of the timed clip (0: no timing)")
    spb.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    spb.add_argument("--rounds", type=int, default=1,
                     help="run the timed layouts in turn this many times (ratios: median over rounds)")
    spb.add_argument("--cp", type=int_list, default=[2, 4], help="cp sizes of the bytes count")
    spb.add_argument("--bank-frames", type=int_list, default=[56, 224, 448],
                     help="bank sizes of the bytes count (0: no count)")
    spb.add_argument("--json", default=None)
    add_config_args(spb)
    spb.set_defaults(func=cmd_bench_sp)

