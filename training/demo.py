"""``decmem demo``: the main job end to end, as a chain of ordinary ``decmem`` subcommands.

    1 data      decmem preprocess --format render ...   MiniWorld scenes whose camera paths revisit places
    2 held-out  decmem preprocess --format render ...   one more scene, never trained on
    3 train     decmem train CONFIG --nproc 2 train.cp=2   DeepSpeed ZeRO-3, dp=1 x cp=2, TensorBoard
    4 generate  decmem generate --strategy S ...         once per strategy, bank initialised from the held-out clip
    5 eval      decmem eval --clip ... --runs ...         revisit PSNR/SSIM, compare.mp4, revisits.png, report.md
    6 minute    decmem preprocess ...; decmem eval --weights ... --frames 600
                                                        the minute-long rollout of one more held-out scene: PSNR
                                                        per frame, seconds per chunk and dispersion over 60 s

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
    scenes: int = 32                 # training scenes (the recipe BENCHMARKS.md measured; ~20 s to render)
    frames: int = 96                 # frames rendered per scene
    segment_frames: int = 48         # frames per training sample (>= data.clip_frames)
    hw: str = "32x32"
    heldout_frames: int = 64         # the held-out clip: init frames + generated frames
    # The held-out scene is never trained on (training renders seeds 0..scenes-1). Seed 1024 is chosen by its
    # camera path alone: with path=revisit, 29 of the 40 frames generated after its first 24 come back to one of
    # their poses (the pose rule of `decmem eval --runs`: within 0.25 and 20 deg, >= 8 frames older; seeds
    # 1000-1029 average 26.9), so the revisit columns of the report have frames to measure.
    heldout_seed: int = 1024
    init_frames: int = 24            # ground-truth frames that initialise the bank
    # Stage 6, the minute-long rollout: one more held-out scene (path=revisit), init_frames + long_frames frames.
    long_frames: int = 600           # generated frames: 60 s at 10 fps
    # Seed 1111 is chosen by depth-based coverage (training.overlap.coverage, as `decmem eval` counts revisits:
    # >= 50% of a frame's pixels seen by an init frame >= 8 frames older): 340 of its 600 generated frames
    # come back to views of the first 24, in every quarter of the minute (150, 26, 79, 85), the last at frame
    # 596; seeds 1100-1129 average 139, and 7 of them never come back after the first quarter.
    long_seed: int = 1111
    # The stage's cost, measured with the demo model at 32x32 (one thread, the VM's other core busy with another
    # job): decmem 91 s and window 86 s for 600 frames (0.27-0.35 s per chunk all minute at 2 steps), dense 55 s
    # for its first 32 (1.8 s per chunk, growing with the bank to 5.2 s); with rendering and scoring 262 s.
    long_steps: int = 2              # Euler steps per chunk
    long_dense_frames: int = 32      # dense generates only these (--frames-for dense=32)
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
    """The dataset at root holds exactly the scenes of this render spec, all finished. Whole descriptors are
    compared (id, seed, frames, hw, path kind): the ids alone do not change with the frames or the path."""
    from data_pipeline.render import find_inputs

    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        return False
    m = json.load(open(path))
    inputs = m.get("inputs", {})
    # manifests written before the path key existed rendered the tour path
    have = {k: dict({"path": "tour"}, **r.get("input", {})) for k, r in inputs.items()}
    return (bool(m.get("shards")) and have == {d["id"]: d for d in find_inputs(spec)}
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
    for k in ("long_frames", "long_steps", "long_dense_frames"):
        if getattr(a, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    t_all = time.monotonic()
    summary = []

    # 1-2: data (render + shards); preprocess resumes by itself, so a finished dataset costs a manifest read
    spec = f"scenes={a.scenes},frames={a.frames},hw={a.hw},seed=0,path=revisit"
    held_spec = f"scenes=1,frames={a.heldout_frames},hw={a.hw},seed={a.heldout_seed},path=revisit"
    ran = set()
    for stage, root, sp, cmd in (
        ("1/6 data", data, spec, _cli("preprocess", "--format", "render", spec, data, "--segment-frames",
                                      a.segment_frames, "--shard-bytes", "256KB")),
        ("2/6 held-out", heldout, held_spec, _cli("preprocess", "--format", "render", held_spec, heldout,
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
        summary.append(f"[3/6 train] reused {train_dir}: step {done}")
    else:
        secs = _run("3/6 train", _cli("train", a.config, *train_ov, "--nproc", a.nproc), log)
        done = _train_done(train_dir, steps)
        if done is None:
            raise RuntimeError(f"training stopped before train.steps={steps}; rerun `decmem demo` to resume it")
        rows = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl"))]
        first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
        summary.append(f"[3/6 train] {steps} steps in {secs:.0f} s (dp={a.nproc // a.cp} x cp={a.cp}), "
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
        fresh = "2/6 held-out" not in ran and os.path.exists(fj)
        if fresh and json.load(open(fj))["summary"]["weights"] == os.path.abspath(weights):
            summary.append(f"[4/6 generate {s}] reused {gdir}")
        else:
            secs = _run(f"4/6 generate {s}", _cli("generate", "--weights", weights, "--clip", heldout, "--init-frames",
                                                  a.init_frames, "--frames", n_new, "--out", gdir, "--strategy", s), log)
            sm = json.load(open(fj))["summary"]
            summary.append(f"[4/6 generate {s}] {n_new} latents in {secs:.0f} s, "
                           f"{sm['seconds_per_latent_median']:.3f} s/latent, PSNR {sm['psnr_generated_mean']:.2f} dB")
        log(summary[-1])

    # 5: evaluation and the report
    secs = _run("5/6 eval", _cli("eval", "--clip", heldout, "--runs", *runs, "--out", out), log)
    shutil.copyfile(os.path.join(runs[0], "rollout.mp4"), os.path.join(out, "rollout.mp4"))
    report = os.path.join(out, "report.md")
    log(f"[5/6 eval] {report} in {secs:.0f} s")

    # 6: the minute-long rollout (its own data and `decmem eval --weights`), a section of the report
    lines, section = _minute(a, out, weights, log)
    summary += lines
    tb = f"tensorboard --logdir {os.path.join(train_dir, 'tb')} --host 127.0.0.1"
    with open(report, "a") as f:
        f.write("\n" + section)
        f.write("\n## How this was made\n\n")
        f.write(f"`decmem demo` on {os.cpu_count()} CPU cores, {time.monotonic() - t_all:.0f} s for the stages that "
                f"ran this time. Training config: `{os.path.join(train_dir, 'config.yaml')}` "
                f"(from `{a.config}` with {' '.join(train_ov)}).\n\n")
        f.write("\n".join(f"- {s}" for s in summary) + "\n\n")
        f.write(f"Training logs: `{tb}`\n")
    log(f"\ndemo done in {time.monotonic() - t_all:.0f} s: {report}, {os.path.join(out, 'compare.mp4')}, "
        f"{os.path.join(out, 'revisits.png')}, {os.path.join(out, 'minute', 'frames.png')}\nTensorBoard: {tb}")
    return report


def _minute(a: DemoArgs, out: str, weights: str, log) -> tuple[list[str], str]:
    """Stage 6: render the long held-out scene and roll every strategy out over it (``decmem eval --weights``,
    dense cut to ``long_dense_frames``); each part reused when complete. -> (summary lines, report section)."""
    data, res_dir = os.path.join(out, "minute-data"), os.path.join(out, "minute")
    n = a.init_frames + a.long_frames
    spec = f"scenes=1,frames={n},hw={a.hw},seed={a.long_seed},path=revisit"
    lines, rendered = [], not _manifest_done(data, spec)
    if rendered:
        if os.path.exists(data):                  # another spec's scene: start over
            shutil.rmtree(data)
        secs = _run("6/6 minute data", _cli("preprocess", "--format", "render", spec, data, "--segment-frames", n), log)
        lines.append(f"[6/6 minute data] {data} in {secs:.0f} s: 1 scene of {n} frames")
    else:
        lines.append(f"[6/6 minute data] reused {data}")
    log(lines[-1])
    frames_for = {"dense": a.long_dense_frames} if "dense" in a.strategies and a.long_dense_frames < a.long_frames \
        else {}
    cmd = _cli("eval", "--weights", weights, "--data", data, "--init-frames", a.init_frames, "--frames", a.long_frames,
               "--strategies", ",".join(a.strategies), "--clips", 1, "--steps", a.long_steps, "--out", res_dir,
               *[arg for k, m in frames_for.items() for arg in ("--frames-for", f"{k}={m}")])
    path = os.path.join(res_dir, "eval.json")
    want = {"weights": weights, "data": data, "init_frames": a.init_frames, "frames": a.long_frames,
            "strategies": list(a.strategies), "sample_steps": a.long_steps, "frames_for": frames_for}
    done = os.path.exists(path) and not rendered and all(json.load(open(path))["args"].get(k) == v
                                                         for k, v in want.items())
    if done:
        lines.append(f"[6/6 minute eval] reused {res_dir}")
    else:
        secs = _run("6/6 minute eval", cmd, log)
        lines.append(f"[6/6 minute eval] {a.long_frames} frames after {a.init_frames}, {len(a.strategies)} "
                     f"strategies in {secs:.0f} s -> {res_dir}")
    log(lines[-1])
    return lines, _minute_section(json.load(open(path)), a, cmd)


def _minute_section(res: dict, a: DemoArgs, cmd: list[str]) -> str:
    """report.md's section on the minute-long rollout, from its eval.json."""
    from data_pipeline.render import FPS
    from training.evaluate import _fmt

    clip, summ = res["clips"][0], res["summary"]
    rev = clip["revisit"]

    def arrow(s: dict, key: str, spec: str) -> str:
        """'first → last' of a strategy's summary means <key>_first and <key>_last."""
        return f"{_fmt(s[key + '_first']['mean'], spec)} → {_fmt(s[key + '_last']['mean'], spec)}"

    L = ["## The minute-long rollout", "",
         f"One more held-out scene (seed {a.long_seed}, never trained on, `path=revisit`): {a.init_frames} "
         f"ground-truth frames fill the bank, then {a.long_frames} frames ({a.long_frames / FPS:.0f} s at {FPS} fps) "
         f"are generated along its camera path (Euler steps per chunk: {a.long_steps}), every strategy from the same "
         f"weights. {sum(rev)} of the {a.long_frames} generated frames are revisits (at least "
         f"{res['args']['revisit_coverage']:.0%} of their pixels seen by an init frame {res['args']['min_gap']} or "
         "more frames older, by depth and poses).", ""]
    for name, m in res["args"]["frames_for"].items():
        L += [f"**{name} generated only its first {m} frames** (`--frames-for {name}={m}`): its seconds per chunk "
              f"grow with the bank, and the whole minute would not fit the demo's time. Its numbers below cover only "
              f"those {m} frames ({sum(rev[:m])} of them revisits).", ""]
    L += ["![PSNR per generated frame over the minute](minute/frames.png)", "",
          "`minute/frames.png`: PSNR per generated frame"
          + (f" (moving average over {res['frames_smoothing']} frames)" if res["frames_smoothing"] > 1 else "")
          + ", revisited frames shaded.", "",
          "| strategy | frames generated | revisit PSNR (dB) | novel PSNR (dB) | s / chunk, first → last 10% "
          "| weak-key mass, first → last quarter | strong-key mass, first → last quarter |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summ.items():
        L.append(f"| {name} | {_fmt(s['generated_latents']['mean'], '.0f')} | {_fmt(s['psnr_revisit']['mean'], '.2f')} "
                 f"| {_fmt(s['psnr_novel']['mean'], '.2f')} | {arrow(s, 'chunk_s', '.3g')} "
                 f"| {arrow(s, 'dispersion_low', '.3f')} | {arrow(s, 'dispersion_high', '.3f')} |")
    L += ["", "Seconds per chunk include the read statistics of each chunk's last denoising step. Weak / strong-key "
          "mass: the memory read's attention on keys of weight < 0.02 / > 0.05 (the paper's dispersion). "
          "`minute/eval.md` has every number (SSIM, recall@k, ...), `minute/dispersion.png` and "
          "`minute/chunk_seconds.png` the curves.", "",
          f"Command: `decmem {shlex.join(cmd[3:])}`", ""]
    return "\n".join(L)
