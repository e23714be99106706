"""``decmem demo``: the main job end to end, as a chain of ordinary ``decmem`` subcommands.

    1 data      decmem preprocess --format render ...   MiniWorld scenes whose camera paths revisit places
    2 held-out  decmem preprocess --format render ...   one more scene, never trained on
    3 train     decmem train CONFIG --nproc 2 train.cp=2   DeepSpeed ZeRO-3, dp=1 x cp=2, TensorBoard
    4 generate  decmem generate --strategy S ...         once per strategy, bank initialised from the held-out clip
    5 eval      decmem eval ...                          revisit PSNR/SSIM, compare.mp4, revisits.png, report.md

Each stage prints its command (rerun it alone with other options) and is skipped when its output is
already complete, so a re-run reuses finished stages.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

STRATEGIES = ("decmem", "window", "dense")


@dataclass
class DemoArgs:
    """The demo's data sizes and stage options (the model and training come from the config)."""

    out: str = "runs/demo"
    config: str = "configs/demo.yaml"
    scenes: int = 6                  # training scenes
    frames: int = 96                 # frames rendered per scene
    segment_frames: int = 48         # frames per training sample (>= data.clip_frames)
    hw: str = "32x32"
    heldout_frames: int = 64         # the held-out clip: init frames + generated frames
    # The held-out scene is never trained on (training renders seeds 0..scenes-1). Seed 1024 is chosen by its
    # camera path alone: it returns to 10 of its first 24 poses during the 40 frames generated after them
    # (seeds 1000-1029 average 1.8), so the revisit columns of the report have frames to measure.
    heldout_seed: int = 1024
    init_frames: int = 24            # ground-truth frames that initialise the bank
    nproc: int = 2
    cp: int = 2
    steps: int = 0                   # 0 = the config's train.steps
    strategies: tuple = STRATEGIES
    overrides: list = field(default_factory=list)   # extra key=value for `decmem train`


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "training.cli", *map(str, args)]


def _run(stage: str, cmd: list[str], log) -> float:
    log(f"\n[{stage}] $ decmem {shlex.join(cmd[3:])}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    return time.monotonic() - t0


def _manifest_done(root: str, spec: str) -> bool:
    """The dataset at root holds exactly the scenes of this render spec, all finished."""
    from data_pipeline.render import find_inputs

    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        return False
    m = json.load(open(path))
    inputs = m.get("inputs", {})
    return (bool(m.get("shards")) and set(inputs) == {d["id"] for d in find_inputs(spec)}
            and all(r.get("status") in ("done", "skipped") for r in inputs.values()))


def _train_done(run_dir: str, steps: int) -> int | None:
    from training.checkpoint import resolve_resume

    path = resolve_resume(run_dir, "latest")
    if path is None:
        return None
    step = json.load(open(os.path.join(path, "trainstate.json")))["step"]
    return step if step >= steps else None


def run_demo(a: DemoArgs, log=print) -> str:
    """Run (or resume) every stage; returns the path of report.md."""
    from training.config import load_config
    from training.run_config import RunConfig

    out = os.path.abspath(a.out)
    data, heldout, train_dir = (os.path.join(out, d) for d in ("data", "heldout", "train"))
    train_ov = [f"run_dir={train_dir}", f"data.data={data}", f"train.cp={a.cp}", *a.overrides]
    if a.steps:
        train_ov.append(f"train.steps={a.steps}")
    cfg = load_config(RunConfig, a.config, train_ov)          # config mistakes surface before any stage runs
    if a.init_frames + cfg.model.chunk_frames > a.heldout_frames:
        raise ValueError(f"--heldout-frames {a.heldout_frames} leaves nothing to generate after --init-frames "
                         f"{a.init_frames}")
    t_all = time.monotonic()
    summary = []

    # 1-2: data (render + shards); preprocess resumes by itself, so a finished dataset costs a manifest read
    spec = f"scenes={a.scenes},frames={a.frames},hw={a.hw},seed=0"
    held_spec = f"scenes=1,frames={a.heldout_frames},hw={a.hw},seed={a.heldout_seed}"
    ran = set()
    for stage, root, sp, cmd in (
        ("1/5 data", data, spec, _cli("preprocess", "--format", "render", spec, data, "--segment-frames",
                                      a.segment_frames, "--shard-bytes", "256KB")),
        ("2/5 held-out", heldout, held_spec, _cli("preprocess", "--format", "render", held_spec, heldout,
                                                  "--segment-frames", a.heldout_frames))):
        if _manifest_done(root, sp):
            line = f"[{stage}] reused {root}"
        else:
            if os.path.exists(root):              # another spec's scenes: start that dataset over
                shutil.rmtree(root)
            secs = _run(stage, cmd, log)
            line = f"[{stage}] {root} in {secs:.0f} s"
            ran.add(stage)
        m = json.load(open(os.path.join(root, "manifest.json")))
        summary.append(f"{line}: {m['samples']} samples, {m['frames']} frames, {len(m['shards'])} shards")
        log(summary[-1])

    # 3: train (resumes from its latest checkpoint if a previous demo was interrupted)
    steps = cfg.train.steps
    done = _train_done(train_dir, steps)
    if done is not None:
        summary.append(f"[3/5 train] reused {train_dir}: step {done}")
    else:
        secs = _run("3/5 train", _cli("train", a.config, *train_ov, "--nproc", a.nproc), log)
        done = _train_done(train_dir, steps)
        if done is None:
            raise RuntimeError(f"training stopped before train.steps={steps}; rerun `decmem demo` to resume it")
        rows = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl"))]
        first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
        summary.append(f"[3/5 train] {steps} steps in {secs:.0f} s (dp={a.nproc // a.cp} x cp={a.cp}), "
                       f"loss {first:.3f} -> {last:.3f}")
    log(summary[-1])
    weights = os.path.join(train_dir, "checkpoints", f"step-{done}", "weights")

    # 4: one rollout per strategy from the same weights, bank initialised from the held-out clip
    n_new = a.heldout_frames - a.init_frames
    runs = []
    for s in a.strategies:
        gdir = os.path.join(out, "generate", s)
        runs.append(gdir)
        fj = os.path.join(gdir, "frames.json")
        fresh = "2/5 held-out" not in ran and os.path.exists(fj)
        if fresh and json.load(open(fj))["summary"]["weights"] == os.path.abspath(weights):
            summary.append(f"[4/5 generate {s}] reused {gdir}")
        else:
            secs = _run(f"4/5 generate {s}", _cli("generate", "--weights", weights, "--clip", heldout, "--init-frames",
                                                  a.init_frames, "--frames", n_new, "--out", gdir, "--strategy", s), log)
            sm = json.load(open(fj))["summary"]
            summary.append(f"[4/5 generate {s}] {n_new} latents in {secs:.0f} s, "
                           f"{sm['seconds_per_latent_median']:.3f} s/latent, PSNR {sm['psnr_generated_mean']:.2f} dB")
        log(summary[-1])

    # 5: evaluation and the report
    secs = _run("5/5 eval", _cli("eval", "--clip", heldout, "--runs", *runs, "--out", out), log)
    shutil.copyfile(os.path.join(runs[0], "rollout.mp4"), os.path.join(out, "rollout.mp4"))
    report = os.path.join(out, "report.md")
    tb = f"tensorboard --logdir {os.path.join(train_dir, 'tb')} --host 127.0.0.1"
    with open(report, "a") as f:
        f.write("\n## How this was made\n\n")
        f.write(f"`decmem demo` on {os.cpu_count()} CPU cores, {time.monotonic() - t_all:.0f} s for the stages that "
                f"ran this time. Training config: `{os.path.join(train_dir, 'config.yaml')}` "
                f"(from `{a.config}` with {' '.join(train_ov)}).\n\n")
        f.write("\n".join(f"- {s}" for s in summary) + "\n\n")
        f.write(f"Training logs: `{tb}`\n")
    summary.append(f"[5/5 eval] {report} in {secs:.0f} s")
    log(summary[-1])
    log(f"\ndemo done in {time.monotonic() - t_all:.0f} s: {report}, {os.path.join(out, 'compare.mp4')}, "
        f"{os.path.join(out, 'revisits.png')}\nTensorBoard: {tb}")
    return report
