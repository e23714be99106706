"""The trainer's integration tests as a table of real runs: `decmem train` (or the deepspeed launcher) in real
processes, real DeepSpeed ZeRO-3 over gloo on CPU, on rendered MiniWorld data.

RUNS below is the whole list, one row per run: name, processes, the overrides every phase shares, then its phases,
each with the overrides it adds, the fault it injects (DECMEM_FAULT, see training/faults.py), the exit code it must
end with and the check that must hold afterwards. A run with several phases runs them in the same run_dir (stop then
resume; fault then resume). `copy_of` starts from a copy of another run's folder; a check may compare with another
run (`ctx.run_dir_of("straight")`); either way that run executes once per session, whichever test needs it first.
`test_run` executes each row. The checks are written to assert what must hold afterwards, not just that something
failed (faults: issue #10; RELIABILITY.md lists them).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECMEM = [sys.executable, "-m", "decmem.cli"]
CONFIG = os.path.join(ROOT, "configs", "debug.yaml")


#################################################################################
#                                  The runner                                   #
#################################################################################

@dataclass
class Phase:
    overrides: tuple[str, ...] = ()         # added to the run's; "{tmp}" is the run's scratch folder
    fault: str | None = None                # DECMEM_FAULT for every rank of this phase
    exit: int | str = 0                     # the exit code, or "nonzero"
    check: Callable | None = None           # check(ctx) once the phase ended with the expected code
    before: Callable | None = None          # before(ctx): tamper with files, remount, set env, ...
    args: tuple[str, ...] = ()              # extra command-line arguments (--dry-run)
    timeout: int = 300


@dataclass
class Run:
    name: str
    nproc: int                              # processes (--nproc N; 1: no launcher)
    overrides: tuple[str, ...]              # shared by every phase
    phases: list[Phase]
    copy_of: str | None = None              # start from a copy of that run's run_dir
    launcher: str = "decmem"                # or "deepspeed": deepspeed --num_gpus N --module decmem.cli train ...
    needs: tuple[str, ...] = ()             # fixtures: "small_disk" (run_dir on a tiny tmpfs), "s3_server"


@dataclass
class Ctx:
    """What a check or a before-hook sees: the run's folder, its data, the last phase's result."""
    run: Run
    run_dir: str
    tmp: str
    data: str
    runs: RunCache
    fixtures: dict
    env: dict = field(default_factory=dict)             # extra environment for the following phases
    r: subprocess.CompletedProcess | None = None
    t_end: float = 0.0                                  # time.time() when the phase's command returned
    state: dict = field(default_factory=dict)           # passed from one phase's check to the next

    def run_dir_of(self, name: str) -> str:
        return self.runs.run_dir(name)


def train_cli(run_dir, data, *overrides, nproc=2, timeout=300, args=(), env=None, launcher="decmem"):
    if launcher == "deepspeed":          # it passes --local_rank before the subcommand
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc), "--module",
               "decmem.cli", "train", CONFIG]
    else:
        cmd = [*DECMEM, "train", CONFIG]
    cmd += [f"run_dir={run_dir}", f"data.data={data}", "log.progress=false", *overrides, *args]
    if nproc > 1 and launcher == "decmem":
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def execute(run: Run, tmp: str, data: str, runs: RunCache, fixtures: dict) -> Ctx:
    run_dir = os.path.join(fixtures["small_disk"] if "small_disk" in run.needs else tmp, "run")
    if run.copy_of:
        shutil.copytree(runs.run_dir(run.copy_of), run_dir)
    ctx = Ctx(run, run_dir, tmp, data, runs, fixtures)
    for i, ph in enumerate(run.phases):
        if ph.before:
            ph.before(ctx)
        over = [o.format(tmp=tmp) for o in (*run.overrides, *ph.overrides)]
        env = dict(ctx.env, **({"DECMEM_FAULT": ph.fault} if ph.fault else {}))
        ctx.r = train_cli(run_dir, ctx.data, *over, nproc=run.nproc, timeout=ph.timeout, args=ph.args, env=env,
                          launcher=run.launcher)
        ctx.t_end = time.time()
        ok = ctx.r.returncode != 0 if ph.exit == "nonzero" else ctx.r.returncode == ph.exit
        assert ok, (f"{run.name} phase {i + 1}: exit {ctx.r.returncode}, expected {ph.exit}\n"
                    + ctx.r.stdout[-2000:] + ctx.r.stderr[-4000:])
        if ph.check:
            ph.check(ctx)
    return ctx


class RunCache:
    """Each run at most once per session: a run others compare with or copy executes when first needed."""

    def __init__(self, factory, data):
        self.factory, self.data, self.done = factory, data, {}

    def get(self, name: str, fixtures: dict | None = None) -> Ctx:
        if name not in self.done:
            try:
                self.done[name] = execute(BY_NAME[name], str(self.factory.mktemp(name)), self.data, self, fixtures or {})
            except BaseException as e:              # a failed run fails every test that needs it, with its message
                self.done[name] = e
                raise
        if isinstance(self.done[name], BaseException):
            raise self.done[name]
        return self.done[name]

    def run_dir(self, name: str) -> str:
        return self.get(name).run_dir


#################################################################################
#                            Reading a run's outputs                            #
#################################################################################

def metrics(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in rows(run_dir)}


def rows(run_dir) -> list[dict]:
    """metrics.jsonl as written, one dict per line (duplicates kept: a repeated step must show)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(ckpt_dir, sub="weights"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt_dir, sub, "model.safetensors"))


def ckpt(ctx, step=None) -> str:
    d = os.path.join(ctx.run_dir, "checkpoints")
    return d if step is None else os.path.join(d, f"step-{step}")


def steps_saved(ctx) -> list[int]:
    return sorted(int(d.split("-")[1]) for d in os.listdir(ckpt(ctx)) if d.startswith("step-"))


def latest(ctx) -> str:
    return open(os.path.join(ckpt(ctx), "latest")).read()


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_sums(ckpt_dir) -> list[str]:
    """Files of a checkpoint folder that differ from its SHA256SUMS, checked here independently of the trainer."""
    bad = []
    with open(os.path.join(ckpt_dir, "SHA256SUMS")) as f:
        for line in f:
            h, name = line.rstrip("\n").split("  ", 1)
            p = os.path.join(ckpt_dir, name)
            if not os.path.isfile(p) or sha256(p) != h:
                bad.append(name)
    return bad


def assert_same_weights(a_dir, b_dir, sub="weights"):
    wa, wb = weights(a_dir, sub), weights(b_dir, sub)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{sub}: {k} differs from the uninterrupted run"


def assert_no_traceback(ctx):
    assert "Traceback" not in ctx.r.stderr, ctx.r.stderr[-4000:]


#################################################################################
#                                  The checks                                   #
#################################################################################

LONG = 24               # the 2-process runs of the trainer's features
LONG_RUN = ("log.every_steps=1", f"train.steps={LONG}", "checkpoint.every_steps=8", "checkpoint.keep=2",
            "log.heatmap_every=8", "log.rollout_every=12", "train.ema=0.9")
FAULT = 8               # the runs that a fault interrupts, and their uninterrupted reference
FAULT_RUN = ("log.every_steps=1", f"train.steps={FAULT}", "checkpoint.every_steps=4", "checkpoint.keep=2")


def learns_checkpoints_and_logs(ctx):
    m = metrics(ctx.run_dir)
    assert sorted(m) == list(range(1, LONG + 1))
    first = sum(m[s]["train/loss"] for s in range(1, 5)) / 4
    last = sum(m[s]["train/loss"] for s in range(LONG - 3, LONG + 1)) / 4
    assert last < 0.8 * first, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"
    # keep=2: step-16 and step-24 remain, latest names the last, every one complete with exportable weights
    assert steps_saved(ctx) == [16, 24] and latest(ctx) == "step-24"
    info = json.load(open(os.path.join(ckpt(ctx, 24), "trainstate.json")))
    assert info["step"] == LONG and info["layout"] == {"world": 2, "dp": 2, "cp": 1}
    assert sorted(os.listdir(os.path.join(ckpt(ctx, 24), "trainstate"))) == ["rank-00000.pt", "rank-00001.pt"]
    from decmem.training.weights import load_weights

    model, wcfg = load_weights(os.path.join(ckpt(ctx, 24), "weights"))
    assert wcfg.frame_hw == [16, 16] and wcfg.codec == "pixels"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "final_layer.linear" in n)  # trained
    with open(os.path.join(ctx.run_dir, "config.yaml")) as f:
        assert f"steps: {LONG}" in f.read()
    # EMA (decay 0.9) lags the raw weights: different, but close after 24 steps
    raw, ema = weights(ckpt(ctx, 24)), weights(ckpt(ctx, 24), "weights-ema")
    k = "final_layer.linear.weight"
    assert not torch.equal(raw[k], ema[k])
    assert (raw[k] - ema[k]).norm() < 0.5 * raw[k].norm()
    tensorboard_tags(ctx)


def tensorboard_tags(ctx):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(ctx.run_dir, "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/step_seconds", "perf/data_seconds",
                "perf/tokens_per_s", "memory/bank_tokens", "attention/gate_sgm", "attention/gate_coarse",
                "attention/entropy", "attention/dispersion_low", "attention/dispersion_high",
                "rollout/mse_vs_ground_truth"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert "retrieval/heatmap_query_frame_x_bank_frame" in images
    assert "rollout/ground_truth_vs_generated" in images
    logged = set().union(*(set(r) - {"step"} for r in rows(ctx.run_dir)))
    # the same numbers in both (README "Logs"), but the rollout's score, taken after the step's row is written
    assert scalars - logged == {"rollout/mse_vs_ground_truth"} and logged <= scalars, (scalars - logged, logged - scalars)
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] < lr[4] and lr[-1] < max(lr)                    # warmup, then cosine decay
    gif = acc.Images("rollout/ground_truth_vs_generated")[0].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")


def stopped_after_saving_half(ctx):
    assert latest(ctx) == f"step-{LONG // 2}"                      # exit 3: stopped after saving, not done


def resumed_like_straight(ctx):
    """k steps, stop, resume, k more: the same losses of steps k+1..2k and bit-identical final weights (fp32)."""
    a, b = metrics(ctx.run_dir_of("straight")), metrics(ctx.run_dir)
    for s in range(LONG // 2 + 1, LONG + 1):
        assert b[s]["train/loss"] == a[s]["train/loss"], f"step {s}: {b[s]['train/loss']} != {a[s]['train/loss']}"
        assert b[s]["train/grad_norm"] == a[s]["train/grad_norm"]
    for sub in ("weights", "weights-ema"):                        # the EMA shards resume exactly too
        assert_same_weights(os.path.join(ctx.run_dir_of("straight"), "checkpoints", f"step-{LONG}"), ckpt(ctx, LONG),
                            sub)


def names_the_saved_layout(ctx):
    assert "dp=2 x cp=1" in ctx.r.stderr and "checkpoint.init_weights=" in ctx.r.stderr, ctx.r.stderr[-3000:]


def typo_named_before_any_process(ctx):
    assert "train.stpes" in ctx.r.stderr and "train.steps" in ctx.r.stderr      # names the key, suggests the right one
    assert "torchrun" not in ctx.r.stderr.lower() and not os.path.exists(ctx.run_dir)


def two_rank_layout(ctx):
    info = json.load(open(os.path.join(ckpt(ctx, 2), "trainstate.json")))
    assert info["layout"] == {"world": 2, "dp": 2, "cp": 1}


def saved_every_step_by_the_clock(ctx):
    """checkpoint.every_minutes saves by elapsed time (here ~every step), independently of every_steps."""
    assert steps_saved(ctx) == [1, 2, 3, 4]


def skipped_step_3_on_every_rank(ctx):
    """A NaN loss on one rank: every rank skips that step (weights untouched), logs it, and training goes on."""
    m = metrics(ctx.run_dir)
    assert m[3]["train/skipped_steps"] == 1.0 and "train/loss" not in m[3]
    assert all(m[s]["train/skipped_steps"] == 0.0 for s in (1, 2, 4, 5))
    w2, w5 = weights(ckpt(ctx, 2)), weights(ckpt(ctx, 5))
    assert all(torch.isfinite(v).all() for v in w5.values())
    assert any(not torch.equal(w2[k], w5[k]) for k in w2)               # steps 4 and 5 trained
    assert "step 3: non-finite loss" in ctx.r.stderr


def stopped_with_the_last_good_weights(ctx):
    assert "3 steps in a row (up to step 5) had a non-finite loss" in ctx.r.stderr
    assert latest(ctx) == "step-5"
    w2, w5 = weights(ckpt(ctx, 2)), weights(ckpt(ctx, 5))
    for k in w2:                                                         # nothing was applied at steps 3..5
        assert torch.equal(w2[k], w5[k]), k


def resumed_like_reference(ctx):
    """Every step logged once, with the uninterrupted run's loss and grad norm; the same final weights."""
    reference = ctx.run_dir_of("reference")
    got, ref = rows(ctx.run_dir), metrics(reference)
    assert [r["step"] for r in got] == list(range(1, FAULT + 1)), "a step was lost or repeated in metrics.jsonl"
    for r in got:
        s = r["step"]
        assert r["train/loss"] == ref[s]["train/loss"], f"step {s}: {r['train/loss']} != {ref[s]['train/loss']}"
        assert r["train/grad_norm"] == ref[s]["train/grad_norm"], f"step {s}: grad norm differs"
    assert_same_weights(ckpt(ctx, FAULT), os.path.join(reference, "checkpoints", f"step-{FAULT}"))


def lost_rank_1_within_seconds(ctx):
    """Rank 1 SIGKILLs itself after its step-6 forward (rank 0 is then inside ZeRO-3's collectives): the job ends in
    seconds, not at the collective timeout, naming rank 1 and the signal."""
    err = ctx.r.stderr
    m = re.search(r"DECMEM_FAULT: rank 1 \(pid (\d+)\) SIGKILL at step 6, t=([\d.]+)", err)
    assert m, err[-3000:]
    latency = ctx.t_end - float(m.group(2))
    print(f"\nMEASURED kill -9 of rank 1 -> launcher exited {latency:.2f} s later")
    assert latency < 60, f"the job took {latency:.0f} s to notice a dead rank"
    # one line from the launcher naming the rank, its pid and the signal; one line from the survivor; no traceback
    assert f"decmem: training failed: rank 1 (pid {m.group(1)}) was killed by signal 9 (SIGKILL)" in err
    assert re.search(r"then rank 0 \(pid \d+\) stopped as a result", err), err[-3000:]
    assert_no_traceback(ctx)
    # step 5 was logged after the step-4 checkpoint, then lost with the kill
    assert [x["step"] for x in rows(ctx.run_dir)] == [1, 2, 3, 4, 5]
    assert latest(ctx) == "step-4"


def resumed_from_step_4_like_reference(ctx):
    """Resume repeats step 5 exactly once."""
    assert "resumed from" in ctx.r.stderr and "step-4 at step 4" in ctx.r.stderr
    resumed_like_reference(ctx)


def step_4_intact_and_step_8_never_taken(ctx):
    """Every rank SIGKILLed after DeepSpeed wrote its part of step-8, before the rest: step-4 stays as saved,
    ``latest`` names it, the half-written step-8 is never taken for complete."""
    summary = next((ln for ln in ctx.r.stderr.splitlines() if ln.startswith("decmem: training failed: ")), "")
    for rank in (0, 1):     # each SIGKILLs itself; should the agent SIGTERM one first, it is listed as stopped
        assert re.search(rf"rank {rank} \(pid \d+\) (was killed by signal 9 \(SIGKILL\)|stopped as a result)",
                         summary), ctx.r.stderr[-3000:]
    assert "was killed by signal 9 (SIGKILL)" in summary
    assert_no_traceback(ctx)
    partial = ckpt(ctx, 8)
    assert os.path.exists(os.path.join(partial, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))   # part was written
    assert not os.path.exists(os.path.join(partial, "COMPLETE")) and not os.path.exists(os.path.join(partial, "trainstate"))
    assert latest(ctx) == "step-4"
    assert check_sums(ckpt(ctx, 4)) == []                            # every file as it was saved
    ctx.state["sums"] = open(os.path.join(ckpt(ctx, 4), "SHA256SUMS")).read()
    from decmem.training.checkpoint import resolve_resume

    assert resolve_resume(ctx.run_dir, "latest") == ckpt(ctx, 4)
    os.remove(os.path.join(ckpt(ctx), "latest"))                     # even without the pointer: the newest complete
    assert resolve_resume(ctx.run_dir, "latest") == ckpt(ctx, 4)


def resumed_over_the_partial_save(ctx):
    assert "step-4 at step 4" in ctx.r.stderr
    assert open(os.path.join(ckpt(ctx, 4), "SHA256SUMS")).read() == ctx.state["sums"]
    assert check_sums(ckpt(ctx, 8)) == [] and os.path.exists(os.path.join(ckpt(ctx, 8), "COMPLETE"))
    resumed_like_reference(ctx)


def disk_full_named_once_step_2_intact(ctx):
    """step-2 fits, step-4 does not: one clear error naming the file and ENOSPC, exit 5, step-2 intact and
    ``latest`` on it, no partial step-4 left (nor any .tmp file)."""
    err = ctx.r.stderr
    m = re.search(r"decmem: checkpoint (\S+) was not saved: (\S+): No space left on device", err)
    assert m, err[-4000:]
    assert m.group(1) == ckpt(ctx, 4) and m.group(2).startswith(ckpt(ctx, 4) + "/")
    assert "latest still names step-2 (complete)" in err
    assert err.count("was not saved") == 1                         # agreed by the ranks, printed once (rank 0)
    assert_no_traceback(ctx)
    assert "rank 0 (pid" in err and "exited with code 5" in err
    assert steps_saved(ctx) == [2] and latest(ctx) == "step-2"
    assert check_sums(ckpt(ctx, 2)) == []
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(ctx.run_dir) for f in fs if f.endswith(".tmp")]
    assert leftovers == []
    print(f"\nMEASURED disk-full message: {m.group(0)}")


def free_space(ctx):
    subprocess.run(["mount", "-o", "remount,size=64m", ctx.fixtures["small_disk"]], check=True)


def resumed_from_step_2(ctx):
    assert "step-2 at step 2" in ctx.r.stderr
    assert [x["step"] for x in rows(ctx.run_dir)] == list(range(1, 7))


class Payload:
    """What an attacker would put in a pickle: unpickling it calls open(marker, 'w') (any call would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


TRAINSTATE = "trainstate/rank-00000.pt"
SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _rewrite_sums(ckpt_dir, name):
    """What an attacker with write access would also do: make SHA256SUMS agree with the replaced file."""
    p = os.path.join(ckpt_dir, "SHA256SUMS")
    lines = [f"{sha256(os.path.join(ckpt_dir, name))}  {name}" if ln.endswith(f"  {name}") else ln
             for ln in open(p).read().splitlines()]
    open(p, "w").write("\n".join(lines) + "\n")


def _change_one_value(path):
    """A valid DeepSpeed shard with one number changed (our own file: loading it unsafely here is fine)."""
    sd = torch.load(path, weights_only=False)

    def first_float(o):
        if torch.is_tensor(o) and o.is_floating_point() and o.numel():
            return o
        for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()):
            t = first_float(v)
            if t is not None:
                return t
        return None

    first_float(sd).view(-1)[0] += 1.0
    torch.save(sd, path, _use_new_zipfile_serialization=False)


def tamper(target, how):
    """before-hook: replace step-2's `target` by a live malicious pickle ("payload") or change one value ("value");
    "+sums": rewrite SHA256SUMS to match."""
    def before(ctx):
        path = os.path.join(ckpt(ctx, 2), target)
        ctx.state["path"], ctx.state["marker"] = path, os.path.join(ctx.tmp, "PWNED")
        if how.startswith("payload"):
            torch.save({"step": Payload(ctx.state["marker"])}, path)
            # the payload is live: an unsafe load of the same kind of file would run it
            live = os.path.join(ctx.tmp, "payload-is-live")
            torch.save({"step": Payload(live)}, os.path.join(ctx.tmp, "probe.pt"))
            torch.load(os.path.join(ctx.tmp, "probe.pt"), weights_only=False)
            assert os.path.exists(live)
        else:
            _change_one_value(path)
        if how.endswith("+sums"):
            _rewrite_sums(ckpt(ctx, 2), target)
    return before


def refused_by(what):
    def check(ctx):
        assert not os.path.exists(ctx.state["marker"]), "the tampered pickle ran"
        line = next((ln for ln in ctx.r.stderr.splitlines() if ctx.state["path"] in ln), "")
        assert line and what in ctx.r.stderr, ctx.r.stderr[-4000:]
        assert_no_traceback(ctx)
        assert not os.path.exists(ckpt(ctx, 3))                   # nothing trained from it
    check.__doc__ = f"exit 5, one line naming the file ({what!r}), the payload never ran, nothing trained"
    return check


def resumed_from_step_2_message(ctx):
    """ZeRO-1/2 and bf16 optimizer states pickle DeepSpeed's fragment_address (the ZeRO-3 fp32 runs do not): the
    weights_only allowlist must cover it, or every such resume would be refused."""
    assert "step-2 at step 2" in ctx.r.stderr


def tampered_weights(ctx):
    """model.safetensors can run no code, but changed or corrupted weights must not load silently either."""
    from safetensors.torch import load_file, save_file

    wdir = os.path.join(ctx.tmp, "weights")
    shutil.copytree(os.path.join(ctx.run_dir_of("saved"), "checkpoints", "step-2", "weights"), wdir)
    st = os.path.join(wdir, "model.safetensors")
    sd = load_file(st)
    k = sorted(sd)[0]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] += 1.0
    save_file(sd, st, metadata={"format": "decmem-weights/1"})


def weights_refused_by_sha256(ctx):
    from decmem.training.weights import load_weights

    wdir = os.path.join(ctx.tmp, "weights")
    st = os.path.join(wdir, "model.safetensors")
    assert f"{st}: refused: its sha256" in ctx.r.stderr, ctx.r.stderr[-4000:]
    assert_no_traceback(ctx)
    with open(st, "r+b") as f:                                    # corrupted: a header that is not JSON
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match=re.escape(st)):
        load_weights(wdir)


KEY_ID, SECRET = "AKIADECMEMCANARY0042", "dEcMeM/Canary+Secret-7f3a9b1c2d4e5f60718293a4"


def data_on_s3_with_canary_keys(ctx):
    import s3fs

    url = f"s3://{ctx.fixtures['s3_server']}/faults-data"
    s3fs.S3FileSystem().put(ctx.data.rstrip("/") + "/", url, recursive=True)
    ctx.data = url
    ctx.env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)


def no_credentials_anywhere(ctx):
    """The key values appear in no console output and no file of the run (config dump, metrics.jsonl, TensorBoard
    events, checkpoints)."""
    assert sorted(metrics(ctx.run_dir)) == [1, 2]                 # it really trained, from S3
    assert ctx.data in open(os.path.join(ctx.run_dir, "config.yaml")).read()
    leaks = [where for where, text in (("stdout", ctx.r.stdout), ("stderr", ctx.r.stderr))
             if KEY_ID in text or SECRET in text]
    files = [os.path.join(d, f) for d, _, fs_ in os.walk(ctx.run_dir) for f in fs_]
    assert any("tfevents" in f for f in files) and any(f.endswith("SHA256SUMS") for f in files)
    for f in files:
        raw = open(f, "rb").read()
        if KEY_ID.encode() in raw or SECRET.encode() in raw:
            leaks.append(os.path.relpath(f, ctx.run_dir))
    assert leaks == [], f"AWS credentials found in {leaks}"


#################################################################################
#                                  The table                                    #
#################################################################################

TAMPER = ("train.steps=3", "checkpoint.every_steps=2")
ZERO2 = ("checkpoint.every_steps=2", "train.zero_stage=2", "train.precision=bf16")

RUNS = [
    # --- the trainer's features (2 ranks, ZeRO-3 unless said) -------------------------------------------------
    Run("straight", 2, LONG_RUN, [Phase(check=learns_checkpoints_and_logs)]),
    Run("stop_and_resume", 2, LONG_RUN, [
        Phase((f"train.stop_at={LONG // 2}",), exit=3, check=stopped_after_saving_half),
        Phase(check=resumed_like_straight)]),
    Run("changed_layout_refused", 2, LONG_RUN, copy_of="straight", phases=[
        Phase((f"train.steps={LONG + 2}", "train.cp=2"), exit="nonzero", check=names_the_saved_layout)]),
    Run("config_typo_refused", 2, ("train.stpes=3",), [Phase(exit=2, check=typo_named_before_any_process, timeout=60)]),
    Run("deepspeed_launcher", 2, ("train.steps=2",), launcher="deepspeed", phases=[Phase(check=two_rank_layout)]),
    Run("wall_clock_checkpoints", 1, ("train.steps=4", "checkpoint.every_steps=0", "checkpoint.every_minutes=0.0001",
                                      "checkpoint.keep=10"), [Phase(check=saved_every_step_by_the_clock)]),
    Run("nan_skips_one_step", 2, ("train.steps=5", "log.every_steps=1", "checkpoint.every_steps=2",
                                  "checkpoint.keep=5"), [
        Phase(fault="nan:rank=1:step=3", check=skipped_step_3_on_every_rank)]),
    Run("nan_in_a_row_stops", 1, ("train.steps=20", "checkpoint.every_steps=2", "checkpoint.keep=5",
                                  "train.max_nonfinite=3"), [
        Phase(fault="nan:rank=0:step=3:count=10", exit=4, check=stopped_with_the_last_good_weights)]),
    # --- faults (issue #10, RELIABILITY.md): interrupted runs must resume to the reference's losses and weights -----
    Run("reference", 2, FAULT_RUN, [Phase()]),
    Run("kill9_one_rank_mid_step", 2, FAULT_RUN, [
        Phase(fault="kill:rank=1:step=6", exit="nonzero", check=lost_rank_1_within_seconds, timeout=240),
        Phase(("checkpoint.resume=latest",), check=resumed_from_step_4_like_reference)]),
    Run("kill9_whole_job_during_save", 2, FAULT_RUN, [
        Phase(fault="killsave:step=8", exit="nonzero", check=step_4_intact_and_step_8_never_taken, timeout=240),
        Phase(check=resumed_over_the_partial_save)]),
    Run("disk_full_during_save", 2, ("log.every_steps=1", "train.steps=6", "checkpoint.every_steps=2",
                                     "checkpoint.keep=3"), needs=("small_disk",), phases=[
        Phase(exit=5, check=disk_full_named_once_step_2_intact, timeout=240),
        Phase(before=free_space, check=resumed_from_step_2, timeout=240)]),
    Run("saved", 1, ("train.steps=2", "checkpoint.every_steps=2"), [Phase()]),
    Run("tampered_trainstate", 1, TAMPER, copy_of="saved", phases=[
        Phase(before=tamper(TRAINSTATE, "payload"), exit=5, check=refused_by("SHA256SUMS"), timeout=180)]),
    Run("tampered_trainstate_and_sums", 1, TAMPER, copy_of="saved", phases=[
        Phase(before=tamper(TRAINSTATE, "payload+sums"), exit=5, check=refused_by("refused to unpickle"), timeout=180)]),
    Run("tampered_deepspeed_shard_and_sums", 1, TAMPER, copy_of="saved", phases=[  # DeepSpeed loads weights_only=False
        Phase(before=tamper(SHARD, "payload+sums"), exit=5, check=refused_by("refused to unpickle"), timeout=180)]),
    Run("deepspeed_shard_value_changed", 1, TAMPER, copy_of="saved", phases=[
        Phase(before=tamper(SHARD, "value"), exit=5, check=refused_by("SHA256SUMS"), timeout=180)]),
    Run("zero2_bf16_resume", 1, ZERO2, [
        Phase(("train.steps=2",)),
        Phase(("train.steps=3",), check=resumed_from_step_2_message)]),
    Run("tampered_weights_refused", 1, ("train.steps=1", "checkpoint.resume=none",
                                        "checkpoint.init_weights={tmp}/weights"), [
        Phase(before=tampered_weights, exit=5, check=weights_refused_by_sha256, timeout=180)]),
    Run("credentials_do_not_leak", 2, ("train.steps=2", "checkpoint.every_steps=2", "log.every_steps=1",
                                       "log.heatmap_every=1"), needs=("s3_server",), phases=[
        Phase(before=data_on_s3_with_canary_keys, check=no_credentials_anywhere, timeout=240)]),
]
BY_NAME = {r.name: r for r in RUNS}
assert len(BY_NAME) == len(RUNS), "run names must be unique"


#################################################################################
#                                  The test                                     #
#################################################################################

def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must run the disk-full test: run it as root where tmpfs can be mounted)")
    pytest.skip(why)


@pytest.fixture
def small_disk(tmp_path):
    """A 4.5 MiB tmpfs: one debug checkpoint (~3 MB) fits, a second one does not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        _unavailable("not root: cannot mount a tmpfs for the disk-full test")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4608k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        _unavailable(f"mount -t tmpfs failed: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    return RunCache(tmp_path_factory, data)


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_run(run, runs, request):
    fixtures = {name: request.getfixturevalue(name) for name in run.needs}
    runs.get(run.name, fixtures)


def test_the_table_reads_as_documented():
    for run in RUNS:
        assert run.phases and run.nproc >= 1 and (run.copy_of is None or run.copy_of in BY_NAME), run.name
        assert all(ph.exit == "nonzero" or isinstance(ph.exit, int) for ph in run.phases), run.name


