"""``decmem train --dry-run``: layout, parameters, tokens per step, data check, memory estimate vs. measurement."""
from __future__ import annotations

import functools
import glob
import json
import os

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from decmem.data_pipeline.shards import Manifest, ShardSink, npy_bytes, sample_key
from decmem.model.diffusion import DiffusionArgs, rectified_flow_loss
from decmem.model.dit import VideoDiT
from decmem.training.config import load_config
from decmem.training.dry_run import count_parameters, estimate_memory, format_bytes, layout_table, run_dry_run
from decmem.training.run_config import RunConfig
from decmem.training.validate import check_data, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# name -> (samples = shards, latent frames per sample, channels, latent h, w)
DATASETS = {
    "rgb16": (8, 24, 3, (16, 16)),      # pixels codec, 16x16 frames
    "rgb32": (8, 30, 3, (32, 32)),      # pixels codec, 32x32 frames (demo)
    "sd32": (2, 245, 4, (32, 32)),      # SD-VAE latents of 256x256 video, minute-long clips (paper)
    "wan60": (2, 64, 16, (60, 104)),    # Wan VAE latents of 480x832 video (the Wan configs)
}
# the test dataset matching each config's model (a config not listed gets rgb32, or sd32 for 4 channels)
CONFIG_DATA = {"debug.yaml": "rgb16", "bench_cpu.yaml": "rgb16", "bench_generate_cpu.yaml": "rgb32",
               "demo.yaml": "rgb32", "paper.yaml": "sd32", "wan_paper.yaml": "wan60", "wan_stage1.yaml": "wan60",
               "wan_stage2.yaml": "wan60"}
# the GPU bench configs set up one attention layer / a generation on cuda at 480p latents: not training runs
# (tests/test_cli_config.py checks that they resolve)
ALL_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
                     if not p.endswith("_gpu.yaml"))


def dataset_for(config: str, cfg) -> str:
    return CONFIG_DATA.get(config) or ("sd32" if cfg.model.latent_channels == 4 else "rgb32")


def write_latent_dataset(root: str, samples: int, frames: int, channels: int, hw: tuple[int, int], spatial: int = 8):
    """A dataset in the shard format (latents.npy, K.npy, c2w.npy, meta.json), one sample per shard."""
    manifest = Manifest.load_or_new(root, {"format_name": "test-latents",
                                           "resolution": [hw[0] * spatial, hw[1] * spatial]})
    sink = ShardSink(root, manifest, shard_bytes=1)          # publish after every sample: one shard each
    rng = np.random.default_rng(0)
    H, W = hw[0] * spatial, hw[1] * spatial                  # image size the cameras refer to
    for i in range(samples):
        lat = rng.standard_normal((frames, channels, *hw)).astype(np.float16)
        K = np.tile(np.array([[0.8 * W, 0, W / 2], [0, 0.8 * H, H / 2], [0, 0, 1]], np.float32), (frames, 1, 1))
        c2w = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
        c2w[:, 0, 3] = np.linspace(0, 2, frames)             # a camera moving along x
        meta = {"source": "test", "video_id": f"vid{i}", "segment": 0, "size": [H, W], "frames": frames,
                "latent_shape": list(lat.shape), "latent_frame_index": list(range(frames)), "codec": "test"}
        key = sample_key(f"vid{i}", 0)
        manifest.expect(key, {"id": key}, 1)
        sink.add({"__key__": key, "latents.npy": npy_bytes(lat), "K.npy": npy_bytes(K), "c2w.npy": npy_bytes(c2w),
                  "meta.json": json.dumps(meta).encode()}, key, 0, frames)
    sink.flush()
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("dry_run_data")
    return {name: write_latent_dataset(str(base / name), *spec) for name, spec in DATASETS.items()}


def cfg_for(name: str, *overrides, data: str | None = None):
    over = list(overrides) + ([f"data.data={data}"] if data is not None else [])
    return load_config(RunConfig, os.path.join(CONFIGS, name) if name else None, over)


@pytest.fixture
def no_process_group(monkeypatch):
    """A dry run must never start a process group (or DeepSpeed, which would start one)."""
    def refuse(*a, **k):
        raise AssertionError("the dry run started a process group")
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    yield
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


# ------------------------------------------------------------------------------------
# The report on every shipped config
# ------------------------------------------------------------------------------------

def test_shipped_configs_are_tested():
    assert {"debug.yaml", "demo.yaml", "paper.yaml"} <= set(ALL_CONFIGS)


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_dry_run_reports_layout_tokens_and_data(config, world, datasets, no_process_group):
    cfg = cfg_for(config)
    if world % cfg.train.cp:
        pytest.skip(f"train.cp={cfg.train.cp} does not divide world {world}")
    name = dataset_for(config, cfg)
    ds = DATASETS[name]
    cfg.data.data = datasets[name]
    lines = []
    r = run_dry_run(cfg, world, log=lines.append)
    t, d, m = cfg.train, cfg.data, cfg.model
    dp, cp = world // t.cp, t.cp
    assert r["layout"]["world"] == world and r["layout"]["dp"] == dp and r["layout"]["cp"] == cp
    assert r["layout"]["cp_groups"] == [list(range(g * cp, (g + 1) * cp)) for g in range(dp)]
    assert sorted(sum(r["layout"]["dp_groups"], [])) == list(range(world))
    # tokens per optimizer step, by hand: dp x grad_accum x batch samples of clip_frames frames of (h/p)(w/p) tokens
    h, w = ds[3]
    tokens_per_frame = (h // m.patch_size) * (w // m.patch_size)
    samples = dp * t.grad_accum * d.batch_size
    assert r["samples_per_step"] == samples and r["tokens_per_frame"] == tokens_per_frame
    assert r["tokens_per_step"] == samples * d.clip_frames * tokens_per_frame
    assert r["data"]["frame_hw"] == (h, w) and r["data"]["channels"] == ds[2] and r["data"]["sample_frames"] == ds[1]
    assert r["data"]["shards"] == ds[0] and r["params"] == count_parameters(cfg)
    report = "\n".join(lines)
    assert report == r["report"]
    assert f"world {world} = dp {dp} x cp {cp}" in report and f"{r['params']:,}" in report
    assert (f"tokens {r['tokens_per_step']:,} = {samples} samples x {d.clip_frames} frames x {tokens_per_frame}"
            in report)
    assert "total" in report and "GiB" in report
    mem = r["memory"]
    assert mem["total"] == sum(mem[k] for k in ("params", "grads", "optimizer", "ema", "params_gathered", "bank_kv",
                                               "activations", "workspace", "cp_buffers"))
    assert min(mem[k] for k in ("params", "optimizer", "bank_kv", "activations")) > 0


def test_paper_config_on_eight_ranks(datasets, no_process_group):
    """dp 2 x cp 4; a GPU config dry-run on CPU reports what it would use on the GPU."""
    lines = []
    r = run_dry_run(cfg_for("paper.yaml", data=datasets["sd32"]), 8, log=lines.append)
    report = "\n".join(lines)
    assert r["layout"]["cp_groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert r["layout"]["dp_groups"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "cp groups (share one sample): [0,1,2,3] [4,5,6,7]" in report
    assert r["device"] == "cuda" and r["precision"] == "bf16" and "cuda, bf16" in report
    # bank: 241 - 4 = 237 frames, cp 4 -> 60, 59, 59, 59 frames per rank
    assert r["bank_frames"] == 237 and r["bank_frames_per_rank"] == 60
    assert r["bank_shards"] == [(0, 60), (60, 119), (119, 178), (178, 237)]
    assert r["tokens_per_step"] == 2 * 2 * 1 * 241 * 256 and r["target_tokens_per_step"] == 2 * 2 * 5 * 4 * 256
    assert 250e6 < r["params"] < 400e6                                    # DiT-B
    assert r["memory"]["total"] < 80 * 2**30                              # fits the 80 GB GPUs its header names


def test_debug_config_with_context_parallelism(datasets, no_process_group):
    cfg = cfg_for("debug.yaml", "train.cp=2", "data.min_context=2", data=datasets["rgb16"])
    lines = []
    r = run_dry_run(cfg, 8, log=lines.append)
    assert (r["layout"]["dp"], r["layout"]["cp"]) == (4, 2)
    assert "cp groups (share one sample): [0,1] [2,3] [4,5] [6,7]" in "\n".join(lines)
    n = cfg.data.clip_frames - cfg.model.chunk_frames
    assert r["bank_frames"] == n and r["bank_frames_per_rank"] == (n + 1) // 2
    assert r["bank_shards"] == [(0, (n + 1) // 2), ((n + 1) // 2, n)]
    assert r["samples_per_step"] == 4 * cfg.train.grad_accum * cfg.data.batch_size
    assert r["memory"]["cp_buffers"] > 0


def _hand_count(cfg) -> int:
    """VideoDiT parameters from the architecture, written out by hand."""
    m = cfg.model
    D, H, p, C, hid = m.dim, m.n_heads, m.patch_size, m.latent_channels, int(m.dim * m.mlp_ratio)
    a = m.attention
    gates = {"residual": 1, "gate": 2, "joint": 0}[a.merge] + a.coarse     # per head: SGM (ALM) (coarse)
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * gates * H + gates * H)   # qkv, proj, gates
    block += (D * hid + hid) + (hid * D + D) + (D * 6 * D + 6 * D)        # MLP, adaLN
    embed = (C * p * p * D + D) + (6 * p * p * D + D) * (m.camera == "plucker")   # patches, Plücker rays
    embed += (256 * D + D) + (D * D + D) + (m.action_dim * D + D) * bool(m.action_dim)   # time MLP, actions
    final = (D * p * p * C + p * p * C) + (D * 2 * D + 2 * D)
    return m.depth * block + embed + final


@pytest.mark.parametrize("config", ["debug.yaml", "demo.yaml", "paper.yaml"])
def test_parameter_count(config):
    cfg = cfg_for(config)
    n = count_parameters(cfg)
    assert n == _hand_count(cfg)
    if config != "paper.yaml":                                            # a real model where it is cheap
        assert n == sum(p.numel() for p in VideoDiT(cfg.model).parameters())


# ------------------------------------------------------------------------------------
# Memory estimate
# ------------------------------------------------------------------------------------

def test_model_states_scale_as_one_over_world():
    cfg = cfg_for("paper.yaml", "train.zero_stage=3", "train.activation_checkpointing=false")
    n = count_parameters(cfg)
    est = {w: estimate_memory(cfg, w, (32, 32)) for w in (4, 8, 32)}
    for w, e in est.items():   # bf16: 2 param + 2 grad + 12 (fp32 master, m, v) + 4 EMA bytes per parameter / world
        assert abs(e["params"] * w - 2 * n) <= w and abs(e["grads"] * w - 2 * n) <= w
        assert abs(e["optimizer"] * w - 12 * n) <= w and abs(e["ema"] * w - 4 * n) <= w
        # per cp rank, not per world: the bank and activations do not shrink with dp
        assert e["bank_kv"] == est[4]["bank_kv"] and e["activations"] == est[4]["activations"]
    dbg = cfg_for("debug.yaml")
    n = count_parameters(dbg)
    for w in (1, 2, 8):
        e = estimate_memory(dbg, w, (16, 16))
        assert e["precision"] == "fp32" and abs(e["params"] * w - 4 * n) <= w and abs(e["optimizer"] * w - 8 * n) <= w
    z2 = estimate_memory(cfg_for("debug.yaml", "train.zero_stage=2"), 8, (16, 16))
    assert z2["params"] == 4 * n and z2["params_gathered"] == 0          # ZeRO-2 keeps every parameter everywhere


def test_cp_splits_the_bank_and_checkpointing_keeps_block_inputs():
    one = estimate_memory(cfg_for("paper.yaml", "train.cp=1", "train.activation_checkpointing=false"), 4, (32, 32))
    four = estimate_memory(cfg_for("paper.yaml", "train.activation_checkpointing=false"), 4, (32, 32))
    assert one["local_bank_frames"] == 237 and four["local_bank_frames"] == 60
    assert one["bank_kv"] / four["bank_kv"] == pytest.approx(237 / 60)
    assert one["memory_stream"] / four["memory_stream"] == pytest.approx(237 / 60)
    assert one["query_stream"] == pytest.approx(four["query_stream"], rel=0.1)   # replicated on every cp rank
    ckpt = estimate_memory(cfg_for("paper.yaml"), 4, (32, 32))
    assert ckpt["activations"] < four["activations"] / 5
    # block inputs: depth x (memory + query tokens) x dim x 2 bytes
    assert ckpt["block_inputs"] == 16 * (60 * 256 + 5 * 4 * 256) * 1024 * 2


# issue #19's training-memory target: a 221-frame memory (56 latents of 1560 tokens: 480x832 video through the Wan
# VAE) trains at the B size within 80 GB per GPU at cp <= 4. The paper's block geometry: 6 blocks of 260 tokens per
# frame, k = 80, ALM window 8, chunks of 4, two target chunks after the 56-latent bank.
PAPER_1560 = ("model.latent_channels=16", "data.clip_frames=64", "data.min_context=56", "data.target_chunks=2",
              "model.attention.block_size=260", "model.attention.top_k=80", "model.attention.window=8")


def test_b_size_trains_a_56_latent_1560_token_memory_in_80gb_by_recomputing():
    """With activation checkpointing (recompute each block in backward) every cp <= 4 fits 80 GiB; without it none
    does: the query stream's gathered top-k K/V (80 blocks x 260 tokens per query block) alone is tens of GiB."""
    on = layout_table(cfg_for("paper.yaml", *PAPER_1560, "train.activation_checkpointing=true"), 8, (60, 104))
    off = layout_table(cfg_for("paper.yaml", *PAPER_1560, "train.activation_checkpointing=false"), 8, (60, 104))
    assert [r["cp"] for r in on] == [1, 2, 4, 8]
    assert all(r["fits"] for r in on if r["cp"] <= 4), on
    assert not any(r["fits"] for r in off), off
    est = estimate_memory(cfg_for("paper.yaml", *PAPER_1560, "train.activation_checkpointing=false"), 8, (60, 104))
    assert est["tokens_per_frame"] == 1560 and est["local_bank_frames"] == 15         # 60 bank frames / cp 4
    assert est["query_stream"] > 3 * est["memory_stream"]

def test_sharded_queries_split_the_query_stream():
    """train.cp_queries=sharded: each of 4 cp ranks holds ceil(5 / 4) = 2 of the 5 target chunks' activations."""
    rep = estimate_memory(cfg_for("paper.yaml", "train.activation_checkpointing=false"), 4, (32, 32))
    sh = estimate_memory(cfg_for("paper.yaml", "train.activation_checkpointing=false", "train.cp_queries=sharded"),
                         4, (32, 32))
    assert rep["target_chunks"] == sh["target_chunks"] == 5 and sh["local_target_chunks"] == 2
    assert sh["query_tokens"] == rep["query_tokens"] * 2 / 5
    assert sh["query_stream"] < rep["query_stream"] * 2 / 5                    # and no fp32 merge buffer
    assert sh["memory_stream"] == rep["memory_stream"] and sh["bank_kv"] == rep["bank_kv"]
    # ship: the holders attend the chunks' queries; the worst case holds every chunk's selected K/V of a slot
    ship = estimate_memory(cfg_for("paper.yaml", "train.activation_checkpointing=false", "train.cp_queries=sharded",
                                   "train.cp_block_read=ship"), 4, (32, 32))
    assert sh["cp_block_read"] == "fetch" and ship["cp_block_read"] == "ship"
    assert sh["query_stream"] < ship["query_stream"] < 4 * sh["query_stream"]
    assert ship["memory_stream"] == sh["memory_stream"] and ship["query_tokens"] == sh["query_tokens"]


def test_dense_attention_costs_more_than_decmem_on_a_long_bank():
    # a fixed number of target chunks: with data.target_chunks=0 (every chunk) the query stream grows with the clip
    over = ("data.clip_frames=202", "data.min_context=100", "data.target_chunks=2")
    dec = estimate_memory(cfg_for("demo.yaml", *over), 1, (32, 32))
    dense = estimate_memory(cfg_for("demo.yaml", *over, "model.attention.strategy=dense"), 1, (32, 32))
    assert dense["memory_stream"] == dec["memory_stream"] and dense["bank_kv"] == dec["bank_kv"]
    assert dense["query_stream"] > 4 * dec["query_stream"]               # 200 frames read vs top_k blocks
    longer = estimate_memory(cfg_for("demo.yaml", "data.clip_frames=402", "data.min_context=100", "data.target_chunks=2",
                                     "model.attention.strategy=dense"), 1, (32, 32))
    dec_longer = estimate_memory(cfg_for("demo.yaml", "data.clip_frames=402", "data.min_context=100",
                                         "data.target_chunks=2"), 1, (32, 32))
    assert longer["query_stream"] > 1.8 * dense["query_stream"]          # grows with the bank
    assert dec_longer["query_stream"] == dec["query_stream"]             # decmem's read does not


def _measure(cfg, hw, chunk_starts, checkpoint_blocks=False):
    """Bytes autograd saves for backward (unique storages, parameters excluded) and bytes the bank holds."""
    torch.manual_seed(0)
    model = VideoDiT(cfg.model)
    if checkpoint_blocks:   # as the trainer does: recompute each block (both streams) in backward
        from torch.utils.checkpoint import checkpoint
        for block in model.blocks:
            for name in ("forward", "encode_memory"):
                setattr(block, name, functools.partial(checkpoint, getattr(block, name), use_reentrant=False))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    B, T = cfg.data.batch_size, cfg.data.clip_frames
    lat = torch.randn(B, T, cfg.model.latent_channels, *hw)
    K = torch.tensor([[hw[1] * 0.8, 0, hw[1] / 2], [0, hw[0] * 0.8, hw[0] / 2], [0, 0, 1]]).expand(B, T, 3, 3)
    c2w = torch.eye(4).expand(B, T, 4, 4).clone()
    c2w[..., 0, 3] = torch.linspace(0, 1, T)
    saved, bank = {}, {}
    encode = model.encode_memory

    def encode_and_record(*a, **k):
        out = encode(*a, **k)
        for i in range(len(out)):
            layer = out.layer(i)
            for t in (layer.k, layer.v, layer.k_pool, layer.v_pool):
                bank[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out

    def pack(t):
        if isinstance(t, FakeTensor):                  # FlexAttention traces its score_mod: no memory
            return t
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    model.encode_memory = encode_and_record
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = rectified_flow_loss(model, lat, K, c2w, chunk_starts, DiffusionArgs())
    loss.backward()
    assert bank and model.x_embedder.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    return sum(n for p, n in saved.items() if p not in bank), sum(bank.values())


@pytest.mark.parametrize("config,over,hw", [
    ("debug.yaml", (), (16, 16)),
    ("demo.yaml", (), (16, 16)),                 # demo model, 16x16 frames (8x8 tokens, 4 blocks) to stay quick
    ("demo.yaml", ("model.attention.strategy=dense",), (16, 16)),
    # FlexAttention reads the selected blocks in place (the gather path would copy 32 blocks per query block)
    ("demo.yaml", ("model.attention.sparse_backend=flex", "model.attention.top_k=32"), (16, 16)),
], ids=["debug", "demo", "demo-dense", "demo-flex"])
def test_activation_estimate_matches_what_autograd_saves(config, over, hw):
    """One forward + backward with a 16-frame bank and two target chunks, in process, on CPU."""
    C = cfg_for(config).model.chunk_frames
    starts = [16 - C, 16]                              # the last chunk reads the whole 16-frame bank
    cfg = cfg_for(config, *over, f"data.clip_frames={16 + C}", f"data.min_context={16 - C}", "data.target_chunks=2")
    saved, bank = _measure(cfg, hw, starts)
    est = estimate_memory(cfg, 1, hw)
    assert est["local_bank_frames"] == 16 and est["target_chunks"] == 2 and est["precision"] == "fp32"
    ratio = est["activations"] / saved
    # the brief asks for a factor of 2; the formulas follow this code base closely, so hold them to 25 %
    assert 0.8 < ratio < 1.25, (format_bytes(est["activations"]), format_bytes(saved))
    assert est["bank_kv"] == pytest.approx(bank, rel=0.05)
    assert 0.5 < (est["activations"] + est["bank_kv"]) / (saved + bank) < 2


def test_checkpointed_estimate_matches_what_autograd_keeps():
    """With activation checkpointing only block inputs (and the final layer's) outlive the forward."""
    cfg = cfg_for("demo.yaml", "data.clip_frames=18", "data.min_context=14", "data.target_chunks=2",
                  "train.activation_checkpointing=true", "train.zero_stage=2")
    saved, bank = _measure(cfg, (16, 16), [14, 16], checkpoint_blocks=True)
    est = estimate_memory(cfg, 1, (16, 16))
    assert 0.8 < (est["block_inputs"] + est["head"]) / saved < 1.25
    assert est["bank_kv"] == pytest.approx(bank, rel=0.05)
    full = estimate_memory(cfg_for("demo.yaml", "data.clip_frames=18", "data.min_context=14"), 1, (16, 16))
    assert est["activations"] < full["activations"] / 2


# ------------------------------------------------------------------------------------
# Errors that name the key
# ------------------------------------------------------------------------------------

def test_check_data_errors_name_the_key(datasets, tmp_path):
    with pytest.raises(ValueError, match=r"model\.latent_channels=3.*4-channel"):
        check_data(cfg_for("demo.yaml", data=datasets["sd32"]))
    with pytest.raises(ValueError, match=r"^data\.data: no dataset given"):
        check_data(cfg_for("demo.yaml", data=""))
    with pytest.raises(ValueError, match=r"^data\.data: .*nowhere"):
        check_data(cfg_for("demo.yaml", data=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"data\.clip_frames=40: .*has 30 frames"):
        check_data(cfg_for("demo.yaml", "data.clip_frames=40", data=datasets["rgb32"]))
    with pytest.raises(ValueError, match=r"model\.patch_size=3 does not divide the 32x32"):
        check_data(cfg_for("demo.yaml", "model.patch_size=3", data=datasets["rgb32"]))
    with pytest.raises(ValueError, match=r"model\.attention\.block_size=7"):
        check_data(cfg_for("demo.yaml", "model.attention.block_size=7", data=datasets["rgb32"]))
    ok = check_data(cfg_for("demo.yaml", data=datasets["rgb32"]))
    assert ok["first_shard"].endswith("shard-000000.tar") and ok["shards"] == 8
    two = check_data(cfg_for("demo.yaml", data=f"{datasets['rgb32']}::{datasets['rgb32']}"))   # '::' joins datasets
    assert two["shards"] == 16 and two["frame_hw"] == ok["frame_hw"]
    with pytest.raises(ValueError, match=r"data\.data: the '::' sources hold different latent frames: .*\[3, 32, 32\]"
                                         r".*\[3, 16, 16\]"):
        check_data(cfg_for("demo.yaml", "data.clip_frames=24", data=f"{datasets['rgb32']}::{datasets['rgb16']}"))


def test_too_few_shards_for_the_data_parallel_ranks(datasets):
    with pytest.raises(ValueError, match=r"data\.data: 2 shards cannot feed dp=4"):
        run_dry_run(cfg_for("paper.yaml", data=datasets["sd32"]), 16, log=lambda s: None)


def test_validate_errors_name_the_key():
    with pytest.raises(ValueError, match=r"train\.cp=3 does not divide the world of 8"):
        validate(cfg_for("debug.yaml", "train.cp=3"), 8)
    with pytest.raises(ValueError, match=r"data\.min_context=1: .*train\.cp=2"):
        validate(cfg_for("debug.yaml", "train.cp=2", "data.min_context=1"), 2)
    with pytest.raises(ValueError, match=r"data\.clip_frames=6: expected >= .* = 8"):
        validate(cfg_for("debug.yaml", "data.clip_frames=6", "data.min_context=4", "model.chunk_frames=4"), 1)
    with pytest.raises(ValueError, match=r"log\.rollout_frames=24: expected < data\.clip_frames=24"):
        validate(cfg_for("demo.yaml", "log.rollout_frames=24"), 1)
    assert validate(cfg_for("paper.yaml"), 8) == []
    warn = validate(cfg_for("demo.yaml", "data.target_chunks=30"), 1)
    assert any("data.target_chunks=30" in w for w in warn)
    # layout errors come first, before any data is opened
    with pytest.raises(ValueError, match=r"train\.cp"):
        run_dry_run(cfg_for("paper.yaml", data=""), 6, log=lambda s: None)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3 GiB"
    assert format_bytes(1.25 * 2**20) == "1.25 MiB"
    assert format_bytes(250 * 2**30) == "250 GiB"
