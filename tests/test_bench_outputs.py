"""decmem bench --json PATH also writes PATH's stem .png and .targets.json; the target checks agree with the rows."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from decmem.bench.outputs import PLOTS
from decmem.bench.targets import (
    format_targets,
    targets_attention,
    targets_cp,
    targets_data,
    targets_generate,
    targets_train,
)
from decmem.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.size=debug", "model.chunk_frames=2", "model.attention.block_size=4", "model.attention.top_k=2",
        "model.attention.window=2", "bench_generate.latent_h=8", "bench_generate.latent_w=8",
        "bench_generate.threads=1"]
KEYS = {"target", "measured", "ratio", "met"}


def run_cli(argv) -> str:
    """main() in this process (the points still spawn their own); returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def check_outputs(json_path, stdout: str, names: list[str]):
    """Rows parse, the PNG is a sane image, the targets file has the expected targets; returns (rows, targets)."""
    rows = json.loads(open(json_path).read())
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    stem = os.path.splitext(str(json_path))[0]
    with Image.open(stem + ".png") as im:
        im.verify()
    with Image.open(stem + ".png") as im:
        assert im.format == "PNG" and 600 <= im.width <= 2000 and 300 <= im.height <= 1200
        assert len(im.convert("L").getcolors(256)) > 10                 # something was drawn
    targets = json.loads(open(stem + ".targets.json").read())
    assert [t["target"].split(":")[0] for t in targets] == [n.split(":")[0] for n in names]
    for t, name in zip(targets, names):
        assert set(t) == KEYS and t["target"].startswith(name) and t["met"] in (True, False, None)
        assert t["ratio"] is None or isinstance(t["ratio"], float)
    assert "| target | measured | ratio | met |" in stdout and targets[0]["target"] in stdout
    return rows, targets


#################################################################################
#                        The benches end to end (CI size)                       #
#################################################################################

def test_attention_outputs(tmp_path):
    """Through the console script: 448 is measured, so dense/decmem there decides the target."""
    path = tmp_path / "att.json"
    exe = os.path.join(os.path.dirname(sys.executable), "decmem")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "decmem.cli"]
    r = subprocess.run(cmd + ["bench", "attention", "-c", os.path.join(ROOT, "configs/debug.yaml"), "--strategies",
                              "decmem,dense", "--bank-frames", "16,448", "--json", str(path), "bench.repeats=1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows, (t,) = check_outputs(path, r.stdout, ["attention: dense / decmem"])
    ms = {(x["strategy"], x["bank_frames"]): x["median_ms"] for x in rows}
    ratio = ms[("dense", 448)] / ms[("decmem", 448)]
    assert t["ratio"] == pytest.approx(ratio, rel=1e-4) and t["met"] == (ratio >= 10)
    assert {"speedup_vs_dense", "machine"} <= set(rows[0])            # the rows' own format is unchanged


def test_generate_outputs(tmp_path):
    """56 and 448 measured: the growth target is decided; 224 is not near either, so its target is n/a."""
    path = tmp_path / "gen.json"
    out = run_cli(["bench", "generate", "--strategies", "decmem,dense", "--bank-frames", "56,448", "--json", str(path),
                   *TINY, "bench_generate.sample_steps=2", "bench_generate.chunks=2", "bench_generate.warmup_chunks=1"])
    rows, (grow, vs) = check_outputs(path, out, ["generate: decmem time per latent grows", "generate: dense / decmem"])
    s = {(x["strategy"], x["bank_frames"]): x["sec_per_latent"] for x in rows}
    ratio = s[("decmem", 448)] / s[("decmem", 56)]
    assert grow["ratio"] == pytest.approx(ratio, rel=1e-4) and grow["met"] == (ratio <= 1.05)
    assert vs["met"] is None and vs["ratio"] is None and "224" in vs["measured"]


def test_cp_outputs(tmp_path):
    path = tmp_path / "cp.json"
    out = run_cli(["bench", "cp", "--cp", "1,2", "--bank-frames", "8,16", "--json", str(path), *TINY])
    rows, (moved, mem) = check_outputs(path, out, ["cp: bytes moved", "cp: per-rank bank memory"])
    (r,) = [x for x in rows if x["cp"] == 2 and x["bank_frames"] == 16]           # largest bank, only cp > 1
    frac = r["query_bytes_per_layer"] / r["kv_allgather_bytes_per_layer"]
    assert moved["ratio"] == pytest.approx(frac, rel=1e-4) and moved["met"] == (frac <= 0.01)
    spread = max(max(x["per_rank_bank_mb"] * x["cp"] for x in rows if x["bank_frames"] == T) /
                 min(x["per_rank_bank_mb"] * x["cp"] for x in rows if x["bank_frames"] == T) for T in (8, 16))
    assert mem["ratio"] == pytest.approx(spread, rel=1e-4) and mem["met"] == (spread <= 1.1)


def test_data_outputs(tmp_path):
    path = tmp_path / "data.json"
    out = run_cli(["bench", "data", "-c", os.path.join(ROOT, "configs/debug.yaml"), "--spec",
                   "clips=2,frames=32,hw=16x16,seed=0", "--clip-frames", "8", "--samples", "4", "--json", str(path)])
    rows, (feed, s3) = check_outputs(path, out, ["data: loader samples/s", "data: s3:// loader"])
    rate = {x["variant"]: x.get("samples_per_s") for x in rows}
    ratio = rate["local"] / rate["s3 (loopback)"]
    assert s3["ratio"] == pytest.approx(ratio, rel=1e-4) and s3["met"] == (ratio <= 1.5)
    worst = min(rate["local"], rate["s3 (loopback)"]) / rate[next(x["variant"] for x in rows if x["what"] == "trainer")]
    assert feed["ratio"] == pytest.approx(worst, rel=1e-4) and feed["met"] == (worst >= 3)


def test_train_outputs(tmp_path):
    """A generous budget and a cap of 16: both strategies reach the cap, which cannot decide the 4x target."""
    path = tmp_path / "train.json"
    out = run_cli(["bench", "train", "--bank-frames", "8", "--steps", "1", "--warmup", "0", "--cap", "16",
                   "--memory-gb", "8", "--json", str(path), *TINY])
    rows, (est, t) = check_outputs(path, out, ["train: live tensors' peak", "train: decmem fits"])
    assert est["ratio"] is not None and est["met"] is not None           # every point carries the dry run's estimate
    fits = {x["strategy"]: x for x in rows if x["kind"] == "fit"}
    assert fits["decmem"]["capped"] and fits["dense"]["capped"]
    assert t["ratio"] == pytest.approx(fits["decmem"]["longest_fit_frames"] / fits["dense"]["longest_fit_frames"])
    assert t["met"] is None and "cap" in t["measured"]


#################################################################################
#                        Target checks on hand-made rows                        #
#################################################################################

def att(strategy, T, ms):
    return {"strategy": strategy, "bank_frames": T, "median_ms": ms}


def test_targets_attention():
    (t,) = targets_attention([att("decmem", 448, 5.0), att("dense", 448, 60.0), att("dense", 32, 6.0)])
    assert t["met"] is True and t["ratio"] == pytest.approx(12.0) and "nearest" not in t["measured"]
    (t,) = targets_attention([att("decmem", 512, 5.0), att("dense", 512, 40.0)])
    assert t["met"] is False and t["ratio"] == pytest.approx(8.0) and "512 (nearest measured to 448)" in t["measured"]
    (t,) = targets_attention([att("decmem", 128, 5.0), att("dense", 128, 60.0), att("decmem", 448, 5.0)])
    assert t["met"] is None and t["ratio"] is None                    # dense not measured near 448


def gen(strategy, T, s):
    return {"strategy": strategy, "bank_frames": T, "sec_per_latent": s}


def test_targets_generate():
    grow, vs = targets_generate([gen("decmem", 56, 1.0), gen("decmem", 224, 1.02), gen("decmem", 448, 1.04),
                                 gen("dense", 224, 3.5)])
    assert (grow["met"], vs["met"]) == (True, True)
    assert grow["ratio"] == pytest.approx(1.04) and vs["ratio"] == pytest.approx(3.5 / 1.02, rel=1e-5)
    grow, vs = targets_generate([gen("decmem", 56, 1.0), gen("decmem", 224, 1.0), gen("decmem", 448, 1.2),
                                 gen("dense", 224, 2.0)])
    assert (grow["met"], vs["met"]) == (False, False)
    grow, vs = targets_generate([gen("decmem", 56, 1.0), gen("decmem", 112, 1.0), gen("dense", 56, 9.0)])
    assert grow["met"] is None and vs["met"] is None and grow["ratio"] is None


def cp_row(cp, T, q, kv, mb):
    return {"cp": cp, "bank_frames": T, "query_bytes_per_layer": q, "kv_allgather_bytes_per_layer": kv,
            "per_rank_bank_mb": mb, "by_collective": {}}


def test_targets_cp():
    moved, mem = targets_cp([cp_row(1, 448, 0, 0, 100.0), cp_row(2, 448, 5, 1000, 50.0), cp_row(4, 448, 8, 1000, 25.5),
                             cp_row(2, 56, 5, 100, 6.0)])
    assert moved["met"] is True and moved["ratio"] == pytest.approx(0.008)          # worst cp at the largest bank
    assert mem["met"] is True and mem["ratio"] == pytest.approx(102 / 100)
    moved, mem = targets_cp([cp_row(1, 56, 0, 0, 100.0), cp_row(2, 56, 30, 1000, 60.0)])
    assert moved["met"] is False and mem["met"] is False and mem["ratio"] == pytest.approx(1.2)
    moved, mem = targets_cp([cp_row(1, 56, 0, 0, 100.0)])
    assert moved["met"] is None and mem["met"] is None


def test_targets_data():
    rows = [{"what": "loader", "variant": "local", "samples_per_s": 30.0},
            {"what": "loader", "variant": "s3 (loopback)", "samples_per_s": 25.0},
            {"what": "trainer", "variant": "demo", "samples_per_s": 2.0}]
    feed, s3 = targets_data(rows)
    assert feed["met"] is True and feed["ratio"] == pytest.approx(12.5) and s3["met"] is True
    rows[1]["samples_per_s"], rows[2]["samples_per_s"] = 10.0, 4.0
    feed, s3 = targets_data(rows)
    assert feed["met"] is False and s3["met"] is False and s3["ratio"] == pytest.approx(3.0)
    feed, s3 = targets_data(rows[:1])
    assert feed["met"] is None and s3["met"] is None


def fit(strategy, longest, capped=False, start=16):
    return {"kind": "fit", "strategy": strategy, "memory_budget_gb": 2.0, "longest_fit_frames": longest,
            "capped": capped, "cap_frames": 4096, "search_start": start}


@pytest.mark.parametrize("sparse, dense, met, ratio", [
    (fit("decmem", 320), fit("dense", 80), True, 4.0),
    (fit("decmem", 160), fit("dense", 80), False, 2.0),
    (fit("decmem", 4096, capped=True), fit("dense", 80), True, 51.2),      # a lower bound already over 4
    (fit("decmem", 160, capped=True), fit("dense", 80), None, 2.0),        # a lower bound under 4 decides nothing
    (fit("decmem", 64, capped=True), fit("dense", 64, capped=True), None, 1.0),
    (fit("decmem", None), fit("dense", 80), False, 0.0),
    (fit("decmem", None), fit("dense", None), None, None),
    (fit("decmem", 128), fit("dense", None), True, None),                  # dense fits nothing: ratio > 128 / 16
])
def test_targets_train(sparse, dense, met, ratio):
    _, t = targets_train([{"kind": "point", "strategy": "decmem", "bank_frames": 16}, sparse, dense])
    assert t["met"] is met and (t["ratio"] == pytest.approx(ratio) if ratio is not None else t["ratio"] is None)


def test_targets_train_without_search():
    est, t = targets_train([{"kind": "point", "strategy": "decmem", "bank_frames": 16, "status": "ok"}])
    assert t["met"] is None and t["ratio"] is None
    assert est["met"] is None and "estimate" in est["measured"]     # a row from before the estimate: unknown


def _point(strategy, L, live, estimated):
    return {"kind": "point", "strategy": strategy, "bank_frames": L, "status": "ok", "live_peak_mb": live,
            "step_rss_mb": 1.5 * live, "est_step_mb": estimated, "live_vs_estimate": live / estimated,
            "measured_vs_estimate": 1.5 * live / estimated}


@pytest.mark.parametrize("points, met, worst", [
    ([_point("decmem", 16, 90, 100), _point("dense", 16, 75, 100)], True, 0.9),
    ([_point("decmem", 16, 90, 100), _point("dense", 64, 104, 100)], False, 1.04),   # understated by 4%
    ([_point("decmem", 16, 40, 100), _point("dense", 64, 95, 100)], False, 0.40),    # overstated by 2.5x
])
def test_targets_train_checks_the_dry_run_estimate(points, met, worst):
    """Every point's live tensor peak / estimated step memory must lie in the band; the worst point is the ratio."""
    est, _ = targets_train(points)
    assert est["met"] is met and est["ratio"] == pytest.approx(worst)


def test_format_targets():
    table = format_targets([{"target": "a", "measured": "m", "ratio": 2.0, "met": True},
                            {"target": "b", "measured": "-", "ratio": None, "met": None}])
    assert table.splitlines()[2] == "| a | m | 2 | yes |" and table.splitlines()[3] == "| b | - | - | n/a |"


@pytest.mark.parametrize("kind, rows", [
    ("train", [{"kind": "point", "strategy": "decmem", "bank_frames": 16, "status": "ok", "tokens_per_s": 1.0}]),
    ("cp", [cp_row(2, 56, 5, 100, 6.0), cp_row(4, 56, 8, 150, 3.0)]),
    ("attention", [att("decmem", 0, 1.0), att("decmem", 8, 1.0), att("dense", 8, 2.0)]),
])
def test_plots_partial_rows(tmp_path, kind, rows):
    """Runs without a search, without cp=1 or with a bank of 0 frames still give a PNG."""
    path = str(tmp_path / f"{kind}.png")
    PLOTS[kind](rows, path)
    with Image.open(path) as im:
        im.verify()
