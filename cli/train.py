"""``decmem train | submit | jobs | config``: the training job, on this machine or through SLURM, and its config."""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from decmem.cli.common import add_config_args, fail, load_run_config, log
from decmem.data_pipeline.loader import StorageUnavailableError
from decmem.slurm.jobs import describe, wait_finished
from decmem.slurm.submit import SubmitArgs, submit
from decmem.training.checkpoint import resolve_resume
from decmem.training.config import dump_config, to_dict
from decmem.training.distributed import RunFailed, env_rank_world, launch_local
from decmem.training.dry_run import run_dry_run
from decmem.training.trainer import NonFiniteLoss, train
from decmem.training.validate import check_data, validate

CLI_MODULE = "decmem.cli"  # what `--nproc N` runs in each process: python -m decmem.cli train ...


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW latent frame size (e.g. 60x104), got {text!r}") from None
    return h, w


def cmd_train(args) -> int:
    cfg = load_run_config(args)                                      # a typo fails here, before any process starts
    inside = env_rank_world()[2] > 1 or "RANK" in os.environ          # already one rank of a launched world
    world = args.nproc or env_rank_world()[2]
    if args.dry_run:
        if not args.nproc and world == 1 and cfg.train.cp > 1:
            world = cfg.train.cp                                     # the smallest world this layout runs on
            print(f"(no --nproc given: showing world = train.cp = {world})")
        try:
            run_dry_run(cfg, world, log=log, frame_hw=args.latent_hw)
        except (ValueError, FileNotFoundError) as e:
            return fail(str(e))
        return 0
    if args.nproc and args.nproc > 1 and not inside:
        try:                                                         # layout and data problems, before spawning
            validate(cfg, args.nproc)                                # its warnings: rank 0 logs them at start
            check_data(cfg)
        except (ValueError, FileNotFoundError) as e:
            return fail(str(e))
        rc = launch_local(args.nproc, CLI_MODULE, ["train", args.config, *args.overrides])
        return rc or _stopped_early(cfg)
    try:
        outcome = train(cfg)
    except NonFiniteLoss as e:
        return fail(str(e), 4)
    except StorageUnavailableError as e:   # the data storage stayed down past data.read_retry_max_wait_s
        return fail(f"{e}; resume with checkpoint.resume=latest once it is back", 7)
    except RunFailed as e:        # a failed save, a refused checkpoint, a lost rank: one line instead of a traceback
        if not (e.on_every_rank and env_rank_world()[0] != 0):
            print(f"decmem: {e}", file=sys.stderr)
        return e.exit_code
    if inside:            # a rank's non-zero exit would make the launcher kill the others: report it from the parent
        return 0
    return 0 if outcome == "done" else 3                             # 3: stopped (signal or stop_at) after saving


def _stopped_early(cfg) -> int:
    """3 if the run saved and stopped before train.steps (a signal or train.stop_at), else 0."""
    path = resolve_resume(cfg.run_dir, "latest")
    if path is None:
        return 0
    with open(os.path.join(path, "trainstate.json")) as f:
        return 3 if json.load(f)["step"] < cfg.train.steps else 0


def cmd_submit(args) -> int:
    cfg = load_run_config(args)                                      # a typo fails here, before anything is submitted
    try:
        sargs = SubmitArgs(cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                           partition=args.partition or "", time_min=args.time, account=args.account or "",
                           qos=args.qos or "", constraint=args.constraint or "", mem=args.mem or "",
                           signal_delay_s=args.signal_delay, name=args.name or "")
        job = submit(cfg, sargs, dry_run=args.dry_run, log=log)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    if job is not None and args.wait:
        if sargs.resolved_cluster() == "slurm":
            st = wait_finished(job.job_id, deadline_s=args.wait)
            print(f"job {job.job_id}: {st['state']}")
            return 0 if st["state"] == "COMPLETED" else 1
        job.wait()
        print(f"job {job.job_id}: {job.state}")
        return 0 if job.state in ("FINISHED", "DONE", "COMPLETED") else 1
    return 0


def cmd_jobs(args) -> int:
    print(describe(args.run_dir))
    return 0


def cmd_config(args) -> int:
    cfg = load_run_config(args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
    if args.out:
        path = os.path.join(args.out, "config.yaml")
        dump_config(cfg, path)
        print(f"# resolved config written to {path}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
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
    tr.add_argument("--latent-hw", type=_hw, default=None, metavar="HxW",
                    help="--dry-run: estimate for HxW latent frames without opening the data (e.g. 60x104)")
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

    jb = sub.add_parser("jobs", help="a run's jobs: ids, state, last checkpoint, TensorBoard command")
    jb.add_argument("run_dir", metavar="RUN_DIR")
    jb.set_defaults(func=cmd_jobs)

    cfg = sub.add_parser("config", help="validate a run config and print it resolved (optionally dump it)",
                         description="Load CONFIG plus key=value overrides, report the first problem with file, "
                                     "line and key, else print the resolved YAML.")
    add_config_args(cfg)
    cfg.add_argument("--out", default=None, help="also write DIR/config.yaml")
    cfg.set_defaults(func=cmd_config)
