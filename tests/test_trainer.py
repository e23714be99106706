"""The trainer with real DeepSpeed ZeRO-3 and real processes (gloo, CPU): learning, checkpoints, exact resume,
layout and accumulation equivalence, TensorBoard read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from decmem.data_pipeline.loader import DataArgs, ShardLoader
from decmem.training.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECMEM = [sys.executable, "-m", "decmem.cli"]
CONFIG = os.path.join(ROOT, "configs", "debug.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Rendered MiniWorld scenes at 16x16 in 4 shards (enough for 2 dp ranks)."""
    out = tmp_path_factory.mktemp("render") / "data"
    subprocess.run([*DECMEM, "preprocess", "--format", "render", "scenes=4,frames=48,hw=16x16,seed=0", str(out),
                    "--segment-frames", "24", "--shard-bytes", "40KB", "--quiet"], check=True, cwd=ROOT)
    return str(out)


def train_cli(run_dir, data, *overrides, nproc=2, timeout=300):
    cmd = [*DECMEM, "train", CONFIG, f"run_dir={run_dir}", f"data.data={data}", "log.progress=false", *overrides]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows}


def weights(ckpt_dir, sub="weights"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt_dir, sub, "model.safetensors"))


#################################################################################
#                 2-process ZeRO-3 runs through `decmem train`                  #
#################################################################################

STEPS = 24
RUN = ["log.every_steps=1", f"train.steps={STEPS}", "checkpoint.every_steps=8", "checkpoint.keep=2",
       "log.heatmap_every=8", "log.rollout_every=12", "train.ema=0.9"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    r = train_cli(run_dir, data, *RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return run_dir


def test_two_process_run_learns_checkpoints_and_logs(straight):
    m = metrics(straight)
    assert sorted(m) == list(range(1, STEPS + 1))
    first = sum(m[s]["train/loss"] for s in range(1, 5)) / 4
    last = sum(m[s]["train/loss"] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < 0.8 * first, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"
    # keep=2: step-16 and step-24 remain, latest names the last, every one complete with exportable weights
    ck = os.path.join(straight, "checkpoints")
    assert sorted(d for d in os.listdir(ck) if d.startswith("step-")) == ["step-16", "step-24"]
    assert open(os.path.join(ck, "latest")).read() == "step-24"
    info = json.load(open(os.path.join(ck, "step-24", "trainstate.json")))
    assert info["step"] == STEPS and info["layout"] == {"world": 2, "dp": 2, "cp": 1}
    assert sorted(os.listdir(os.path.join(ck, "step-24", "trainstate"))) == ["rank-00000.pt", "rank-00001.pt"]
    from decmem.training.weights import load_weights

    model, wcfg = load_weights(os.path.join(ck, "step-24", "weights"))
    assert wcfg.frame_hw == [16, 16] and wcfg.codec == "pixels"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "final_layer.linear" in n)  # trained
    with open(os.path.join(straight, "config.yaml")) as f:
        assert f"steps: {STEPS}" in f.read()
    # EMA (decay 0.9) lags the raw weights: different, but close after 24 steps
    raw, ema = weights(os.path.join(ck, "step-24")), weights(os.path.join(ck, "step-24"), "weights-ema")
    k = "final_layer.linear.weight"
    assert not torch.equal(raw[k], ema[k])
    assert (raw[k] - ema[k]).norm() < 0.5 * raw[k].norm()


def test_activation_checkpointing_under_zero3_is_refused(tmp_path):
    r = subprocess.run([*DECMEM, "train", CONFIG, "train.activation_checkpointing=true", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "train.zero_stage=2" in r.stderr, r.stderr[-2000:]


def test_config_typo_fails_before_any_process_starts(tmp_path):
    r = subprocess.run([*DECMEM, "train", CONFIG, "train.stpes=3", f"run_dir={tmp_path}/x", "--nproc", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "train.stpes" in r.stderr and "train.steps" in r.stderr          # names the key, suggests the right one
    assert "torchrun" not in r.stderr.lower() and not os.path.exists(tmp_path / "x")


def test_tensorboard_tags(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(straight, "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/step_seconds", "perf/data_seconds",
                "perf/tokens_per_s", "memory/bank_tokens", "attention/gate_sgm", "attention/gate_coarse",
                "attention/entropy", "attention/dispersion_low", "attention/dispersion_high",
                "rollout/mse_vs_ground_truth"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert "retrieval/heatmap_query_frame_x_bank_frame" in images
    assert "rollout/ground_truth_vs_generated" in images
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] < lr[4] and lr[-1] < max(lr)                    # warmup, then cosine decay
    gif = acc.Images("rollout/ground_truth_vs_generated")[0].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")


def test_exact_resume(straight, tmp_path, data):
    """k steps, stop, resume, k more: the same losses of steps k+1..2k and bit-identical final weights (fp32)."""
    run_dir = str(tmp_path / "resumed")
    half = STEPS // 2
    r = train_cli(run_dir, data, *RUN, f"train.stop_at={half}")
    assert r.returncode == 3, r.stderr[-4000:]                     # stopped after saving, not done
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step-{half}"
    r = train_cli(run_dir, data, *RUN)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = metrics(straight), metrics(run_dir)
    for s in range(half + 1, STEPS + 1):
        assert b[s]["train/loss"] == a[s]["train/loss"], f"step {s}: {b[s]['train/loss']} != {a[s]['train/loss']}"
        assert b[s]["train/grad_norm"] == a[s]["train/grad_norm"]
    for sub in ("weights", "weights-ema"):                        # the EMA shards resume exactly too
        wa = weights(os.path.join(straight, "checkpoints", f"step-{STEPS}"), sub)
        wb = weights(os.path.join(run_dir, "checkpoints", f"step-{STEPS}"), sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{sub}: {k}"


def test_resume_refuses_a_changed_layout(straight, tmp_path, data):
    import shutil

    run_dir = str(tmp_path / "relayout")
    shutil.copytree(straight, run_dir)
    r = train_cli(run_dir, data, *RUN, f"train.steps={STEPS + 2}", "train.cp=2")
    assert r.returncode != 0
    assert "dp=2 x cp=1" in r.stderr and "checkpoint.init_weights=" in r.stderr, r.stderr[-3000:]


#################################################################################
#           Equivalences with explicit batches (real engine, spawned ranks)     #
#################################################################################

def samples(data, n, clip_frames=12):
    loader = ShardLoader(DataArgs(data=data, clip_frames=clip_frames, min_context=2, prefetch=0, interleave=2),
                         chunk_frames=2)
    out = [loader.next_batch() for _ in range(n)]
    loader.close()
    return out


def batch_of(items, chunk_starts):
    return {"latents": torch.cat([i["latents"] for i in items]), "K": torch.cat([i["K"] for i in items]),
            "c2w": torch.cat([i["c2w"] for i in items]), "keys": [k for i in items for k in i["keys"]],
            "chunk_starts": chunk_starts}


def run_world(tmp_path, name, world, overrides, steps):
    out = str(tmp_path / f"{name}.pt")
    mp.start_processes(_entry, args=(world, free_port(), CONFIG, overrides, steps, out), nprocs=world,
                       start_method="spawn", join=True)
    return torch.load(out, weights_only=True)


def _entry(rank, world, port, config, overrides, steps, out):
    from train_check import run_steps

    run_steps(rank, world, port, config, overrides, steps, out)


def assert_close_weights(a, b, what, tol=2e-5):
    # Adam's update is invariant to a global gradient scale, so compare the (pre-clipping) norm too
    assert a["grad_norms"][0] == pytest.approx(b["grad_norms"][0], rel=1e-5), f"{what}: gradient norms differ"
    for k in a["weights"]:
        err = (a["weights"][k] - b["weights"][k]).abs().max().item()
        scale = a["weights"][k].abs().max().item() + 1e-3
        assert err <= tol * scale, f"{what}: {k} differs by {err:.3g} (scale {scale:.3g})"


def test_layout_equivalence_dp2_vs_cp2(tmp_path, data):
    """One optimizer step on the same global batch: (dp=2, cp=1) == (dp=1, cp=2) == one process."""
    s = samples(data, 2)
    starts = [4, 8]                                                   # 4 bank frames: 2 per cp rank
    both = batch_of(s, starts)
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}"]
    one = run_world(tmp_path, "one", 1, base + ["data.batch_size=2"], [[[both]]])
    dp2 = run_world(tmp_path, "dp2", 2, base + ["data.batch_size=1", "train.cp=1"],
                    [[[batch_of([s[0]], starts)], [batch_of([s[1]], starts)]]])
    cp2 = run_world(tmp_path, "cp2", 2, base + ["data.batch_size=2", "train.cp=2"], [[[both], [both]]])
    assert cp2["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert_close_weights(dp2, one, "dp=2 vs one process")
    assert_close_weights(cp2, one, "cp=2 vs one process")
    init = run_world(tmp_path, "init", 1, base + ["data.batch_size=2", "optim.lr=1e-9"], [[[both]]])
    moved = max((one["weights"][k] - init["weights"][k]).abs().max().item() for k in one["weights"])
    assert moved > 1e-4, "the step barely moved the weights: the comparison would be vacuous"


def test_gradient_accumulation(tmp_path, data):
    """1 micro-batch of 4 == 2 micro-batches of 2 through DeepSpeed's accumulation."""
    s = samples(data, 4)
    starts = [3, 7]
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}"]
    big = run_world(tmp_path, "big", 1, base + ["data.batch_size=4"], [[[batch_of(s, starts)]]])
    acc = run_world(tmp_path, "acc", 1, base + ["data.batch_size=2", "train.grad_accum=2"],
                    [[[batch_of(s[:2], starts), batch_of(s[2:], starts)]]])
    assert acc["losses"][0] == pytest.approx(big["losses"][0], rel=1e-5)
    assert_close_weights(acc, big, "2 x batch 2 vs 1 x batch 4")
    # ZeRO-2 with activation checkpointing (the combination it needs) takes the same step as ZeRO-3 without
    ckpt = run_world(tmp_path, "ckpt", 1, base + ["data.batch_size=4", "train.activation_checkpointing=true",
                                                  "train.zero_stage=2"], [[[batch_of(s, starts)]]])
    assert_close_weights(ckpt, big, "ZeRO-2 + activation checkpointing vs ZeRO-3", tol=1e-6)


def test_deepspeed_launcher(tmp_path, data):
    """`deepspeed --num_gpus 2 --module decmem.cli train ...` (it passes --local_rank before the subcommand)."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    run_dir = str(tmp_path / "ds")
    r = subprocess.run([launcher, "--num_gpus", "2", "--module", "decmem.cli", "train", CONFIG, f"run_dir={run_dir}",
                        f"data.data={data}", "train.steps=2", "log.progress=false"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.load(open(os.path.join(run_dir, "checkpoints", "step-2", "trainstate.json")))
    assert info["layout"] == {"world": 2, "dp": 2, "cp": 1}


def test_wall_clock_checkpoints(tmp_path, data):
    """checkpoint.every_minutes saves by elapsed time (here ~every step), independently of every_steps."""
    run_dir = str(tmp_path / "clock")
    r = train_cli(run_dir, data, "train.steps=4", "checkpoint.every_steps=0", "checkpoint.every_minutes=0.0001",
                  "checkpoint.keep=10", nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step-"))
    assert steps == [1, 2, 3, 4]


#################################################################################
#                             Non-finite losses                                 #
#################################################################################

def test_a_non_finite_loss_skips_the_step(tmp_path, data):
    """A NaN loss on one rank: every rank skips that step (weights untouched), logs it, and training goes on."""
    run_dir = str(tmp_path / "nan1")
    env_run = dict(os.environ, DECMEM_FAULT="nan:rank=1:step=3")
    cmd = [*DECMEM, "train", CONFIG, f"run_dir={run_dir}", f"data.data={data}", "log.progress=false", "train.steps=5",
           "log.every_steps=1", "checkpoint.every_steps=2", "checkpoint.keep=5", "--nproc", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env_run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(run_dir)
    assert m[3]["train/skipped_steps"] == 1.0 and "train/loss" not in m[3]
    assert all(m[s]["train/skipped_steps"] == 0.0 for s in (1, 2, 4, 5))
    w2 = weights(os.path.join(run_dir, "checkpoints", "step-2"))
    w5 = weights(os.path.join(run_dir, "checkpoints", "step-5"))
    assert all(torch.isfinite(v).all() for v in w5.values())
    assert any(not torch.equal(w2[k], w5[k]) for k in w2)               # steps 4 and 5 trained
    assert "step 3: non-finite loss" in r.stderr


def test_non_finite_losses_in_a_row_stop_the_run_with_the_last_good_weights(tmp_path, data):
    run_dir = str(tmp_path / "nan3")
    env_run = dict(os.environ, DECMEM_FAULT="nan:rank=0:step=3:count=10")
    cmd = [*DECMEM, "train", CONFIG, f"run_dir={run_dir}", f"data.data={data}", "log.progress=false", "train.steps=20",
           "checkpoint.every_steps=2", "checkpoint.keep=5", "train.max_nonfinite=3"]
    r = subprocess.run(cmd, cwd=ROOT, env=env_run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "3 steps in a row (up to step 5) had a non-finite loss" in r.stderr
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step-5"
    w2, w5 = (weights(os.path.join(run_dir, "checkpoints", f"step-{s}")) for s in (2, 5))
    for k in w2:                                                         # nothing was applied at steps 3..5
        assert torch.equal(w2[k], w5[k]), k
