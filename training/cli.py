"""``decmem``: the one command-line entry point. Each subcommand is a stage a user can run alone."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from training.config import ConfigError, dump_config, load_config


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got '{s}'")
    return vals


def _strategies(s: str) -> list[str]:
    from model.attention import STRATEGIES

    vals = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in vals if v not in STRATEGIES]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown strategy {bad or s!r}; expected a comma-separated subset of {','.join(STRATEGIES)}")
    return vals


def _add_config_args(p):
    p.add_argument("--config", "-c", default=None, help="YAML run config (configs/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.attention.top_k=8")


def _load(args):
    from training.run_config import RunConfig

    return load_config(RunConfig, args.config, args.overrides)


#################################################################################
#                                  Subcommands                                  #
#################################################################################

def cmd_bench_attention(args) -> int:
    from training.bench_attention import format_table, run_attention_bench
    from training.plots import write_bench_outputs

    cfg = _load(args)
    if args.repeats is not None:
        cfg.bench.repeats = args.repeats
    if args.json:
        dump_config(cfg, os.path.splitext(args.json)[0] + ".config.yaml")  # the resolved config behind the rows
    rows = run_attention_bench(cfg, args.strategies, args.bank_frames, json_path=args.json,
                               log=lambda s: print(s, flush=True))
    rc = _print_rows(rows, format_table, args.json)
    write_bench_outputs("attention", args.json)      # with --json: <stem>.png, <stem>.targets.json, targets table
    return rc


def _print_rows(rows, format_table, json_path) -> int:
    print()
    print(format_table(rows))
    if json_path:
        print(f"\nwrote {len(rows)} rows to {json_path}")
    return 0


def cmd_bench_generate(args) -> int:
    from training.bench_generate import format_table, run_generate_bench
    from training.plots import write_bench_outputs

    cfg = _load(args)
    if args.json:
        dump_config(cfg, os.path.splitext(args.json)[0] + ".config.yaml")
    rows = run_generate_bench(cfg, args.strategies, args.bank_frames, args.json, log=lambda s: print(s, flush=True))
    rc = _print_rows(rows, format_table, args.json)
    write_bench_outputs("generate", args.json)
    return rc


def cmd_bench_train(args) -> int:
    from training.bench_train import cli_main
    from training.plots import write_bench_outputs

    rc = cli_main(_load(args), args, log=lambda s: print(s, flush=True))
    write_bench_outputs("train", args.json)
    return rc


def cmd_bench_memory(args) -> int:
    from training.bench_memory import ablation_table, format_table, parse_runs, run_memory_bench
    from training.plots import write_bench_outputs

    cfg = _load(args)
    if args.steps is not None:
        cfg.bench_memory.steps = args.steps
    runs = parse_runs(args.strategies, args.variant, args.ablation)
    if args.json:
        dump_config(cfg, os.path.splitext(args.json)[0] + ".config.yaml")
    rows = run_memory_bench(cfg, runs, args.json, args.jobs, log=lambda s: print(s, flush=True))
    print()
    print(format_table(rows, cfg.bench_memory.taus, last_only=True))
    if any(r["run"] == "window" for r in rows):
        print()
        print(ablation_table(rows))
    write_bench_outputs("memory", args.json)
    return 0


def cmd_generate(args) -> int:
    from training.generate import generate

    summary = generate(args.weights, args.clip, args.init_frames, args.frames, args.out, args.strategy, args.steps,
                       args.seed, args.device, args.teacher_forcing, args.save_bank, overrides=args.overrides)
    print(f"generated {summary['generated_latents']} latents with {summary['strategy']}: "
          f"{summary['seconds_per_latent_median']:.3f} s/latent (median), "
          f"PSNR vs ground truth {summary['psnr_generated_mean']:.2f} dB -> {args.out}/rollout.mp4, compare.mp4, frames.json")
    return 0


def cmd_preprocess(args) -> int:
    from data_pipeline.preprocess import BadInputError, PreprocessArgs, parse_resolution, parse_size, preprocess

    pargs = PreprocessArgs(format_name=args.format, resolution=parse_resolution(args.resolution), fps=args.fps,
                           segment_frames=args.segment_frames, shard_bytes=parse_size(args.shard_bytes),
                           codec=args.codec, workers=args.workers, strict=args.strict,
                           min_segment_frames=args.min_segment_frames, deterministic=not args.fast_encode)
    try:
        m = preprocess(args.input, args.output, pargs, progress=not args.quiet)
    except BadInputError as e:           # --strict: the first bad input's reason, as one line
        print(f"decmem: {e} (--strict stops at the first bad input; inputs finished before it are published)",
              file=sys.stderr)
        return 1
    return 0 if m["samples"] or not m["skipped"] else 1


def cmd_bench_data(args) -> int:
    from training.bench_data import run_data_bench
    from training.plots import write_bench_outputs

    cfg = _load(args)
    rows = run_data_bench(cfg, args.spec, args.clip_frames, args.samples, args.json, log=lambda s: print(s, flush=True),
                          fmt=args.format)
    print()
    for r in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    write_bench_outputs("data", args.json)
    return 0


def cmd_bench_cp(args) -> int:
    from training.bench_cp import run_cp_bench
    from training.plots import write_bench_outputs

    cfg = _load(args)
    run_cp_bench(cfg, args.cp, args.bank_frames, args.json, log=lambda s: print(s, flush=True))
    if args.json:
        print(f"wrote {args.json}")
    write_bench_outputs("cp", args.json)
    return 0


def cmd_train(args) -> int:
    from training.distributed import env_rank_world, launch_local
    from training.run_config import RunConfig

    cfg = load_config(RunConfig, args.config, args.overrides)      # a typo fails here, before any process starts
    inside = env_rank_world()[2] > 1 or "RANK" in os.environ          # already one rank of a launched world
    world = args.nproc or env_rank_world()[2]
    if args.dry_run:
        from training.dry_run import run_dry_run

        if not args.nproc and world == 1 and cfg.train.cp > 1:
            world = cfg.train.cp                                     # the smallest world this layout runs on
            print(f"(no --nproc given: showing world = train.cp = {world})")
        try:
            run_dry_run(cfg, world, log=lambda s: print(s, flush=True))
        except (ValueError, FileNotFoundError) as e:
            print(f"decmem: {e}", file=sys.stderr)
            return 2
        return 0
    if args.nproc and args.nproc > 1 and not inside:
        from training.dry_run import check_data, validate

        try:                                                         # layout and data problems, before spawning
            validate(cfg, args.nproc)
            check_data(cfg)
        except (ValueError, FileNotFoundError) as e:
            print(f"decmem: {e}", file=sys.stderr)
            return 2
        rc = launch_local(args.nproc, ["train", args.config, *args.overrides])
        return rc or _stopped_early(cfg)
    from data_pipeline.loader import StorageUnavailableError
    from training.distributed import RunFailed
    from training.trainer import NonFiniteLoss, train

    try:
        outcome = train(cfg)
    except NonFiniteLoss as e:
        print(f"decmem: {e}", file=sys.stderr)
        return 4
    except StorageUnavailableError as e:   # the data storage stayed down past data.read_retry_max_wait_s
        print(f"decmem: {e}; resume with checkpoint.resume=latest once it is back", file=sys.stderr)
        return 7
    except RunFailed as e:        # a failed save, a refused checkpoint, a lost rank: one line instead of a traceback
        if not (e.on_every_rank and env_rank_world()[0] != 0):
            print(f"decmem: {e}", file=sys.stderr)
        return e.exit_code
    if inside:            # a rank's non-zero exit would make the launcher kill the others: report it from the parent
        return 0
    return 0 if outcome == "done" else 3                             # 3: stopped (signal or stop_at) after saving


def cmd_submit(args) -> int:
    from slurm.submit import SubmitArgs, submit
    from training.run_config import RunConfig

    cfg = load_config(RunConfig, args.config, args.overrides)      # a typo fails here, before anything is submitted
    try:
        sargs = SubmitArgs(cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                           partition=args.partition or "", time_min=args.time, account=args.account or "",
                           qos=args.qos or "", constraint=args.constraint or "", mem=args.mem or "",
                           signal_delay_s=args.signal_delay, name=args.name or "")
        job = submit(cfg, sargs, dry_run=args.dry_run, log=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError) as e:
        print(f"decmem: {e}", file=sys.stderr)
        return 2
    if job is not None and args.wait:
        from slurm.jobs import wait_finished

        if sargs.resolved_cluster() == "slurm":
            st = wait_finished(job.job_id, deadline_s=args.wait)
            print(f"job {job.job_id}: {st['state']}")
            return 0 if st["state"] == "COMPLETED" else 1
        job.wait()
        print(f"job {job.job_id}: {job.state}")
        return 0 if job.state in ("FINISHED", "DONE", "COMPLETED") else 1
    return 0


def cmd_eval(args) -> int:
    if args.weights:
        return _eval_protocol(args)
    from training.evaluate import evaluate

    if not args.clip or not args.runs:
        print("decmem eval: give --weights W --data D (the protocol), or --clip C --runs DIR... (score "
              "`decmem generate` outputs)", file=sys.stderr)
        return 2
    try:
        res = evaluate(args.clip, args.runs, args.out, pos_tol=args.pos_tol, angle_tol_deg=args.angle_tol,
                       min_gap=args.min_gap)
    except (ValueError, FileNotFoundError) as e:
        print(f"decmem: {e}", file=sys.stderr)
        return 2
    print(f"{res['revisit_count']} revisit frames of {res['generated_frames']} generated -> "
          f"{args.out}/report.md, eval.json, compare.mp4, revisits.png")
    return 0


def _eval_protocol(args) -> int:
    from training.config import ConfigError
    from training.eval_protocol import EvalArgs, parse_frames_for, run_eval

    if not args.data or args.runs or args.clip:
        print("decmem eval --weights needs --data and takes no --clip / --runs", file=sys.stderr)
        return 2
    try:
        frames_for = dict(parse_frames_for(f) for f in args.frames_for)
        if len(frames_for) < len(args.frames_for):
            raise ValueError(f"--frames-for names a strategy twice: {' '.join(args.frames_for)}")
        ea = EvalArgs(weights=args.weights, data=args.data, init_frames=args.init_frames, frames=args.frames,
                      strategies=args.strategies or [], frames_for=frames_for, recall_every=args.recall_every,
                      clips=args.clips, sample_steps=args.steps or 0, seed=args.seed, device=args.device,
                      min_gap=args.min_gap, revisit_coverage=args.revisit_coverage, overlap=args.overlap,
                      relevance=args.relevance, block_overlap=args.block_overlap, depth_tol=args.depth_tol,
                      pos_tol=args.pos_tol, angle_tol_deg=args.angle_tol)
        res = run_eval(ea, args.out, log=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"decmem: {e}", file=sys.stderr)
        return 2
    print(open(res["paths"]["eval.md"]).read())
    return 0


def cmd_demo(args) -> int:
    from training.demo import DemoArgs, run_demo

    a = DemoArgs(out=args.out, config=args.config, scenes=args.scenes, frames=args.frames,
                 segment_frames=args.segment_frames, hw=args.hw, heldout_frames=args.heldout_frames,
                 init_frames=args.init_frames, heldout_seed=args.heldout_seed, long_frames=args.long_frames,
                 long_seed=args.long_seed, long_steps=args.long_steps, long_dense_frames=args.long_dense_frames,
                 nproc=args.nproc, cp=args.cp, steps=args.steps, strategies=tuple(args.strategies),
                 overrides=list(args.overrides))
    try:
        run_demo(a, log=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError) as e:
        print(f"decmem: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"decmem demo: a stage failed (exit {e.returncode}): {' '.join(map(str, e.cmd[3:]))}", file=sys.stderr)
        return 1
    return 0


def cmd_jobs(args) -> int:
    from slurm.jobs import describe

    print(describe(args.run_dir))
    return 0


def _stopped_early(cfg) -> int:
    """3 if the run saved and stopped before train.steps (a signal or train.stop_at), else 0."""
    from training.checkpoint import resolve_resume

    path = resolve_resume(cfg.run_dir, "latest")
    if path is None:
        return 0
    with open(os.path.join(path, "trainstate.json")) as f:
        return 3 if json.load(f)["step"] < cfg.train.steps else 0


def cmd_config(args) -> int:
    cfg = _load(args)
    import yaml

    from training.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
    if args.out:
        path = os.path.join(args.out, "config.yaml")
        dump_config(cfg, path)
        print(f"# resolved config written to {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="decmem",
        description="DecMem: camera-controlled video world models with sparse global + anchored local memory.",
        epilog="Each subcommand is one stage; `decmem SUBCOMMAND --help` for its options.",
    )
    # the deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is in the environment too)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    bench = sub.add_parser("bench", help="benchmarks: time components side by side, write JSON + a table",
                           description="Benchmarks that time components side by side in one process.")
    bsub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    att = bsub.add_parser("attention", help="one attention layer per strategy and memory-bank size",
                          description="Time one DecMem attention layer (query stream reading a synthetic bank) "
                                      "for every strategy and bank size; median of repeats, same inputs.")
    att.add_argument("--strategies", type=_strategies, default=_strategies("decmem,dense,dense_decay,fov_frames,window"),
                     help="comma-separated strategies (default: all)")
    att.add_argument("--bank-frames", type=_int_list, default=[8, 32, 128, 512], help="comma-separated bank sizes in frames")
    att.add_argument("--json", default=None, help="write the result rows as a JSON list to this path")
    att.add_argument("--repeats", type=int, default=None, help="timed repeats per point (overrides bench.repeats)")
    _add_config_args(att)
    att.set_defaults(func=cmd_bench_attention)

    gen = bsub.add_parser("generate", help="seconds per generated latent and peak memory vs bank size",
                          description="Stream-generate chunks after a pre-filled memory bank for every strategy and "
                                      "bank size (each point in a fresh process); median seconds per latent, peak RSS.")
    gen.add_argument("--strategies", type=_strategies, default=_strategies("decmem,dense,window"),
                     help="comma-separated strategies (default: decmem,dense,window)")
    gen.add_argument("--bank-frames", type=_int_list, default=[56, 112, 224, 448], help="bank sizes in latent frames")
    gen.add_argument("--json", default=None, help="write the result rows as a JSON list to this path")
    _add_config_args(gen)
    gen.set_defaults(func=cmd_bench_generate)

    trn = bsub.add_parser("train", help="training tokens/s and step memory vs bank size; longest bank per memory budget",
                          description="Full training steps (rectified-flow loss, backward, AdamW) of the configured "
                                      "model, one target chunk after a bank of L latent frames, each point in a fresh "
                                      "process: median step time, training tokens/s, the step's own RSS; then the "
                                      "longest bank each strategy fits under --memory-gb (doubling, then bisection).")
    trn.add_argument("--strategies", type=_strategies, default=_strategies("decmem,dense"),
                     help="comma-separated strategies (default: decmem,dense)")
    trn.add_argument("--bank-frames", type=_int_list, default=[16, 32, 64, 128], help="bank sizes in latent frames")
    trn.add_argument("--memory-gb", type=float, default=2.0,
                     help="budget for one training step's own working set (RSS above the pre-step RSS), GiB")
    trn.add_argument("--no-search", action="store_true", help="only the timed points, no memory-fit search")
    trn.add_argument("--steps", type=int, default=3, help="timed steps per point (the median is reported)")
    trn.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    trn.add_argument("--cap", type=int, default=4096, help="longest bank the search tries, in frames")
    trn.add_argument("--timeout", type=float, default=600.0,
                     help="seconds per point; a point that runs longer counts as not fitting")
    trn.add_argument("--json", default=None, help="write the result rows as a JSON list to this path")
    _add_config_args(trn)
    trn.set_defaults(func=cmd_bench_train)

    mem = bsub.add_parser("memory", help="the exact-revisit probe: does the model learn to read its memory?",
                          description="Train the configured model per strategy (and variant) on the exact-revisit "
                                      "probe: bank frames of random textures, each with its own camera; the target "
                                      "chunk revisits old bank frames with their cameras. Held-out velocity loss at "
                                      "bench_memory.taus and recall@k of the true source blocks, every "
                                      "bench_memory.eval_every steps.")
    mem.add_argument("--strategies", type=_strategies, default=_strategies("decmem,dense,window"),
                     help="comma-separated strategies, each trained with the config as is (default: decmem,dense,window)")
    mem.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                     help="one more run: decmem (or model.attention.strategy=...) with these overrides; repeatable")
    mem.add_argument("--ablation", action="store_true",
                     help="add one decmem run per option of the memory recipe switched against the config")
    mem.add_argument("--steps", type=int, default=None, help="training steps per run (overrides bench_memory.steps)")
    mem.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    mem.add_argument("--json", default=None, help="write the rows (every evaluation of every run) to this path")
    _add_config_args(mem)
    mem.set_defaults(func=cmd_bench_memory)

    from data_pipeline.sources import FORMATS
    from model.attention import STRATEGIES

    pre = sub.add_parser("preprocess", help="source videos + cameras -> WebDataset shards + manifest (local or s3://)",
                         description="Read INPUT in its source's own format, convert to canonical clips (K in pixels, "
                                     "c2w in OpenCV axes), cut into segments and write shards + manifest.json to "
                                     "OUTPUT (a folder or s3://bucket/prefix). Re-running resumes; bad inputs are "
                                     "skipped and recorded in the manifest (fatal with --strict).")
    pre.add_argument("--format", required=True, choices=FORMATS, help="source format of INPUT")
    pre.add_argument("input", metavar="INPUT", help="source folder (render/synthetic: a spec like scenes=4,frames=128)")
    pre.add_argument("output", metavar="OUTPUT", help="dataset folder or s3://bucket/prefix")
    pre.add_argument("--resolution", default=None, metavar="HxW", help="centre-crop to the aspect, then resize")
    pre.add_argument("--fps", type=float, default=None, help="subsample to about this frame rate")
    pre.add_argument("--segment-frames", type=int, default=None, metavar="N", help="frames per sample (default: whole clip)")
    pre.add_argument("--min-segment-frames", type=int, default=8, metavar="N", help="drop shorter tails (default 8)")
    pre.add_argument("--shard-bytes", default="1GB", metavar="SIZE", help="target shard size, e.g. 512MB (default 1GB)")
    pre.add_argument("--codec", default="pixels", help="pixels, or autoencoder:DIR to precompute latents")
    pre.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    pre.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    pre.add_argument("--fast-encode", action="store_true",
                     help="x264 with its assembly kernels: ~4x faster encoding, shard bytes may vary between runs")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)


    gen = sub.add_parser("generate", help="roll a trained model out along a clip's camera path (mp4 + timings)",
                         description="Initialise the memory bank from the clip's first N ground-truth frames, generate "
                                     "M frames chunk by chunk along its camera path, encode each chunk into the bank "
                                     "once; write rollout.mp4, compare.mp4 (ground truth | generated), frames.json.")
    gen.add_argument("--weights", required=True, help="weights folder (model.safetensors + config.yaml)")
    gen.add_argument("--clip", required=True, help="canonical clip .npz, or a dataset / .tar shard (its first sample, or DATASET#KEY)")
    gen.add_argument("--init-frames", type=int, required=True, help="N: ground-truth latent frames put in the bank")
    gen.add_argument("--frames", type=int, required=True, help="M: latent frames to generate")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--strategy", choices=STRATEGIES, default=None, help="memory read (default: the weights' own)")
    gen.add_argument("--steps", type=int, default=None, help="Euler steps per chunk (default: the weights' own)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--teacher-forcing", action="store_true",
                     help="put ground-truth chunks in the bank instead of generated ones (diagnostic)")
    gen.add_argument("--save-bank", default=None, help="also save the final memory bank (safetensors) here")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="weights-config overrides")
    gen.set_defaults(func=cmd_generate)

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
    _add_config_args(dat)
    dat.set_defaults(func=cmd_bench_data)

    cpb = bsub.add_parser("cp", help="bytes moved by context parallelism vs a K/V all-gather, bank memory per rank",
                          description="Run the query read over a bank sharded across cp real processes (gloo) and "
                                      "count bytes moved per layer, per-rank bank memory and selected-block imbalance.")
    cpb.add_argument("--cp", type=_int_list, default=[1, 2, 4], help="comma-separated cp sizes")
    cpb.add_argument("--bank-frames", type=_int_list, default=[56, 224], help="bank sizes in frames")
    cpb.add_argument("--json", default=None)
    _add_config_args(cpb)
    cpb.set_defaults(func=cmd_bench_cp)

    tr = sub.add_parser("train", help="train (or resume) a model: DeepSpeed ZeRO-3 over dp x cp ranks",
                        description="Train per CONFIG plus key=value overrides. Runs as one rank under torchrun, the "
                                    "deepspeed launcher or SLURM; --nproc N starts N local processes itself. Resumes "
                                    "from run_dir/checkpoints/latest unless checkpoint.resume=none.")
    tr.add_argument("config", metavar="CONFIG", help="YAML run config (configs/debug.yaml, demo.yaml, paper.yaml)")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.cp=2")
    tr.add_argument("--nproc", type=int, default=None, metavar="N", help="launch N local processes (one machine)")
    tr.add_argument("--dry-run", action="store_true",
                    help="print layout, parameter count, tokens per step, per-rank memory estimate; check the data; "
                         "start nothing")
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    tr.set_defaults(func=cmd_train)

    sb = sub.add_parser("submit", help="submit training as a submitit job: SLURM (multi-node) or local",
                        description="Submit `train` for CONFIG as a submitit job: one task per GPU (or "
                                    "--tasks-per-node), rendezvous from the job environment, the code snapshotted "
                                    "into run_dir/code/. USR2 (preemption, time limit) saves a checkpoint on every "
                                    "rank and requeues the job, which resumes from `latest`.")
    sb.add_argument("config", metavar="CONFIG")
    sb.add_argument("overrides", nargs="*", metavar="key=value")
    sb.add_argument("--cluster", default="auto", choices=("auto", "slurm", "local", "debug"),
                    help="slurm, local (processes on this machine, no SLURM), debug (in this process); "
                         "auto = slurm when sbatch exists")
    sb.add_argument("--nodes", type=int, default=1)
    sb.add_argument("--gpus-per-node", type=int, default=0)
    sb.add_argument("--tasks-per-node", type=int, default=0, help="default: one per GPU (1 without GPUs)")
    sb.add_argument("--cpus-per-task", type=int, default=0)
    sb.add_argument("--partition", "-p", default=None)
    sb.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit in minutes (>= 5)")
    sb.add_argument("--account", "-A", default=None)
    sb.add_argument("--qos", default=None)
    sb.add_argument("--constraint", "-C", default=None)
    sb.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
    sb.add_argument("--signal-delay", type=int, default=120, metavar="S",
                    help="seconds before the time limit at which USR2 asks the job to save and requeue")
    sb.add_argument("--name", default=None, help="job name (default: the config's name)")
    sb.add_argument("--dry-run", action="store_true", help="print the sbatch script and the layout; submit nothing")
    sb.add_argument("--wait", type=float, default=0, metavar="S",
                    help="wait up to S seconds for the job to finish; exit 0 only if it completed")
    sb.set_defaults(func=cmd_submit)

    ev = sub.add_parser("eval", help="revisit fidelity and retrieval recall of every strategy over many clips",
                        description="Two forms. (1) The protocol: --weights W --data D: for each of --clips clips, "
                                    "initialise the bank with --init-frames ground-truth latents, generate --frames "
                                    "along the true camera path with every strategy, and score PSNR/SSIM on revisited "
                                    "vs novel frames (depth + poses), recall@k of overlapping bank blocks, attention "
                                    "dispersion and seconds per chunk over the rollout, LPIPS if its weights are "
                                    "cached. Writes eval.json, eval.md, frames.png, dispersion.png, chunk_seconds.png, "
                                    "retrieval_heatmap.png. (2) --clip C --runs DIR...: score existing `decmem "
                                    "generate` outputs (revisit by pose); writes compare.mp4, revisits.png, "
                                    "eval.json, report.md.")
    ev.add_argument("--weights", default=None, metavar="DIR | STRATEGY=DIR[,STRATEGY=DIR...]",
                    help="(protocol) one weights folder (model.safetensors + config.yaml) that every strategy reads, "
                         "or one folder per strategy (separately trained models; same codec and latent geometry)")
    ev.add_argument("--data", default=None, help="(protocol) dataset folder / prefix / shard, local or s3://")
    ev.add_argument("--init-frames", type=int, default=24, help="(protocol) latents given to the model")
    ev.add_argument("--frames", type=int, default=16, help="(protocol) latents generated")
    ev.add_argument("--strategies", type=_strategies, default=None,
                    help="(protocol) comma-separated strategies, in table order (default: the strategies --weights "
                         "names, or decmem,dense,dense_decay,fov_frames,window for one folder)")
    ev.add_argument("--frames-for", action="append", default=[], metavar="STRATEGY=M",
                    help="(protocol) roll this strategy out for only M latents (a slow one, e.g. dense on CPU); its "
                         "metrics cover only those; repeatable")
    ev.add_argument("--recall-every", type=int, default=0, metavar="N",
                    help="(protocol) score recall@k and the heatmaps on every N-th chunk only (default: every chunk "
                         "up to 32 chunks, else about 32 chunks spread over the rollout)")
    ev.add_argument("--clips", type=int, default=4, help="(protocol) clips evaluated, first in shard order")
    ev.add_argument("--steps", type=int, default=0, help="(protocol) sampling steps (default: the weights')")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--revisit-coverage", type=float, default=0.5,
                    help="(protocol) revisited: at least this share of the frame's pixels seen by an older init frame")
    ev.add_argument("--relevance", choices=("block", "frame"), default="block",
                    help="(protocol) relevant bank block, per query block: it holds >= --block-overlap of the query "
                         "block's own surface (block); or per query frame: >= --overlap of its pixels visible in the "
                         "frame's view (frame)")
    ev.add_argument("--block-overlap", type=float, default=0.1,
                    help="(protocol, block rule) share of the query block's pixels a relevant bank block holds")
    ev.add_argument("--overlap", type=float, default=0.25,
                    help="(protocol, frame rule) share of a relevant bank block's pixels visible in the query view")
    ev.add_argument("--depth-tol", type=float, default=0.1,
                    help="(protocol) relative depth agreement for 'the same surface' (revisits and relevance)")
    ev.add_argument("--clip", default=None,
                    help="(runs) canonical clip .npz, or a dataset / .tar shard (its first sample, or DATASET#KEY)")
    ev.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                    help="(runs) `decmem generate` output folders, in table order")
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--pos-tol", type=float, default=0.25,
                    help="max camera-centre distance for a pose revisit (clip pose units; protocol: clips without depth)")
    ev.add_argument("--angle-tol", type=float, default=20.0, help="max viewing-direction angle for a pose revisit (degrees)")
    ev.add_argument("--min-gap", type=int, default=8,
                    help="the init frame revisited must be at least this many frames older (not the local window's)")
    ev.set_defaults(func=cmd_eval)

    from training.demo import DemoArgs

    dm = sub.add_parser("demo", help="the main job: render -> shards -> train (dp=1 x cp=2) -> generate -> eval",
                        description="Chain ordinary decmem subcommands: preprocess (render MiniWorld scenes whose "
                                    "camera paths revisit places, and one held-out scene), train (DeepSpeed ZeRO-3, 2 "
                                    "local processes, dp=1 x cp=2), generate (one rollout per strategy along the "
                                    "held-out clip, bank initialised from its first frames), eval (revisit PSNR/SSIM, "
                                    "compare.mp4, revisits.png, report.md), then the minute-long rollout (one more "
                                    "held-out scene, --long-frames generated frames per strategy with `decmem eval "
                                    "--weights`: PSNR per frame, seconds per chunk, dispersion; a report section). "
                                    "Each stage prints its command, so it can be rerun alone with other options; "
                                    "finished stages are reused on a re-run.")
    dm.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for the train stage")
    dm.add_argument("--out", default="runs/demo", help="the demo's run directory")
    dm.add_argument("--config", default="configs/demo.yaml")
    dm.add_argument("--scenes", type=int, default=DemoArgs.scenes, help="training scenes to render")
    dm.add_argument("--frames", type=int, default=96, help="frames per training scene")
    dm.add_argument("--segment-frames", type=int, default=48, help="frames per training sample")
    dm.add_argument("--hw", default="32x32", help="frame size HxW")
    dm.add_argument("--heldout-frames", type=int, default=64, help="frames of the held-out clip")
    dm.add_argument("--init-frames", type=int, default=24, help="ground-truth frames put in the bank")
    dm.add_argument("--heldout-seed", type=int, default=DemoArgs.heldout_seed, help="render seed of the held-out scene")
    dm.add_argument("--long-frames", type=int, default=DemoArgs.long_frames,
                    help="minute-long rollout: frames generated after --init-frames (600 = 60 s at 10 fps)")
    dm.add_argument("--long-seed", type=int, default=DemoArgs.long_seed,
                    help="minute-long rollout: render seed of its held-out scene")
    dm.add_argument("--long-steps", type=int, default=DemoArgs.long_steps,
                    help="minute-long rollout: Euler steps per chunk")
    dm.add_argument("--long-dense-frames", type=int, default=DemoArgs.long_dense_frames,
                    help="minute-long rollout: frames dense generates (its chunks slow down as the bank grows)")
    dm.add_argument("--nproc", type=int, default=2)
    dm.add_argument("--cp", type=int, default=2)
    dm.add_argument("--steps", type=int, default=0, help="training steps (default: the config's)")
    dm.add_argument("--strategies", type=_strategies, default=_strategies("decmem,window,dense"))
    dm.set_defaults(func=cmd_demo)

    jb = sub.add_parser("jobs", help="a run's jobs: ids, state, last checkpoint, TensorBoard command")
    jb.add_argument("run_dir", metavar="RUN_DIR")
    jb.set_defaults(func=cmd_jobs)

    cfg = sub.add_parser("config", help="validate a run config and print it resolved (optionally dump it)",
                         description="Load CONFIG plus key=value overrides, report the first problem with file, "
                                     "line and key, else print the resolved YAML.")
    _add_config_args(cfg)
    cfg.add_argument("--out", default=None, help="also write DIR/config.yaml")
    cfg.set_defaults(func=cmd_config)
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
