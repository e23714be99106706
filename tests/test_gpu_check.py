"""The GPU check (devtools/gpu_check.py, decmem.bench.gpu_check) on a machine without a GPU: it starts, skips what needs CUDA with a reason,
runs every step at a tiny size with --cpu-smoke and writes the JSON; its install step is checked by the commands it
would run (the wheels folder is not needed here)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from decmem.bench import gpu_check as measure
from decmem.model.kernels import BACKENDS
from decmem.training.config import load_config
from decmem.training.run_config import RunConfig
from devtools import gpu_check, gpu_wheels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, timeout=120):
    out = tmp_path / "gc.json"
    r = subprocess.run([sys.executable, "-m", "devtools.gpu_check", "--out", str(out), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out) as f:
        rec = json.load(f)
    assert set(rec) >= {"schema", "mode", "env", "steps", "seconds", "budget_s", "started", "finished"}
    assert list(rec["steps"]) == list(gpu_check.STEPS)
    for name, step in rec["steps"].items():
        assert step["status"] in ("ok", "skipped", "failed", "timeout"), name
        if step["status"] != "ok":
            assert step["reason"], name
    return rec, r.stdout


def _plan(smoke: bool):
    args = argparse.Namespace(cpu_smoke=smoke, backends="all", train_clip_frames=64, train_steps=2,
                              strategies="decmem,dense", attention_bank_frames="56,448", generate_bank_frames="56,448")
    return gpu_check.plan(args, "/tmp/gpu-check-plan")


@pytest.mark.parametrize("smoke", [False, True])
def test_plan_resolves_configs(smoke):
    """Every training run of the plan is a valid config (the GPU one at the B size, bf16), the backend list is
    model/kernels.py's, and the bench commands name configs that exist."""
    plan = _plan(smoke)
    for name in ("train_zero3", "train_zero2_ac", "train_zero3_ac"):
        cfg = load_config(RunConfig, os.path.join(ROOT, plan[name]["config"]), plan[name]["overrides"])
        assert cfg.train.zero_stage == (2 if name == "train_zero2_ac" else 3)
        assert cfg.train.activation_checkpointing == name.endswith("_ac")
        assert cfg.train.cp == 1 and cfg.train.steps == 2
        if not smoke:
            assert (cfg.model.size, cfg.train.precision, cfg.train.device) == ("B", "bf16", "cuda")
    for name in ("bench_attention", "bench_generate"):
        for cmd, _ in plan[name]["commands"]:
            assert os.path.isfile(os.path.join(ROOT, cmd[cmd.index("-c") + 1]))
    if not smoke:
        assert [c[c.index("--bank-frames") + 1] for c, _ in plan["bench_generate"]["commands"]] == ["56", "448"]
    assert measure.backend_names() == [b for b in BACKENDS if b != "auto"]


def test_install_is_offline(capsys):
    """The install step asks no index: the carried wheels (dependencies resolved from the folder and the machine),
    then the project without dependencies; the wheels are built without DeepSpeed ops, for the GPU machine's Python."""
    wheels_cmd, project_cmd = gpu_check.install_commands("/w")
    assert wheels_cmd[1:4] == ["-m", "pip", "install"] and "--no-index" in wheels_cmd
    assert wheels_cmd[wheels_cmd.index("--find-links") + 1] == "/w"
    assert wheels_cmd[wheels_cmd.index("-r") + 1] == os.path.join("/w", "requirements.txt")
    assert {"--no-index", "--no-deps", "--no-build-isolation"} <= set(project_cmd)
    assert project_cmd[-2:] == ["-e", gpu_check.ROOT]
    assert gpu_wheels.build("/tmp/never-written", "3.12", 60.0, dry_run=True) == 0
    build_cmd, download_cmd = capsys.readouterr().out.strip().splitlines()
    assert build_cmd.startswith("DS_BUILD_OPS=0 ") and "--no-deps" in build_cmd and "--no-build-isolation" in build_cmd
    assert "deepspeed==" in build_cmd
    assert "--only-binary=:all:" in download_cmd and "--python-version 3.12" in download_cmd
    for name in ("webdataset==", "av==", "submitit==", "pydantic=="):
        assert name in download_cmd


def test_without_cuda_skips_each_gpu_step_with_a_reason(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    rec, stdout = _run(tmp_path, "--install-dry-run", "--wheels", str(tmp_path / "no-wheels"), timeout=90)
    assert rec["mode"] == "gpu" and rec["env"]["cuda_available"] is False
    install = rec["steps"]["install"]
    assert install["status"] == "skipped" and "--install-dry-run" in install["reason"]
    assert len(install["commands"]) == 2 and "--no-index" in install["commands"][0]
    assert "--no-deps" in install["fallback_command"] and "requirements-nodeps.txt" in install["fallback_command"]
    assert rec["steps"]["env"]["status"] == "ok"
    for name in gpu_check.PARTS:
        assert rec["steps"][name]["status"] == "skipped" and "no CUDA device" in rec["steps"][name]["reason"]
    assert "would run:" in stdout and "GPU check (gpu)" in stdout


def test_cpu_smoke_runs_each_step_at_tiny_size(tmp_path):
    parts = "backends,train_zero2_ac,bench_attention,bench_generate"    # ZeRO-3 is the same path, other overrides
    rec, stdout = _run(tmp_path, "--cpu-smoke", "--no-install", "--parts", parts, timeout=240)
    steps = rec["steps"]
    assert rec["mode"] == "cpu-smoke"
    assert steps["install"]["reason"] == "--no-install"
    assert steps["train_zero3"] == {"status": "skipped", "reason": "not in --parts", "seconds": 0.0}

    back = steps["backends"]
    assert back["status"] == "ok" and back["backends"] == measure.backend_names()
    by = {(r["backend"], r["dtype"], r["case"]): r for r in back["results"]}
    for dtype in ("bfloat16", "float32"):
        for case in ("plain", "bias_mask"):
            for backend in ("math", "sdpa"):
                r = by[(backend, dtype, case)]
                assert r["status"] == "ok" and r["tolerance"] == measure.TOLERANCES[dtype]
                assert set(r["errors"]) == {"out", "lse", "dq", "dk", "dv"} | ({"dbias"} if case == "bias_mask" else set())
                assert all(e["ok"] and e["max_abs_err"] <= e["bound"] for e in r["errors"].values())
    for backend in ("flash_attn", "xformers"):
        if not rec["env"]["modules"][backend]["ok"]:
            assert all(r["status"] == "skipped" and "not importable" in r["reason"]
                       for r in back["results"] if r["backend"] == backend)

    train = steps["train_zero2_ac"]
    assert train["status"] == "ok", train.get("reason")
    assert train["outcome"] == "done" and len(train["step_seconds"]) == 2 and train["step_seconds_median"] > 0
    assert train["peak_rss_mib"] > 0 and "peak_gpu_allocated_mib" not in train
    assert train["dry_run"]["ok"] and "memory estimate" in train["dry_run"]["report"]
    assert "train.zero_stage=2" in train["overrides"] and "train.activation_checkpointing=true" in train["overrides"]

    for name, key, banks in (("bench_attention", "median_ms", {4, 8}), ("bench_generate", "sec_per_latent", {4})):
        step = steps[name]
        assert step["status"] == "ok", step
        rows = [row for run in step["runs"] for row in run["rows"]]
        assert {(r["strategy"], r["bank_frames"]) for r in rows} == {(s, b) for s in ("decmem", "dense") for b in banks}
        assert all(r[key] > 0 for r in rows)
    assert "GPU check (cpu-smoke)" in stdout
