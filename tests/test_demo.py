"""`decmem demo` at the debug size: every stage runs through its own subcommand, every artefact exists and decodes,
and a re-run reuses the finished stages."""
from __future__ import annotations

import os
import subprocess
import sys

import av
from PIL import Image

from training.evaluate import parse_report_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = [sys.executable, "-m", "training.cli", "demo", "--config", os.path.join(ROOT, "configs", "debug.yaml"),
        "--scenes", "2", "--frames", "48", "--segment-frames", "24", "--hw", "16x16", "--heldout-frames", "32",
        "--init-frames", "12", "--steps", "12", "log.progress=false", "log.rollout_every=0"]


def decode(path):
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_demo_chain_at_debug_size(tmp_path):
    out = str(tmp_path / "demo")
    r = subprocess.run([*DEMO, "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in ("[1/5 data]", "[2/5 held-out]", "[3/5 train]", "[4/5 generate decmem]", "[4/5 generate window]",
                  "[4/5 generate dense]", "[5/5 eval]"):
        assert stage in r.stdout, f"no summary line for {stage}"
    assert "$ decmem train" in r.stdout and "--nproc 2" in r.stdout and "train.cp=2" in r.stdout

    rows = parse_report_table(open(os.path.join(out, "report.md")).read())
    assert [row["strategy"] for row in rows] == ["decmem", "window", "dense"]
    for row in rows:
        assert row["all generated PSNR (dB)"] > 0 and row["s / latent"] > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "tensorboard --logdir" in report and "config.yaml" in report

    frames = decode(os.path.join(out, "compare.mp4"))
    assert len(frames) == 32 and frames[0].shape[1] >= 4 * 16                 # ground truth | 3 strategies
    assert len(decode(os.path.join(out, "rollout.mp4"))) == 32
    with Image.open(os.path.join(out, "revisits.png")) as im:
        im.verify()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "train", "tb"))
    acc.Reload()
    assert {"train/loss", "perf/tokens_per_s", "cp/bytes_per_step"} <= set(acc.Tags()["scalars"])

    # a re-run reuses every finished stage (and regenerates only the report)
    r = subprocess.run([*DEMO, "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reused") == 6 and "$ decmem train" not in r.stdout and "$ decmem generate" not in r.stdout
