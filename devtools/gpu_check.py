"""The GPU check: one command that installs the carried wheels offline, then measures what only a GPU can tell.

    make gpu-wheels                     # on a machine with a registry: wheels/ (DeepSpeed without ops, PyAV, ...)
    make gpu-check                      # on the GPU machine: python3 -m devtools.gpu_check --wheels wheels
    python3 -m devtools.gpu_check --cpu-smoke --no-install --out /tmp/gc.json   # anywhere: every part at tiny size

Steps, each with its own time budget (seconds; the whole run stays under --budget-s, 8 minutes by default):

  install          pip install --no-index --find-links WHEELS -r WHEELS/requirements.txt, then the project
                   itself (pip install --no-index --no-deps --no-build-isolation -e .)
  env              torch / CUDA / device, and which modules import (deepspeed, webdataset, av, flash_attn, ...)
  backends         every attention backend of model/kernels.py BACKENDS (read at run time, so a backend added
                   there is checked too) against the fp64 math reference: forward (out, lse) and backward
                   (dq, dk, dv, d key_bias), bf16 and fp32, with and without per-key bias + mask; max errors and
                   the tolerance each was held to; a backend that cannot run here is skipped with the reason
  train_zero3      the trainer as `decmem train` runs it on one process (training.trainer.train), configs/paper.yaml
                   with overrides: the B size, bf16, DeepSpeed ZeRO-3, a few steps on built-in synthetic data
                   (data_pipeline/synthetic.py: numpy only, no rendering): step times (metrics.jsonl), peak GPU
                   memory, and the `--dry-run` estimate of the same run beside them
  train_zero2_ac   the same with ZeRO-2 + activation checkpointing
  bench_attention  `decmem bench attention -c configs/bench_gpu.yaml` (1560-token frames, bank 56 -> 448),
                   decmem and dense in one run
  bench_generate   `decmem bench generate -c configs/bench_generate_gpu.yaml` (the B model), decmem and dense
                   side by side, one command per bank size (a point that fails costs only its own bank size)
  train_zero3_ac   train_zero3 with activation checkpointing: DeepSpeed re-gathers each block's weights for the
                   recompute inside backward (checked on CPU only so far); last, so it spends only what is left

The steps that import the project run decmem.bench.gpu_check (backends, train) or the `decmem` command (bench)
in child processes: this module itself imports the standard library only (devtools/ imports no project package,
tests/test_layout.py), since it has to start before the wheels and the project are installed.

Every step runs in a child process with a timeout (its process group is ended when it runs over), so one that
crashes or hangs is recorded as failed / timeout and the others still run. A step that cannot run here (no CUDA
device, a module that does not import, no wheels folder) is recorded as skipped with the reason. The script then
writes one JSON (--out) and prints a summary; it exits 0 once the JSON is written (--strict: 1 if a step failed).

Without CUDA every GPU step is skipped; --cpu-smoke instead runs each step at a tiny size on the CPU (debug model,
16x16 frames, two training steps), which is what tests/test_gpu_check.py runs in CI. It never touches CUDA itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = 1
STEPS = ("install", "env", "backends", "train_zero3", "train_zero2_ac", "bench_attention", "bench_generate",
         "train_zero3_ac")
PARTS = STEPS[2:]                     # what --parts selects from (install and env always run)
BUDGETS = {"install": 60, "env": 30, "backends": 40, "train_zero3": 80, "train_zero2_ac": 80, "bench_attention": 60,
           "bench_generate": 150, "train_zero3_ac": 60}
# what a step needs to import (checked by the env step; a step whose modules do not import is skipped)
NEEDS = {"backends": ("torch", "decmem.bench.gpu_check"),
         "train_zero3": ("decmem.bench.gpu_check", "deepspeed", "webdataset", "av"),
         "train_zero2_ac": ("decmem.bench.gpu_check", "deepspeed", "webdataset", "av"),
         "train_zero3_ac": ("decmem.bench.gpu_check", "deepspeed", "webdataset", "av"),
         "bench_attention": ("decmem.cli.main",),
         "bench_generate": ("decmem.cli.main",)}
PROBE_MODULES = ("torch", "triton", "deepspeed", "webdataset", "av", "submitit", "braceexpand", "decmem.bench.gpu_check",
                 "decmem.cli.main", "flash_attn", "xformers")
MiB = float(1 << 20)


#################################################################################
#                                    Helpers                                    #
#################################################################################

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _clean(obj):
    """Strict-JSON-safe copy: NaN / inf -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def run_command(cmd: list[str], timeout: float, log_path: str, env: dict | None = None) -> dict:
    """Run cmd in its own process group from the repository root, output to log_path; end the group at timeout."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    with open(log_path, errors="replace") as f:
        out = f.read()
    return {"command": shlex.join(cmd), "rc": proc.returncode, "timed_out": timed_out,
            "seconds": round(time.monotonic() - t0, 2), "log": log_path, "output_tail": _tail(out)}


def install_commands(wheels: str, python: str = sys.executable) -> list[list[str]]:
    """The offline install: the carried wheels (pip resolves their dependencies from the folder and from what the
    machine has; --no-index: nothing is fetched), then the project itself, editable, without its dependencies."""
    return [
        [python, "-m", "pip", "install", "--no-index", "--find-links", wheels, "--no-cache-dir",
         "--disable-pip-version-check", "-r", os.path.join(wheels, "requirements.txt")],
        [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "--disable-pip-version-check", "-e", ROOT],
    ]


def fallback_command(wheels: str, python: str = sys.executable) -> list[str]:
    """When pip cannot resolve the first install against the machine's own packages (a pin of theirs it cannot
    meet offline): every carried package with --no-deps, the machine's packages left as they are."""
    return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", wheels, "--no-cache-dir",
            "--disable-pip-version-check", "-r", os.path.join(wheels, "requirements-nodeps.txt")]


#################################################################################
#                        Workers (run in child processes)                       #
#################################################################################

def worker_env(spec: dict) -> dict:
    import importlib
    import platform

    mods = {}
    for name in spec["modules"]:
        try:
            m = importlib.import_module(name)
            mods[name] = {"ok": True, "version": getattr(m, "__version__", None)}
        except Exception as e:                               # noqa: BLE001 -- any import failure is the answer
            mods[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "cpus": os.cpu_count(), "modules": mods}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = bool(torch.cuda.is_available())
        if out["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            out["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_mib": round(p.total_memory / MiB),
                             "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
    except Exception as e:                                   # noqa: BLE001
        out["torch_error"] = f"{type(e).__name__}: {e}"
        out["cuda_available"] = False
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        out["git"] = {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())} \
            if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


WORKERS = {"env": worker_env}


def run_worker(name: str, spec: dict, timeout: float, work: str, tag: str) -> dict:
    """One worker in a child process (a fresh interpreter: it sees what the install step installed). env is this
    module's own (standard library); the others are decmem.bench.gpu_check's, which import the project."""
    spec_path, result_path = os.path.join(work, f"{tag}.spec.json"), os.path.join(work, f"{tag}.result.json")
    cmd = ([sys.executable, "-m", "devtools.gpu_check", "--worker", name] if name in WORKERS else
           [sys.executable, "-m", "decmem.bench.gpu_check", name]) + ["--spec", spec_path, "--result", result_path]
    write_json(spec_path, spec)
    if os.path.exists(result_path):
        os.remove(result_path)
    r = run_command(cmd, timeout, os.path.join(work, f"{tag}.log"))
    res = {}
    if os.path.exists(result_path):      # a worker stopped by the timeout may still have written a (partial) result
        with open(result_path) as f:
            res = json.load(f)
    if r["timed_out"]:
        res["status"] = "timeout"
        res["reason"] = f"ran past its {timeout:.0f} s budget" + (f"; {res['reason']}" if res.get("reason") else "")
    elif not res:
        res = {"status": "failed", "reason": f"worker exited {r['rc']} without a result"}
    res.setdefault("status", "ok")
    res["log_tail"] = _tail(r["output_tail"], 2000)
    return res


#################################################################################
#                           The steps (parent process)                          #
#################################################################################

def plan(args, work: str) -> dict:
    """Per step: what it runs, at the chosen scale."""
    smoke = args.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    py = [sys.executable, "-m", "decmem.cli"]
    steps: dict = {}
    steps["backends"] = {
        "devices": ["cpu"] if smoke else ["cuda"],
        "backends": [b for b in args.backends.split(",") if b] if args.backends != "all" else [],
        "shape": ({"batch": 1, "heads": 2, "queries": 32, "keys": 80, "head_dim": 16} if smoke else
                  {"batch": 2, "heads": 16, "queries": 1024, "keys": 4096, "head_dim": 64}),
        "repeats": 0 if smoke else 5,
    }
    for name, extra in (("train_zero3", ["train.zero_stage=3", "train.activation_checkpointing=false"]),
                        ("train_zero2_ac", ["train.zero_stage=2", "train.activation_checkpointing=true"]),
                        ("train_zero3_ac", ["train.zero_stage=3", "train.activation_checkpointing=true"])):
        run_dir = os.path.join(work, name)
        if smoke:      # the debug model at 16x16 on the CPU, fp32 (bf16 is the GPU's precision)
            frames, hw, clips, config = 12, "16x16", 2, "configs/debug.yaml"
            shape = ["data.clip_frames=12", "data.min_context=2", "data.target_chunks=2", "train.precision=fp32",
                     "train.device=cpu", "train.threads=1"]
        else:          # the B model with the paper's attention geometry (256 tokens / frame, blocks of 16), bf16
            frames, hw, clips, config = args.train_clip_frames, "32x32", 4, "configs/paper.yaml"
            shape = [f"data.clip_frames={frames}", f"data.min_context={frames - 8}", "data.target_chunks=2",
                     "model.latent_channels=3", "train.precision=bf16", "train.device=cuda"]
        data_dir = os.path.join(work, f"train_data_{clips}x{frames}x{hw}")     # made by the first run, then reused
        steps[name] = {
            "run_dir": run_dir, "data_dir": data_dir, "device": dev,
            "config": config, "data_spec": f"clips={clips},frames={frames},hw={hw},seed=0", "frames": frames,
            "warmup_steps": 1 if smoke else 2,
            "overrides": [f"run_dir={run_dir}", f"data.data={data_dir}", *shape, *extra,
                          f"train.steps={args.train_steps}", "train.cp=1", "train.grad_accum=1", "data.batch_size=1",
                          "data.interleave=1", "data.prefetch=2", "optim.warmup_steps=1",
                          "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.keep=1",
                          "checkpoint.export_weights=false", "checkpoint.resume=none",
                          "log.every_steps=1", "log.heatmap_every=0", "log.rollout_every=0"],
        }
    if smoke:
        att = [*py, "bench", "attention", "-c", "configs/debug.yaml", "--strategies", "decmem,dense",
               "--bank-frames", "4,8", "--repeats", "1", "bench.warmup=0", "bench.device=cpu", "bench.threads=1"]
        gen_banks = [4]
        gen = [*py, "bench", "generate", "-c", "configs/debug.yaml", "--strategies", "decmem,dense",
               "bench_generate.latent_h=8", "bench_generate.latent_w=8", "bench_generate.sample_steps=1",
               "bench_generate.chunks=1", "bench_generate.warmup_chunks=0", "bench_generate.threads=1",
               "bench_generate.device=cpu", "bench_generate.dtype=float32"]
    else:
        # both SGM reads side by side (gather, FlexAttention block mask): issue #19 keeps the faster one
        att = [*py, "bench", "attention", "-c", "configs/bench_gpu.yaml", "--strategies", args.strategies,
               "--bank-frames", args.attention_bank_frames, "--sparse-backends", "gather,flex"]
        gen_banks = [int(v) for v in args.generate_bank_frames.split(",") if v]
        gen = [*py, "bench", "generate", "-c", "configs/bench_generate_gpu.yaml", "--strategies", args.strategies]
    steps["bench_attention"] = {"commands": [(att + ["--json", os.path.join(work, "attention.json")],
                                              os.path.join(work, "attention.json"))]}
    steps["bench_generate"] = {"commands": [
        (gen + ["--bank-frames", str(T), "--json", os.path.join(work, f"generate_{T}.json")],
         os.path.join(work, f"generate_{T}.json")) for T in gen_banks]}
    return steps


def step_install(args) -> dict:
    if args.no_install:
        return {"status": "skipped", "reason": "--no-install"}
    wheels = os.path.abspath(args.wheels)
    cmds = install_commands(wheels)
    rec: dict = {"wheels": wheels, "commands": [shlex.join(c) for c in cmds],
                 "fallback_command": shlex.join(fallback_command(wheels))}
    if args.install_dry_run:
        for c in rec["commands"]:
            print("would run:", c)
        return dict(rec, status="skipped", reason="--install-dry-run: commands recorded, not run")
    if not os.path.isfile(os.path.join(wheels, "requirements.txt")):
        return dict(rec, status="skipped", reason=f"no wheels folder {wheels} (with requirements.txt): build it with "
                                                  "`make gpu-wheels` on a machine with a package registry")
    if not args.cpu_smoke:          # the wheels are for the GPU machine: leave a machine without CUDA as it is
        probe = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"],
                               capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
            why = "torch.cuda.is_available() is False" if probe.returncode == 3 else _tail(last, 300)
            return dict(rec, status="skipped", reason=f"no CUDA device ({why}): nothing installed "
                                                      "(--cpu-smoke installs anyway)")
    files = sorted(os.listdir(wheels))
    rec["files"] = files
    rec["size_mib"] = round(sum(os.path.getsize(os.path.join(wheels, f)) for f in files) / MiB, 1)
    rec["runs"] = []
    deadline = time.monotonic() + args.budget_install
    for i, c in enumerate(cmds):
        r = run_command(c, deadline - time.monotonic(), os.path.join(args.work, f"install_{i}.log"))
        rec["runs"].append(r)
        if r["rc"] != 0 and i == 0 and not r["timed_out"] and \
                os.path.isfile(os.path.join(wheels, "requirements-nodeps.txt")):
            rec["fallback_used"] = True
            r = run_command(fallback_command(wheels), deadline - time.monotonic(),
                            os.path.join(args.work, "install_0_nodeps.log"))
            rec["runs"].append(r)
        if r["rc"] != 0:
            return dict(rec, status="timeout" if r["timed_out"] else "failed",
                        reason=f"`{r['command']}` exited {r['rc']}")
    return dict(rec, status="ok")


def skip_reason(part: str, env: dict, smoke: bool) -> str | None:
    if not smoke and not env.get("cuda_available"):
        why = env.get("torch_error") or "torch.cuda.is_available() is False"
        return f"no CUDA device ({why}); --cpu-smoke runs this step at a tiny size on the CPU"
    mods = env.get("modules", {})
    for m in NEEDS[part]:
        if not mods.get(m, {}).get("ok"):
            return f"module {m} does not import: {mods.get(m, {}).get('error', 'not probed')}"
    return None


def step_bench(spec: dict, budget: float, work: str, tag: str) -> dict:
    """Run each bench command (each its own point set) while the step's budget lasts; collect rows and targets."""
    deadline = time.monotonic() + budget
    runs = []
    for i, (cmd, json_path) in enumerate(spec["commands"]):
        left = deadline - time.monotonic()
        if left < 5:
            runs.append({"command": shlex.join(cmd), "status": "skipped", "reason": "the step's budget was spent"})
            continue
        if os.path.exists(json_path):
            os.remove(json_path)
        r = run_command(cmd, left, os.path.join(work, f"{tag}_{i}.log"))
        r["status"] = "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 else "failed")
        if r["status"] != "ok":
            r["reason"] = "ran past the step's budget" if r["timed_out"] else f"exited {r['rc']}"
        if os.path.exists(json_path):
            with open(json_path) as f:
                r["rows"] = json.load(f)
            for row in r["rows"]:
                row.pop("machine", None)                     # the env step records the machine once
            targets = os.path.splitext(json_path)[0] + ".targets.json"
            if os.path.exists(targets):
                with open(targets) as f:
                    r["targets"] = json.load(f)
        runs.append(r)
    statuses = [r["status"] for r in runs]
    status = "ok" if all(s == "ok" for s in statuses) else next(s for s in ("timeout", "failed", "skipped")
                                                                  if s in statuses)
    res = {"status": status, "runs": runs}
    if status != "ok":
        bad = next(r for r in runs if r["status"] != "ok")
        res["reason"] = f"{bad['reason']}: {bad['command']}"
    return res


def summarize(record: dict) -> str:
    lines = [f"GPU check ({record['mode']}), {record.get('env', {}).get('device', {}).get('name', 'no CUDA device')}, "
             f"{record['seconds']:.0f} s of {record['budget_s']:.0f} s budget -> {record['out']}"]
    for name in STEPS:
        s = record["steps"].get(name)
        if s is None:
            continue
        info = s.get("reason", "")
        if name == "backends" and "counts" in s:
            c = s["counts"]
            info = f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped over {', '.join(s['backends'])}"
            seen = {}                                          # one line per backend and reason, not per case
            for r in s["results"]:
                if r["status"] != "ok":
                    why = r.get("reason") or "over tolerance: " + ", ".join(
                        k for k, e in r.get("errors", {}).items() if not e.get("ok"))
                    seen.setdefault((r["backend"], r["status"], why), []).append(f"{r['device']}/{r['dtype']}/{r['case']}")
            for (backend, status, why), cases in list(seen.items())[:12]:
                info += f"\n      {backend} {status} ({len(cases)} cases, e.g. {cases[0]}): {why}"
        elif name.startswith("train") and s.get("step_seconds"):
            mem = s.get("peak_gpu_allocated_mib")
            info = (f"median step {s.get('step_seconds_median', float('nan')):.3f} s over {s.get('steps_timed')} steps"
                    + (f", peak GPU {mem / 1024:.2f} GiB allocated" if mem is not None else
                       f", peak RSS {s.get('peak_rss_mib', 0):.0f} MiB"))
        elif name.startswith("bench") and s.get("runs"):
            parts = []
            for r in s["runs"]:
                for row in r.get("rows", []):
                    key = "median_ms" if "median_ms" in row else "sec_per_latent"
                    val = row[key] * (1 if key == "median_ms" else 1e3)
                    parts.append(f"{row['strategy']}@{row['bank_frames']}: {val:.1f} "
                                 f"{'ms' if key == 'median_ms' else 'ms/latent'}")
                if r.get("status") != "ok":
                    parts.append(f"[{r.get('status')}: {r.get('reason', 'rc=' + str(r.get('rc')))}]")
            info = "; ".join(parts)
        lines.append(f"  {name:<16} {s['status']:<8} {s.get('seconds', 0):6.1f} s  {info}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Install the carried wheels offline, then run the GPU check: attention "
                                            "backends, DeepSpeed training at the B size, paper-scale benchmarks.",
                                epilog="Steps, budgets and output: see the module docstring (devtools/gpu_check.py).")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON to write")
    p.add_argument("--work", default=None, help="logs, data and runs (default: <out dir>/work)")
    p.add_argument("--wheels", default="wheels", help="folder from `make gpu-wheels` (default: wheels)")
    p.add_argument("--no-install", action="store_true", help="skip the install step (packages already there)")
    p.add_argument("--install-dry-run", action="store_true", help="record and print the install commands, run none")
    p.add_argument("--cpu-smoke", action="store_true", help="run every step at a tiny size on the CPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--backends", default="all", help="comma-separated backends to check (default: all of BACKENDS)")
    p.add_argument("--strategies", default="decmem,dense", help="strategies of both benchmarks (default: decmem,dense)")
    p.add_argument("--attention-bank-frames", default="56,112,224,448")
    p.add_argument("--generate-bank-frames", default="56,448", help="one `bench generate` command per value")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps per training run (8; smoke: 2)")
    p.add_argument("--train-clip-frames", type=int, default=64,
                   help="latent frames per training clip (bank = this - 8; default 64)")
    p.add_argument("--budget-s", type=float, default=465.0, help="the whole run, seconds (default 465: under 8 min)")
    for name in STEPS:
        p.add_argument(f"--budget-{name.replace('_', '-')}", type=float, default=BUDGETS[name],
                       help=f"seconds for step {name} (default {BUDGETS[name]})")
    p.add_argument("--strict", action="store_true", help="exit 1 when a step failed or timed out")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:                                          # a child process: one worker, its result as JSON
        with open(args.spec) as f:
            spec = json.load(f)
        write_json(args.result, WORKERS[args.worker](spec))
        return 0

    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}, expected a subset of {','.join(PARTS)}")
    if args.train_steps is None:
        args.train_steps = 2 if args.cpu_smoke else 8
    args.out = os.path.abspath(args.out)
    args.work = os.path.abspath(args.work or os.path.join(os.path.dirname(args.out), "work"))
    os.makedirs(args.work, exist_ok=True)
    t_start = time.monotonic()
    record: dict = {"schema": SCHEMA, "started": _now(), "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                    "argv": sys.argv[1:] if argv is None else list(argv), "out": args.out, "work": args.work,
                    "budget_s": args.budget_s, "parts": parts, "steps": {}}

    def left() -> float:
        return args.budget_s - (time.monotonic() - t_start)

    def timed_step(name, fn):
        budget = min(getattr(args, f"budget_{name}"), left())
        t0 = time.monotonic()
        if budget < 5:
            res = {"status": "skipped", "reason": f"the run's total budget ({args.budget_s:.0f} s) was spent"}
        else:
            res = fn(budget)
        res["seconds"] = round(time.monotonic() - t0, 2)
        res["budget_s"] = round(max(budget, 0.0), 1)
        record["steps"][name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res['seconds']:.1f} s)"
              + (f": {res['reason']}" if res.get("reason") else ""), flush=True)
        return res

    timed_step("install", lambda budget: step_install(args))
    env = timed_step("env", lambda budget: run_worker("env", {"modules": PROBE_MODULES}, budget, args.work, "env"))
    record["env"] = {k: v for k, v in env.items() if k not in ("status", "log_tail")}
    steps = plan(args, args.work)
    for name in PARTS:
        if name not in parts:
            record["steps"][name] = {"status": "skipped", "reason": "not in --parts", "seconds": 0.0}
            continue
        why = skip_reason(name, env, args.cpu_smoke)
        if why:
            record["steps"][name] = {"status": "skipped", "reason": why, "seconds": 0.0}
            print(f"[gpu_check] {name}: skipped: {why}", flush=True)
            continue
        if name == "backends":
            timed_step(name, lambda budget: run_worker("backends", steps[name], budget, args.work, name))
        elif name.startswith("train"):
            shutil.rmtree(steps[name]["run_dir"], ignore_errors=True)   # metrics.jsonl appends: start it afresh
            timed_step(name, lambda budget, n=name: run_worker("train", steps[n], budget, args.work, n))
        else:
            timed_step(name, lambda budget, n=name: step_bench(steps[n], budget, args.work, n))
    record["seconds"] = round(time.monotonic() - t_start, 2)
    record["finished"] = _now()
    write_json(args.out, record)
    print(summarize(record), flush=True)
    failed = [n for n, s in record["steps"].items() if s["status"] in ("failed", "timeout")]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
