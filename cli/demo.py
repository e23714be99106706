"""``decmem demo``: the main job end to end, as a chain of ordinary ``decmem`` subcommands.

    1 data      decmem preprocess --format render ...   MiniWorld scenes whose camera paths revisit places and
                                                        cut back to views out of sight (one dataset per path kind)
    2 held-out  decmem preprocess --format render ...   one more scene, never trained on
    3 train     decmem train CONFIG --nproc 2 train.cp=2   DeepSpeed ZeRO-3, dp=1 x cp=2, TensorBoard
    4 generate  decmem generate --strategy S ...         once per strategy, bank initialised from the held-out clip
    5 score     decmem score --clip ... --runs ...        revisit PSNR/SSIM, compare.mp4, revisits.png, report.md
    6 minute    decmem preprocess ...; decmem eval --weights ... --frames 600
                                                        the minute-long rollout of one more held-out scene: PSNR
                                                        per frame, seconds per chunk and dispersion over 60 s

Each stage prints its command (rerun it alone with other options) and is skipped when its output is
already complete, so a re-run reuses finished stages.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from decmem.cli.common import fail, log, strategies
from decmem.data_pipeline.render import FPS, PATHS, find_inputs
from decmem.evaluation.report import fmt
from decmem.training.checkpoint import resolve_resume
from decmem.training.config import config_keys, load_config
from decmem.training.run_config import RunConfig

STRATEGIES = ("decmem", "window", "dense")


@dataclass
class DemoArgs:
    """The demo's data sizes and stage options (the model and training come from the config)."""

    out: str = "runs/demo"
    config: str = "configs/demo.yaml"
    scenes: int = 32                 # training scenes (the recipe BENCHMARKS.md measured; ~20 s to render)
    frames: int = 96                 # frames rendered per scene
    segment_frames: int = 48         # frames per training sample (>= data.clip_frames)
    # camera path kinds of the training data, one dataset of `scenes` scenes each, trained on as one ('::'):
    # revisit (turn-arounds, tours back) and return (cuts back to a view the last frames do not show, so only the
    # memory holds it). BENCHMARKS.md "Training on both path kinds" measured the mix.
    paths: tuple = ("revisit", "return")
    hw: str = "32x32"
    heldout_frames: int = 64         # the held-out clip: init frames + generated frames
    # The held-out scene is never trained on (training renders seeds 0..scenes-1). Seed 1024 is chosen by its
    # camera path alone: with path=revisit, 29 of the 40 frames generated after its first 24 come back to one of
    # their poses (the pose rule of `decmem score`: within 0.25 and 20 deg, >= 8 frames older; seeds
    # 1000-1029 average 26.9), so the revisit columns of the report have frames to measure.
    heldout_seed: int = 1024
    init_frames: int = 24            # ground-truth frames that initialise the bank
    # Stage 6, the minute-long rollout: one more held-out scene (path=revisit), init_frames + long_frames frames.
    long_frames: int = 600           # generated frames: 60 s at 10 fps
    # Seed 1111 is chosen by depth-based coverage (data_pipeline.overlap.coverage, as `decmem eval` counts revisits:
    # >= 50% of a frame's pixels seen by an init frame >= 8 frames older): 340 of its 600 generated frames
    # come back to views of the first 24, in every quarter of the minute (150, 26, 79, 85), the last at frame
    # 596; seeds 1100-1129 average 139, and 7 of them never come back after the first quarter.
    long_seed: int = 1111
    # The stage's cost in `make demo` (8x8-token blocks, nothing else running): 171 s for decmem and window over
    # 600 frames (0.19-0.25 s per chunk at 2 steps) and dense over its first 32 (1.4 s per chunk, growing with the
    # bank to 2.7 s), plus 11 s of rendering.
    long_steps: int = 2              # Euler steps per chunk
    long_dense_frames: int = 32      # dense generates only these (--frames-for dense=32)
    nproc: int = 2
    cp: int = 2
    steps: int = 0                   # 0 = the config's train.steps
    strategies: tuple = STRATEGIES
    overrides: list = field(default_factory=list)   # extra key=value for `decmem train`


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "decmem.cli", *map(str, args)]


def _run(stage: str, cmd: list[str], log) -> float:
    log(f"\n[{stage}] $ decmem {shlex.join(cmd[3:])}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    return time.monotonic() - t0


def _manifest_done(root: str, spec: str) -> bool:
    """The dataset at root holds exactly the scenes of this render spec, all finished. Whole descriptors are
    compared (id, seed, frames, hw, path kind): the ids alone do not change with the frames or the path."""
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        return False
    m = _read_json(path)
    inputs = m.get("inputs", {})
    # manifests written before the path key existed rendered the tour path
    have = {k: dict({"path": "tour"}, **r.get("input", {})) for k, r in inputs.items()}
    return (bool(m.get("shards")) and have == {d["id"]: d for d in find_inputs(spec)}
            and all(r.get("status") in ("done", "skipped") for r in inputs.values()))


def _config_changes(run_dir: str, cfg: RunConfig) -> list[str]:
    """What differs between the training run's resolved config and this demo's, as 'key: old -> new' lines.

    Train steps may grow (the run resumes) and logging / checkpoint cadence does not change the model; anything
    else (model, data, diffusion, optimiser) would make a reused or resumed run another model than the one asked for.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return []
    try:
        old = load_config(RunConfig, path)
    except (ValueError, TypeError, KeyError) as e:       # written by another version of the config schema
        return [f"{path} does not load ({e})"]
    value = lambda c, key: functools.reduce(getattr, key.split("."), c)  # noqa: E731
    skip = ("train.steps", "log.", "checkpoint.every_", "checkpoint.keep")
    return [f"{k}: {value(old, k)!r} -> {value(cfg, k)!r}" for k in config_keys(RunConfig)
            if value(old, k) != value(cfg, k) and not k.startswith(skip)]


def _newer(path: str, than: str) -> bool:
    """path exists and was written after ``than`` (an output older than the weights it came from is stale)."""
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def _train_done(run_dir: str, steps: int) -> int | None:
    path = resolve_resume(run_dir, "latest")
    if path is None:
        return None
    step = _read_json(os.path.join(path, "trainstate.json"))["step"]
    return step if step >= steps else None


def run_demo(a: DemoArgs, log=print) -> str:
    """Run (or resume) every stage; returns the path of report.md."""
    out = os.path.abspath(a.out)
    heldout, train_dir = (os.path.join(out, d) for d in ("heldout", "train"))
    if not a.paths or any(p not in PATHS for p in a.paths) or len(set(a.paths)) < len(a.paths):
        raise ValueError(f"--paths {','.join(a.paths)}: expected distinct path kinds of {', '.join(PATHS)}")
    # the first kind keeps the folder name "data" (a demo run before the mix reuses its dataset)
    datas = {p: os.path.join(out, "data" if i == 0 else f"data-{p}") for i, p in enumerate(a.paths)}
    train_ov = [f"run_dir={train_dir}", f"data.data={'::'.join(datas.values())}", f"train.cp={a.cp}", *a.overrides]
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
    specs = {p: f"scenes={a.scenes},frames={a.frames},hw={a.hw},seed=0,path={p}" for p in a.paths}
    held_spec = f"scenes=1,frames={a.heldout_frames},hw={a.hw},seed={a.heldout_seed},path=revisit"
    ran = set()
    for stage, root, sp, cmd in (
        *((f"1/6 data ({p})", datas[p], specs[p], _cli("preprocess", "--format", "render", specs[p], datas[p],
                                                       "--segment-frames", a.segment_frames, "--shard-bytes", "256KB"))
          for p in a.paths),
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
        m = _read_json(os.path.join(root, "manifest.json"))
        summary.append(f"{line}: {m['samples']} samples, {m['frames']} frames, {len(m['shards'])} shards")
        log(summary[-1])

    # 3: train (resumes from its latest checkpoint if a previous demo was interrupted)
    steps = cfg.train.steps
    changed = _config_changes(train_dir, cfg)
    if changed:                                   # e.g. configs/demo.yaml edited since: train this config afresh
        shutil.rmtree(train_dir + ".prev", ignore_errors=True)
        os.replace(train_dir, train_dir + ".prev")
        log(f"[3/6 train] the config changed since {train_dir} was trained ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}): moved it to {train_dir}.prev, training afresh")
    done = _train_done(train_dir, steps)
    if done is not None:
        summary.append(f"[3/6 train] reused {train_dir}: step {done}")
    else:
        secs = _run("3/6 train", _cli("train", a.config, *train_ov, "--nproc", a.nproc), log)
        done = _train_done(train_dir, steps)
        if done is None:
            raise RuntimeError(f"training stopped before train.steps={steps}; rerun `decmem demo` to resume it")
        rows = _read_jsonl(os.path.join(train_dir, "metrics.jsonl"))
        first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
        summary.append(f"[3/6 train] {steps} steps in {secs:.0f} s (dp={a.nproc // a.cp} x cp={a.cp}), "
                       f"loss {first:.3f} -> {last:.3f}")
    log(summary[-1])
    weights = os.path.join(train_dir, "checkpoints", f"step-{done}", "weights")
    weights_file = os.path.join(weights, "model.safetensors")

    # 4: one rollout per strategy from the same weights, bank initialised from the held-out clip
    n_new = a.heldout_frames - a.init_frames
    runs = []
    for s in a.strategies:
        gdir = os.path.join(out, "generate", s)
        runs.append(gdir)
        fj = os.path.join(gdir, "frames.json")
        fresh = "2/6 held-out" not in ran and _newer(fj, weights_file)
        if fresh and _read_json(fj)["summary"]["weights"] == os.path.abspath(weights):
            summary.append(f"[4/6 generate {s}] reused {gdir}")
        else:
            secs = _run(f"4/6 generate {s}", _cli("generate", "--weights", weights, "--clip", heldout, "--init-frames",
                                                  a.init_frames, "--frames", n_new, "--out", gdir, "--strategy", s), log)
            sm = _read_json(fj)["summary"]
            summary.append(f"[4/6 generate {s}] {n_new} latents in {secs:.0f} s, "
                           f"{sm['seconds_per_latent_median']:.3f} s/latent, PSNR {sm['psnr_generated_mean']:.2f} dB")
        log(summary[-1])

    # 5: evaluation and the report
    secs = _run("5/6 score", _cli("score", "--clip", heldout, "--runs", *runs, "--out", out), log)
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
    fresh = _newer(path, os.path.join(weights, "model.safetensors")) and not rendered
    done = fresh and all(_read_json(path)["args"].get(k) == v for k, v in want.items())
    if done:
        lines.append(f"[6/6 minute eval] reused {res_dir}")
    else:
        secs = _run("6/6 minute eval", cmd, log)
        lines.append(f"[6/6 minute eval] {a.long_frames} frames after {a.init_frames}, {len(a.strategies)} "
                     f"strategies in {secs:.0f} s -> {res_dir}")
    log(lines[-1])
    return lines, _minute_section(_read_json(path), a, cmd)


def _minute_section(res: dict, a: DemoArgs, cmd: list[str]) -> str:
    """report.md's section on the minute-long rollout, from its eval.json."""
    clip, summ = res["clips"][0], res["summary"]
    rev = clip["revisit"]

    def arrow(s: dict, key: str, spec: str) -> str:
        """'first → last' of a strategy's summary means <key>_first and <key>_last."""
        return f"{fmt(s[key + '_first']['mean'], spec)} → {fmt(s[key + '_last']['mean'], spec)}"

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
        L.append(f"| {name} | {fmt(s['generated_latents']['mean'], '.0f')} | {fmt(s['psnr_revisit']['mean'], '.2f')} "
                 f"| {fmt(s['psnr_novel']['mean'], '.2f')} | {arrow(s, 'chunk_s', '.3g')} "
                 f"| {arrow(s, 'dispersion_low', '.3f')} | {arrow(s, 'dispersion_high', '.3f')} |")
    L += ["", "Seconds per chunk are generation only: the read statistics come from one more, untimed forward per "
          "chunk. Weak / strong-key mass: the memory read's attention on keys of weight < 0.02 / > 0.05 (the paper's dispersion). "
          "`minute/eval.md` has every number (SSIM, recall@k, ...), `minute/dispersion.png` and "
          "`minute/chunk_seconds.png` the curves.", "",
          "How to read it: one scene and one sampling seed, so a single minute moves by a dB or two between sampling "
          "seeds, and more between training runs: with training seed 1 instead of 0, decmem's rollout drifts in colour "
          "from about frame 50 and ends near 10 dB, at 2 and at 10 Euler steps; 150 more training steps remove the drift "
          "(BENCHMARKS.md, \"`make demo` end to end\", stop 29). The held-out clip above is the demo's measure of "
          "reading (+1.4 and +2.0 dB over SGM off with the two training seeds). At few Euler steps per chunk "
          "every chunk is close to a one-shot average, and PSNR rewards the blurry mean that the model keeps without "
          "its memory; with more steps samples are sharp and drift where memory does not hold them. BENCHMARKS.md "
          "(\"Over a minute\" and \"`make demo` end to end\") measures both regimes on these and on longer-trained "
          "weights: decmem leads the minute by more than 2 dB after about 900 training steps at 10 Euler steps per "
          "chunk, not reliably at the demo's 350.", "",
          f"Command: `decmem {shlex.join(cmd[3:])}`", ""]
    return "\n".join(L)


def cmd_demo(args) -> int:
    a = DemoArgs(out=args.out, config=args.config, scenes=args.scenes, frames=args.frames,
                 segment_frames=args.segment_frames, paths=tuple(args.paths.split(",")), hw=args.hw,
                 heldout_frames=args.heldout_frames,
                 init_frames=args.init_frames, heldout_seed=args.heldout_seed, long_frames=args.long_frames,
                 long_seed=args.long_seed, long_steps=args.long_steps, long_dense_frames=args.long_dense_frames,
                 nproc=args.nproc, cp=args.cp, steps=args.steps, strategies=tuple(args.strategies),
                 overrides=list(args.overrides))
    try:
        run_demo(a, log=log)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    except subprocess.CalledProcessError as e:
        print(f"decmem demo: a stage failed (exit {e.returncode}): {' '.join(map(str, e.cmd[3:]))}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    dm = sub.add_parser("demo", help="the main job: render -> shards -> train (dp=1 x cp=2) -> generate -> eval",
                        description="Chain ordinary decmem subcommands: preprocess (render MiniWorld scenes whose "
                                    "camera paths revisit places, and one held-out scene), train (DeepSpeed ZeRO-3, 2 "
                                    "local processes, dp=1 x cp=2), generate (one rollout per strategy along the "
                                    "held-out clip, bank initialised from its first frames), eval (revisit PSNR/SSIM, "
                                    "compare.mp4, revisits.png, report.md), then the minute-long rollout (one more "
                                    "held-out scene, --long-frames generated frames per strategy with `decmem eval "
                                    "--weights`: PSNR per frame, seconds per chunk, dispersion; a report section). "
                                    "Each stage prints its command, so it can be rerun alone with other options; "
                                    "finished stages are reused on a re-run.")
    dm.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for the train stage")
    dm.add_argument("--out", default="runs/demo", help="the demo's run directory")
    dm.add_argument("--config", default="configs/demo.yaml")
    dm.add_argument("--scenes", type=int, default=DemoArgs.scenes, help="training scenes to render")
    dm.add_argument("--frames", type=int, default=96, help="frames per training scene")
    dm.add_argument("--segment-frames", type=int, default=48, help="frames per training sample")
    dm.add_argument("--paths", default=",".join(DemoArgs.paths),
                    help="camera path kinds of the training scenes, one dataset each, trained on together")
    dm.add_argument("--hw", default="32x32", help="frame size HxW")
    dm.add_argument("--heldout-frames", type=int, default=64, help="frames of the held-out clip")
    dm.add_argument("--init-frames", type=int, default=24, help="ground-truth frames put in the bank")
    dm.add_argument("--heldout-seed", type=int, default=DemoArgs.heldout_seed, help="render seed of the held-out scene")
    dm.add_argument("--long-frames", type=int, default=DemoArgs.long_frames,
                    help="minute-long rollout: frames generated after --init-frames (600 = 60 s at 10 fps)")
    dm.add_argument("--long-seed", type=int, default=DemoArgs.long_seed,
                    help="minute-long rollout: render seed of its held-out scene")
    dm.add_argument("--long-steps", type=int, default=DemoArgs.long_steps,
                    help="minute-long rollout: Euler steps per chunk")
    dm.add_argument("--long-dense-frames", type=int, default=DemoArgs.long_dense_frames,
                    help="minute-long rollout: frames dense generates (its chunks slow down as the bank grows)")
    dm.add_argument("--nproc", type=int, default=2)
    dm.add_argument("--cp", type=int, default=2)
    dm.add_argument("--steps", type=int, default=0, help="training steps (default: the config's)")
    dm.add_argument("--strategies", type=strategies, default=strategies("decmem,window,dense"))
    dm.set_defaults(func=cmd_demo)
