"""``decmem jobs RUN_DIR``: the run's jobs, their state, the last checkpoint and the TensorBoard command.

States come from ``scontrol show job`` (SLURM keeps finished jobs for MinJobAge), then ``sacct`` where
accounting exists. Waiting on a job always has a deadline: without accounting, submitit's ``result()``
of a job that died waits forever.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import submitit

from decmem.training.checkpoint import resolve_resume

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")


def slurm_state(job_id: str) -> dict:
    """{state, restarts, exit_code} of a SLURM job ({} if SLURM no longer knows it)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
            return {"state": fields.get("JobState", "UNKNOWN"), "restarts": int(fields.get("Restarts", 0)),
                    "exit_code": fields.get("ExitCode", "")}
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            state, code = out.stdout.strip().splitlines()[0].split("|")
            return {"state": state.split()[0], "restarts": None, "exit_code": code}
    return {}


def local_state(record: dict) -> dict:
    """State of a job run by submitit's local executor (its own bookkeeping in the logs folder)."""
    job = submitit.local.local.LocalJob(folder=record["logs"], job_id=record["job_id"],
                                        tasks=list(range(record.get("tasks_per_node", 1))))
    return {"state": job.state, "restarts": None, "exit_code": ""}


def job_state(record: dict) -> dict:
    if record.get("cluster") == "slurm":
        return slurm_state(record["job_id"]) or {"state": "UNKNOWN (no longer known to SLURM)"}
    if record.get("cluster") == "local":
        try:
            return local_state(record)
        except Exception as e:  # a job started by another process: submitit may not find its handle
            return {"state": f"UNKNOWN ({type(e).__name__})"}
    return {"state": "n/a (debug: ran in the submitting process)"}


def wait_finished(job_id: str, deadline_s: float, poll_s: float = 2.0) -> dict:
    """Poll a SLURM job until it finished; raise TimeoutError at the deadline, never hang."""
    end = time.monotonic() + deadline_s
    st: dict = {}
    while time.monotonic() < end:
        st = slurm_state(job_id)
        if st and st["state"].split()[0] in FINISHED:
            return st
        time.sleep(poll_s)
    raise TimeoutError(f"SLURM job {job_id} still {st.get('state', 'unknown')} after {deadline_s:.0f} s")


def describe(run_dir: str) -> str:
    """The lines `decmem jobs` prints."""
    path = os.path.join(run_dir, "jobs.json")
    if not os.path.exists(path):
        return f"{run_dir}: no jobs.json (nothing was submitted with `decmem submit` for this run_dir)"
    records = json.load(open(path))
    lines = [f"{'job':>10}  {'cluster':<7} {'world':>5}  {'submitted':<19}  state"]
    for r in records:
        st = job_state(r)
        extra = f", restarts {st['restarts']}" if st.get("restarts") else ""
        extra += f", exit {st['exit_code']}" if st.get("exit_code") not in (None, "", "0:0") else ""
        lines.append(f"{r['job_id']:>10}  {r['cluster']:<7} {r['world']:>5}  {r['submitted']:<19}  {st['state']}{extra}")
    ckpt = resolve_resume(run_dir, "latest")
    if ckpt:
        info = json.load(open(os.path.join(ckpt, "trainstate.json")))
        lines.append(f"last checkpoint: step {info['step']} ({ckpt}), saved {info.get('saved_at', '?')}")
    else:
        lines.append("last checkpoint: none yet")
    lines.append(f"logs: {records[-1]['logs']}")
    lines.append(f"tensorboard: tensorboard --logdir {os.path.join(run_dir, 'tb')} --host 127.0.0.1")
    return "\n".join(lines)
