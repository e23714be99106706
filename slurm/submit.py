"""``decmem submit``: the training job through submitit, on SLURM (or locally, same code path), and its records.

    run_dir/
      submitit/               submitit's pickles and the tasks' logs (%j_%t_log.out / .err)
      code/<stamp>/           the code as submitted (git-tracked files of the working tree, the package folders
                              under decmem/ as installed: decmem/training/...) + run.yaml, the resolved config
                              the job loads, so edits after submission change nothing
      jobs.json               one record per submission: job id, cluster, resources, snapshot
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import submitit

from decmem.data_pipeline import storage
from decmem.slurm.job import TrainJob
from decmem.training.config import dump_config
from decmem.training.validate import validate

CLUSTERS = ("auto", "slurm", "local", "debug")
# the repository folders installed as decmem.<folder> (setup.cfg package_dir; tests/test_layout.py checks both agree)
PACKAGES = ("model", "training", "data_pipeline", "slurm", "evaluation", "bench", "cli")


@dataclass
class SubmitArgs:
    """Where and with what resources the job runs."""

    cluster: str = "auto"            # auto = slurm if sbatch is on PATH, else local
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0          # 0 = one task per GPU (or 1 without GPUs)
    cpus_per_task: int = 0           # 0 = SLURM's default
    partition: str = ""
    time_min: int = 60               # the job's time limit; USR2 arrives signal_delay_s before it
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem: str = ""                    # per node, e.g. 64G
    signal_delay_s: int = 120        # time to save one checkpoint collectively before the limit
    name: str = ""                   # job name (default: the config's name)

    def __post_init__(self):
        if self.cluster not in CLUSTERS:
            raise ValueError(f"--cluster: expected one of {CLUSTERS}, got {self.cluster!r}")
        for key in ("nodes", "time_min"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}: expected >= 1, got {getattr(self, key)}")
        if self.time_min < 5:
            raise ValueError("--time-min: expected >= 5 (USR2 would reach the tasks during start-up)")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world(self) -> int:
        return self.nodes * self.tasks

    def resolved_cluster(self) -> str:
        if self.cluster != "auto":
            return self.cluster
        return "slurm" if shutil.which("sbatch") else "local"


#################################################################################
#                                   Executor                                    #
#################################################################################

def make_executor(sargs: SubmitArgs, folder: str, job_name: str, setup: list[str] | None = None):
    """A submitit executor for the cluster, with one task per GPU (or --tasks-per-node) on every node."""
    cluster = sargs.resolved_cluster()
    if cluster != "slurm" and sargs.nodes > 1:
        raise ValueError(f"--nodes {sargs.nodes} needs --cluster slurm (the {cluster} executor runs on this machine)")
    if cluster == "debug" and sargs.world > 1:
        raise ValueError("--cluster debug runs one task in this process; use --cluster local for several")
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = dict(name=job_name, nodes=sargs.nodes, tasks_per_node=sargs.tasks, timeout_min=sargs.time_min)
    if sargs.gpus_per_node:
        params["gpus_per_node"] = sargs.gpus_per_node
    if sargs.cpus_per_task:
        params["cpus_per_task"] = sargs.cpus_per_task
    if cluster == "slurm":
        extra = {"requeue": True}                       # scontrol requeue after a preemption save
        params.update(slurm_signal_delay_s=sargs.signal_delay_s, slurm_additional_parameters=extra,
                      # one task dying ends the step at once; the others' collectives time out anyway
                      slurm_srun_args=["--kill-on-bad-exit=1"])
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(sargs, key):
                params[f"slurm_{key}"] = getattr(sargs, key)
        if setup:
            params["slurm_setup"] = setup
    ex.update_parameters(**params)
    return ex


def sbatch_text(ex, folder: str) -> str:
    """The sbatch script submitit would write for this executor (no submission)."""
    inner = ex._executor                                   # submitit's SlurmExecutor under the AutoExecutor
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-u", "-m", "submitit.core._submit", folder])
    return inner._make_submission_file_text(command, "dry-run")


#################################################################################
#                                 Code Snapshot                                 #
#################################################################################

def snapshot_code(dest: str, root: str | None = None) -> str:
    """Copy the git-tracked files of the working tree (their current contents) to dest.

    The package folders land where the installed import path expects them (model/ -> dest/decmem/model/, a
    namespace package like the installed one), so with dest first on PYTHONPATH the job imports decmem.* from the
    snapshot, not from the installation; everything else (configs/, ...) keeps its path. submitit's RsyncSnapshot
    does the same with rsync, which these machines lack; outside a git checkout the package folders are copied instead.
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
        files = [f for f in out.stdout.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        files = []
        for pkg in (*PACKAGES, "configs"):
            for dirpath, _, names in os.walk(os.path.join(root, pkg)):
                files += [os.path.relpath(os.path.join(dirpath, n), root) for n in names if not n.endswith(".pyc")]
    for rel in files:
        src = os.path.join(root, rel)
        if os.path.isfile(src):                          # tracked but deleted in the working tree: skip
            top = rel.replace(os.sep, "/").split("/")[0]
            target = os.path.join(dest, "decmem", rel) if top in PACKAGES else os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target) or dest, exist_ok=True)
            shutil.copy2(src, target)
    return dest


#################################################################################
#                                    Submit                                     #
#################################################################################

def _absolute(cfg):
    """The job runs from the snapshot folder: local paths in the config must not depend on the cwd."""
    cfg.run_dir = os.path.abspath(cfg.run_dir)
    if cfg.data.data and not storage.is_remote(cfg.data.data) and "{" not in cfg.data.data:
        cfg.data = dataclasses.replace(cfg.data, data=os.path.abspath(cfg.data.data))
    if cfg.checkpoint.init_weights and not storage.is_remote(cfg.checkpoint.init_weights):
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, init_weights=os.path.abspath(cfg.checkpoint.init_weights))
    return cfg


def submit(cfg, sargs: SubmitArgs, dry_run: bool = False, log=print):
    """Validate for the job's world size, snapshot the code, submit; returns the submitit job (None on dry run)."""
    cfg = _absolute(cfg)
    for w in validate(cfg, sargs.world):
        log(f"warning: {w}")
    cluster = sargs.resolved_cluster()
    name = sargs.name or cfg.name
    folder = os.path.join(cfg.run_dir, "submitit")
    layout = (f"{sargs.nodes} node(s) x {sargs.tasks} task(s) = world {sargs.world} = dp {sargs.world // cfg.train.cp} "
              f"x cp {cfg.train.cp}; {sargs.gpus_per_node or 'no'} GPU(s) per node; cluster {cluster}")
    if dry_run:
        ex = make_executor(dataclasses.replace(sargs, cluster="slurm"), folder, name,
                           setup=["cd <run_dir>/code/<stamp>", "export PYTHONPATH=<run_dir>/code/<stamp>:$PYTHONPATH"])
        log(f"# layout: {layout}")
        log(f"# would submit from {folder} (nothing is submitted):")
        log(sbatch_text(ex, folder))
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    code = snapshot_code(os.path.join(cfg.run_dir, "code", stamp))
    run_yaml = os.path.join(code, "run.yaml")
    dump_config(cfg, run_yaml)
    ex = make_executor(sargs, folder, name, setup=[f"cd {shlex.quote(code)}",
                                                   f"export PYTHONPATH={shlex.quote(code)}:${{PYTHONPATH:-}}"])

    if cluster == "local":        # the local executor has no setup lines: run the snapshot through the environment
        os.environ["PYTHONPATH"] = code + os.pathsep + os.environ.get("PYTHONPATH", "")
    job = ex.submit(TrainJob(run_yaml))
    record = {"job_id": str(job.job_id), "cluster": cluster, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "name": name, "nodes": sargs.nodes, "tasks_per_node": sargs.tasks, "gpus_per_node": sargs.gpus_per_node,
              "world": sargs.world, "cp": cfg.train.cp, "code": code, "logs": folder}
    _append_record(cfg.run_dir, record)
    log(f"submitted job {job.job_id} ({layout}); logs in {folder}; `decmem jobs {cfg.run_dir}` for its state")
    return job


def _append_record(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, "jobs.json")
    records = json.load(open(path)) if os.path.exists(path) else []
    records.append(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
