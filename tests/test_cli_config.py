"""Config system and CLI: located errors, overrides, resolved dumps, the bench subcommand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from decmem.cli.main import main
from decmem.training.config import ConfigError, dump_config, load_config, to_dict
from decmem.training.run_config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  attention:\n    strategy: decmem\n    top_kk: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert f"{path} line 5" in msg and "'model.attention.top_kk'" in msg and "did you mean 'model.attention.top_k'" in msg


def test_misplaced_key_suggests_its_full_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'block_size' \(did you mean 'model.attention.block_size'\?\)"):
        load_config(RunConfig, write(tmp_path, "block_size: 4\n"))


def test_wrong_type_and_bad_value_are_located(tmp_path):
    path = write(tmp_path, "bench:\n  dim: wide\n")
    with pytest.raises(ConfigError, match=rf"{path} line 2: key 'bench.dim' expects an integer, got 'wide'"):
        load_config(RunConfig, path)
    path = write(tmp_path, "model:\n  attention:\n    merge: average\n", "b.yaml")
    with pytest.raises(ConfigError, match=rf"{path} line 3: model.attention.merge: expected one of"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, write(tmp_path, "a: [1, 2\n", "c.yaml"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RunConfig, None, ["model.attention.top_k"])


def test_overrides_win_and_dump_round_trips(tmp_path):
    path = write(tmp_path, "seed: 3\nmodel:\n  attention:\n    top_k: 4\n    window: 2\n")
    cfg = load_config(RunConfig, path, ["model.attention.top_k=16", "bench.backward=true", "model.attention.decay=1"])
    assert (cfg.seed, cfg.model.attention.top_k, cfg.model.attention.window) == (3, 16, 2)
    assert cfg.bench.backward is True and cfg.model.attention.decay == 1.0 and isinstance(cfg.model.attention.decay, float)
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, str(out))
    again = load_config(RunConfig, str(out))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(out.read_text())["model"]["attention"]["top_k"] == 16


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        load_config(RunConfig, os.path.join(ROOT, "configs", name))


def test_cli_config_reports_errors_with_exit_code(tmp_path, capsys):
    assert main(["config", "model.attention.top_kk=3"]) == 2
    assert "did you mean 'model.attention.top_k'" in capsys.readouterr().err
    assert main(["config", "-c", os.path.join(ROOT, "configs/debug.yaml"), "--out", str(tmp_path)]) == 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["name"] == "debug"


def test_bench_attention_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "attention", "-c", os.path.join(ROOT, "configs/debug.yaml"),
               "--bank-frames", "4,16", "--json", str(out), "bench.repeats=1"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {(r["strategy"], r["bank_frames"]) for r in rows} == {
        (s, t) for s in ("decmem", "dense", "dense_decay", "fov_frames", "window") for t in (4, 16)}
    for r in rows:
        assert {"strategy", "bank_frames", "tokens_per_frame", "median_ms", "attended_tokens"} <= set(r)
        assert r["median_ms"] > 0 and r["tokens_per_frame"] == 16
    by = {(r["strategy"], r["bank_frames"]): r["attended_tokens"] for r in rows}
    # debug: 16 tokens/frame, chunk 1 frame, W=2, k=4 blocks of 4 -> decmem reads 16 + 16 + 16 at most
    assert by[("dense", 16)] == 16 * 16 + 16 and by[("decmem", 16)] == 4 * 4 + 16 + 16
    assert by[("decmem", 16)] == by[("decmem", 4)]        # flat in bank size


def test_bench_attention_sparse_backends(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "attention", "-c", os.path.join(ROOT, "configs/debug.yaml"), "--strategies", "decmem,window",
               "--sparse-backends", "gather,flex", "--bank-frames", "8", "--json", str(out), "bench.repeats=1"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["strategy"], r["sparse_backend"]) for r in rows] == [
        ("decmem", "gather"), ("decmem[flex]", "flex"), ("window", "gather")]
    assert rows[0]["attended_tokens"] == rows[1]["attended_tokens"]


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "decmem")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "decmem.cli"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, check=True)
    assert "bench" in r.stdout and "config" in r.stdout
    r = subprocess.run(cmd + ["bench", "attention", "--strategies", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown strategy" in r.stderr
    for sub in (["train"], ["eval"], ["score"], ["generate"], ["preprocess"], ["submit"], ["jobs"], ["config"],
                ["demo"], ["bench"], *(["bench", b] for b in ("attention", "generate", "train", "memory", "data", "cp"))):
        r = subprocess.run(cmd + [*sub, "-h"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: decmem" in r.stdout, (sub, r.stderr[-2000:])


def test_a_missing_input_answers_in_one_line(tmp_path, capsys):
    """Every subcommand answers a user mistake in one line and a non-zero exit, never a traceback."""
    cases = [(["preprocess", "--format", "re10k", str(tmp_path / "missing"), str(tmp_path / "out")], "missing"),
             (["score", "--clip", str(tmp_path / "missing.npz"), "--runs", str(tmp_path), "--out", str(tmp_path / "o")],
              "missing.npz"),
             (["eval", "--weights", "W", "--data", "D", "--clip", "C", "--runs", "R", "--out", "O"], "decmem score")]
    for argv, named in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and named in err, (argv, err)


@pytest.mark.parametrize("name", ["bench_gpu.yaml", "bench_generate_gpu.yaml"])
def test_gpu_bench_configs_resolve_to_paper_scale(name):
    from decmem.model.blocks import BlockLayout
    from decmem.training.config import load_config
    from decmem.training.run_config import RunConfig

    cfg = load_config(RunConfig, os.path.join(ROOT, "configs", name), [])
    if name == "bench_gpu.yaml":
        b = cfg.bench
        assert (b.frame_h * b.frame_w, b.dim, b.n_heads, b.dtype, b.device) == (1560, 1024, 16, "bfloat16", "cuda")
        grid = (b.frame_h, b.frame_w)
    else:
        b = cfg.bench_generate
        assert (cfg.model.size, b.dtype, b.device) == ("B", "bfloat16", "cuda")
        grid = (b.latent_h // cfg.model.patch_size, b.latent_w // cfg.model.patch_size)
    assert grid[0] * grid[1] == 1560
    BlockLayout(*grid, cfg.model.attention.block_size)          # the block size tiles the 30x52 token grid
