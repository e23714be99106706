"""`decmem demo` at the debug size: every stage runs through its own subcommand, every artefact exists and decodes,
the minute-long rollout runs at a tiny size, and a re-run reuses the finished stages."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import av
from PIL import Image

from decmem.evaluation.revisits import parse_report_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = [sys.executable, "-m", "decmem.cli", "demo", "--config", os.path.join(ROOT, "configs", "debug.yaml"),
        "--scenes", "2", "--frames", "48", "--segment-frames", "24", "--hw", "16x16", "--heldout-frames", "32",
        "--init-frames", "12", "--steps", "12", "--long-frames", "6", "--long-steps", "1", "--long-dense-frames", "2",
        "log.progress=false", "log.rollout_every=0"]


MARGIN_DB = 1.0        # measured: 9.73 dB trained (every strategy) vs 7.97 dB untrained


def untrained_psnr(out, tmp_path) -> float:
    """Mean PSNR of the demo's decmem rollout (same held-out clip, init frames and seed) from freshly initialised
    weights of the same model: what the trained strategies must beat."""
    import torch

    from decmem.evaluation.generate import generate
    from decmem.model.dit import VideoDiT
    from decmem.training.weights import load_weights, save_weights

    _, wcfg = load_weights(os.path.join(out, "train", "checkpoints", "step-12", "weights"))
    torch.manual_seed(0)
    w = save_weights(VideoDiT(wcfg.model), str(tmp_path / "untrained"), wcfg.diffusion, wcfg.codec, wcfg.frame_hw)
    trained = json.load(open(os.path.join(out, "generate", "decmem", "frames.json")))["summary"]
    s = generate(w, os.path.join(out, "heldout"), trained["init_frames"], trained["generated_latents"],
                 str(tmp_path / "untrained-rollout"), "decmem", progress=False)
    print(f"\nMEASURED demo PSNR: trained decmem {trained['psnr_generated_mean']:.2f} dB, "
          f"untrained {s['psnr_generated_mean']:.2f} dB")
    return s["psnr_generated_mean"]


def decode(path):
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_demo_chain_at_debug_size(tmp_path):
    out = str(tmp_path / "demo")
    r = subprocess.run([*DEMO, "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in ("[1/6 data (revisit)]", "[1/6 data (return)]", "[2/6 held-out]", "[3/6 train]", "[4/6 generate decmem]", "[4/6 generate window]",
                  "[4/6 generate dense]", "[5/6 score]", "[6/6 minute data]", "[6/6 minute eval]"):
        assert stage in r.stdout, f"no summary line for {stage}"
    assert "$ decmem train" in r.stdout and "--nproc 2" in r.stdout and "train.cp=2" in r.stdout
    assert f"data.data={out}/data::{out}/data-return" in r.stdout        # both path kinds, trained on as one

    rows = parse_report_table(open(os.path.join(out, "report.md")).read())
    assert [row["strategy"] for row in rows] == ["decmem", "window", "dense"]
    for row in rows:
        assert row["all generated PSNR (dB)"] > 0 and row["s / latent"] > 0
    # the 12 trained steps show: each strategy's rollout beats the same rollout from untrained weights (as
    # tests/test_learning.py compares), PSNR as `decmem generate` measures it (frames.json) on both sides
    untrained = untrained_psnr(out, tmp_path)
    for s in ("decmem", "window", "dense"):
        trained = json.load(open(os.path.join(out, "generate", s, "frames.json")))["summary"]["psnr_generated_mean"]
        assert trained > untrained + MARGIN_DB, (s, trained, untrained)
    report = open(os.path.join(out, "report.md")).read()
    assert "tensorboard --logdir" in report and "config.yaml" in report

    frames = decode(os.path.join(out, "compare.mp4"))
    assert len(frames) == 32 and frames[0].shape[1] >= 4 * 16                 # ground truth | 3 strategies
    assert len(decode(os.path.join(out, "rollout.mp4"))) == 32
    with Image.open(os.path.join(out, "revisits.png")) as im:
        im.verify()

    # the minute-long rollout, here 6 frames (3 chunks) after 12, dense cut to 2
    res = json.load(open(os.path.join(out, "minute", "eval.json")))
    assert res["args"]["frames"] == 6 and res["args"]["frames_for"] == {"dense": 2}
    assert res["weights"] == {s: os.path.join(out, "train", "checkpoints", "step-12", "weights")
                              for s in ("decmem", "window", "dense")}
    for name, n in (("decmem", 6), ("window", 6), ("dense", 2)):
        row = res["clips"][0]["strategies"][name]
        assert len(row["psnr"]) == len(row["dispersion_low"]) == len(row["dispersion_high"]) == n
        assert len(row["chunk_seconds"]) == n // 2
    section = report[report.index("## The minute-long rollout"):report.index("## How this was made")]
    assert "![PSNR per generated frame over the minute](minute/frames.png)" in section
    assert "**dense generated only its first 2 frames** (`--frames-for dense=2`)" in section
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ") and "→" in line and "| strategy" not in line}
    assert list(rows) == ["decmem", "window", "dense"] and [r[1] for r in rows.values()] == ["6", "6", "2"]
    first, last = res["summary"]["window"]["dispersion_low_first"], res["summary"]["window"]["dispersion_low_last"]
    assert rows["window"][5] == f"{first['mean']:.3f} → {last['mean']:.3f}"
    cmd = section[section.index("Command: `") + 10:].split("`")[0]
    assert cmd.startswith("decmem eval --weights ") and "--frames 6 " in cmd and "--frames-for dense=2" in cmd
    assert "--strategies decmem,window,dense" in cmd and "--steps 1 " in cmd
    for png in ("frames.png", "dispersion.png", "chunk_seconds.png"):
        with Image.open(os.path.join(out, "minute", png)) as im:
            im.verify()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "train", "tb"))
    acc.Reload()
    assert {"train/loss", "perf/tokens_per_s", "cp/bytes_per_step"} <= set(acc.Tags()["scalars"])

    # a re-run reuses every finished stage (and regenerates only the report)
    r = subprocess.run([*DEMO, "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    # reused: 2 training datasets, held-out, train, 3 generates, minute data, minute eval
    assert r.stdout.count("reused") == 9 and "$ decmem train" not in r.stdout and "$ decmem generate" not in r.stdout
    assert "$ decmem eval --weights" not in r.stdout and "## The minute-long rollout" in open(
        os.path.join(out, "report.md")).read()


def _manifest(root, inputs):
    """A finished dataset's manifest.json holding these scene descriptors."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"shards": [{"name": "shard-000000.tar"}],
                   "inputs": {d["id"]: {"status": "done", "input": d} for d in inputs}}, f)


def test_a_dataset_of_another_render_spec_is_not_reused(tmp_path):
    from decmem.cli.demo import _manifest_done
    from decmem.data_pipeline.render import find_inputs

    spec = "scenes=2,frames=48,hw=16x16,seed=0,path=revisit"
    _manifest(tmp_path / "same", find_inputs(spec))
    assert _manifest_done(str(tmp_path / "same"), spec)
    # the same scene ids, rendered along the tour path, for fewer frames, or at another size: not this dataset
    for other in ("scenes=2,frames=48,hw=16x16,seed=0", "scenes=2,frames=40,hw=16x16,seed=0,path=revisit",
                  "scenes=2,frames=48,hw=32x32,seed=0,path=revisit"):
        _manifest(tmp_path / "other", find_inputs(other))
        assert not _manifest_done(str(tmp_path / "other"), spec), other
    # manifests from before the path key rendered the tour path
    old = [{k: v for k, v in d.items() if k != "path"} for d in find_inputs("scenes=2,frames=48,hw=16x16,seed=0")]
    _manifest(tmp_path / "old", old)
    assert _manifest_done(str(tmp_path / "old"), "scenes=2,frames=48,hw=16x16,seed=0")
    assert not _manifest_done(str(tmp_path / "old"), spec)


def test_a_training_run_of_another_config_is_not_reused(tmp_path):
    """`decmem demo` reuses a finished training run only for the config it was trained with (more steps resume)."""
    from decmem.cli.demo import _config_changes
    from decmem.training.config import dump_config, load_config
    from decmem.training.run_config import RunConfig

    config = os.path.join(ROOT, "configs", "demo.yaml")
    run = str(tmp_path / "train")
    os.makedirs(run)
    assert _config_changes(run, load_config(RunConfig, config)) == []                 # nothing trained yet
    dump_config(load_config(RunConfig, config, [f"run_dir={run}"]), os.path.join(run, "config.yaml"))
    same = load_config(RunConfig, config, [f"run_dir={run}", "train.steps=900", "log.every_steps=5"])
    assert _config_changes(run, same) == []
    other = load_config(RunConfig, config, [f"run_dir={run}", "model.attention.block_size=16", "optim.lr=3e-4"])
    assert _config_changes(run, other) == ["model.attention.block_size: 64 -> 16", "optim.lr: 0.001 -> 0.0003"]
