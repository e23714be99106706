"""`decmem submit` against a real one-node SLURM on localhost: a 2-task job, preemption + requeue, a crashing task.

Needs Debian's slurmctld/slurmd/munge (``make sysdeps``) and root to start them. Where they are missing the
tests skip, except under CI=true, where a missing SLURM is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest

from decmem.slurm.jobs import slurm_state, wait_finished
from devtools import local_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "debug.yaml")
STEPS = 40
COMMON = [f"train.steps={STEPS}", "log.every_steps=1", "checkpoint.every_steps=20", "log.progress=false"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running local cluster: the one CI started, else one started (and stopped) here."""
    conf = os.environ.get("SLURM_CONF")
    if conf and local_cluster.is_up(os.path.dirname(conf)):
        yield conf
        return
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("SLURM is not installed or not startable here (CI must run these tests): run `make sysdeps`")
        pytest.skip("no slurmctld/slurmd on this machine (make sysdeps) or not root")
    d = str(tmp_path_factory.mktemp("slurm"))
    conf = local_cluster.start(d)
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        local_cluster.stop(d)
        os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "data"
    subprocess.run([sys.executable, "-m", "decmem.cli", "preprocess", "--format", "render",
                    "scenes=4,frames=48,hw=16x16,seed=0", str(out), "--segment-frames", "24", "--shard-bytes", "40KB",
                    "--quiet"], check=True, cwd=ROOT)
    return str(out)


def submit(run_dir, data, *overrides, env=None, extra=()):
    r = subprocess.run([sys.executable, "-m", "decmem.cli", "submit", CONFIG, f"run_dir={run_dir}",
                        f"data.data={data}", *COMMON, *overrides, "--tasks-per-node", "2", "--time", "10", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(os.path.join(run_dir, "jobs.json")))[-1]["job_id"]


def logs(run_dir, job_id, ext="out"):
    d = os.path.join(run_dir, "submitit")
    return {t: open(os.path.join(d, f"{job_id}_{t}_log.{ext}")).read() for t in (0, 1)}


def explain(run_dir, job_id) -> str:
    """Everything that says why a job ended as it did, as one string (pytest prints string messages whole): the
    tail of every task's log, SLURM's record of the job and the controller's and node daemon's lines about it."""
    parts = []
    for t in (0, 1):
        for ext in ("err", "out"):
            p = os.path.join(run_dir, "submitit", f"{job_id}_{t}_log.{ext}")
            text = open(p).read() if os.path.exists(p) else "(missing)"
            parts.append(f"--- task {t} {ext} (last 3000 chars) ---\n{text[-3000:]}")
    show = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    parts.append(f"--- scontrol show job {job_id} ---\n{show.stdout}{show.stderr}")
    conf = os.environ.get("SLURM_CONF")
    for name in ("slurmctld.log", "slurmd.log"):
        p = os.path.join(os.path.dirname(conf), name) if conf else ""
        if os.path.exists(p):
            lines = [l for l in open(p, errors="replace") if f"JobId={job_id}" in l or f"job {job_id}" in l
                     or f"StepId={job_id}." in l or "error" in l.lower()]
            parts.append(f"--- {name}: lines on job {job_id} and errors (last 40) ---\n{''.join(lines[-40:])}")
    return "\n".join(parts)


def weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step}", "weights", "model.safetensors"))


@pytest.fixture(scope="module")
def straight(slurm, data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("slurm-straight") / "run")
    job = submit(run_dir, data)
    st = wait_finished(job, deadline_s=240)
    return run_dir, job, st


def test_two_task_job_completes(straight):
    run_dir, job, st = straight
    assert st["state"] == "COMPLETED", f"{st}\n{explain(run_dir, job)}"
    out = logs(run_dir, job)
    assert "rank 0/2" in out[0] and "rank 1/2" in out[1]                # both ranks ran, each in its own log
    assert "finished training: done" in out[0] and "finished training: done" in out[1]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step-{STEPS}"
    assert os.listdir(os.path.join(run_dir, "tb"))
    # the code as submitted and the resolved config the job loaded
    rec = json.load(open(os.path.join(run_dir, "jobs.json")))[-1]
    assert os.path.exists(os.path.join(rec["code"], "decmem", "training", "trainer.py"))
    assert os.path.exists(os.path.join(rec["code"], "run.yaml"))
    jobs = subprocess.run([sys.executable, "-m", "decmem.cli", "jobs", run_dir], cwd=ROOT, capture_output=True,
                          text=True, timeout=60).stdout
    assert f"{job}" in jobs and "COMPLETED" in jobs and f"step {STEPS}" in jobs and "tensorboard --logdir" in jobs


def _preempt_and_resume(data, run_dir):
    """Submit, send USR2 after 8 logged steps, check the save and the requeue, start the requeued job now and
    wait for it -> (job id, final state)."""
    job = submit(run_dir, data)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 8):
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    # every rank saves the step after the signal, rank 0 requeues: the job goes back to PENDING
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and slurm_state(job).get("restarts", 0) < 1:
        time.sleep(0.5)
    st = slurm_state(job)
    assert st["restarts"] == 1, f"{st}\n{explain(run_dir, job)}"
    saved = int(open(os.path.join(run_dir, "checkpoints", "latest")).read().split("-")[1])
    assert 8 <= saved < STEPS
    # SLURM holds a requeued job back for a couple of minutes (Reason=BeginTime); once it is pending, start it now
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and slurm_state(job)["state"] != "PENDING":
        time.sleep(0.3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    return job, wait_finished(job, deadline_s=240)


def test_preemption_saves_requeues_and_resumes(straight, data, tmp_path):
    ref_dir = straight[0]
    # One CI run (of many here and there) saw the requeued job end FAILED (exit 1) with only a truncated log to
    # show for it, never reproduced locally (0 of 8). Until it is explained, a first failure is reported in full
    # as a warning (CI prints the warnings summary) and the scenario runs once more from scratch; a second
    # failure fails the test.
    for attempt in (1, 2):
        run_dir = str(tmp_path / f"run{attempt}")
        job, st = _preempt_and_resume(data, run_dir)
        if st["state"] == "COMPLETED":
            break
        if attempt == 1:
            warnings.warn(f"requeued SLURM job {job} ended {st} on attempt 1 of 2:\n{explain(run_dir, job)}")
    assert st["state"] == "COMPLETED", f"{st}\n{explain(run_dir, job)}"
    out = logs(run_dir, job)[0]
    assert "finished training: requeue" in out and "requeued" in out and "finished training: done" in out
    assert "resumed from" in logs(run_dir, job, "err")[0]
    # same final step count and bit-identical weights as the uninterrupted job
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step-{STEPS}"
    a, b = weights(ref_dir, STEPS), weights(run_dir, STEPS)
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_a_crashing_task_fails_the_job_quickly(slurm, data, tmp_path):
    run_dir = str(tmp_path / "run")
    t0 = time.monotonic()
    job = submit(run_dir, data, env={"DECMEM_FAULT": "crash:rank=1:step=5"})
    st = wait_finished(job, deadline_s=120)                              # raises instead of hanging
    assert st["state"] == "FAILED", st
    assert time.monotonic() - t0 < 90                                     # not the collective timeout (300 s)
    err = logs(run_dir, job, "err")[1]
    assert "InjectedFault" in err and "rank 1 crashes at step 5" in err


def test_dry_run_for_4_nodes_x_8_gpus(tmp_path):
    r = subprocess.run([sys.executable, "-m", "decmem.cli", "submit", os.path.join(ROOT, "configs", "paper.yaml"),
                        f"run_dir={tmp_path}/paper", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                        "--time", "1440", "--account", "proj", "--qos", "high", "--constraint", "a100", "--mem", "400G",
                        "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --mem=400G", "#SBATCH --signal=USR2@120", "#SBATCH --requeue"):
        assert line in out, f"{line} missing from:\n{out}"
    assert "world 32 = dp 8 x cp 4" in out and "--kill-on-bad-exit=1" in out
    assert not os.path.exists(tmp_path / "paper" / "jobs.json")            # nothing submitted


def test_local_cluster_runs_the_same_job_without_slurm(data, tmp_path):
    """--cluster local: the same submitit job function, 2 local processes, no SLURM involved."""
    run_dir = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "decmem.cli", "submit", CONFIG, f"run_dir={run_dir}", f"data.data={data}",
                        "train.steps=6", "checkpoint.every_steps=3", "log.progress=false", "--cluster", "local",
                        "--tasks-per-node", "2", "--wait", "200"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FINISHED" in r.stdout, r.stdout + r.stderr[-3000:]
    job = json.load(open(os.path.join(run_dir, "jobs.json")))[-1]["job_id"]
    out = logs(run_dir, job)
    assert "rank 0/2" in out[0] and "rank 1/2" in out[1]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step-6"


def test_the_job_imports_the_snapshot_not_the_installation(tmp_path):
    """The snapshot lays the folders out as installed (decmem/<folder>/); first on PYTHONPATH, it wins over the
    installed (or editable) decmem, so edits to the checkout after submission do not reach the job."""
    from decmem.slurm import submit

    code = submit.snapshot_code(str(tmp_path / "code"))
    r = subprocess.run([sys.executable, "-c", "import decmem.slurm.job as j, decmem.training.config as c; "
                        "print(j.__file__); print(c.__file__)"], cwd=code, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": code}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(os.path.realpath(f).startswith(os.path.realpath(code) + os.sep) for f in r.stdout.split()), r.stdout
    # from a checkout (editable install) the other tracked files keep their paths; a wheel has no configs/ to copy
    if os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(submit.__file__)), "configs")):
        assert os.path.isfile(os.path.join(code, "configs", "debug.yaml"))
