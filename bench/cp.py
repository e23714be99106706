"""``decmem bench cp``: bytes moved per layer by context parallelism vs an all-gather of the bank's K/V,
per-rank bank memory, and load imbalance of the selected blocks. Real processes (gloo); counts, not timings.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from decmem.bench.common import gather_to_json, orbit_cameras
from decmem.model.factory import build_model
from decmem.training.config import config_from_dict, to_dict
from decmem.training.context_parallel import CPMemory, Layout, build_groups
from decmem.training.distributed import free_port, init_loopback_group
from decmem.training.run_config import RunConfig


def _worker(rank, world, port, cfg_dict, T, out_path):
    init_loopback_group(rank, world, port)
    try:
        cfg = config_from_dict(RunConfig, cfg_dict)
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        b = cfg.bench_generate
        C, h, w = cfg.model.chunk_frames, b.latent_h, b.latent_w
        layout = Layout.make(world, world, rank)
        cp_group, _ = build_groups(layout)
        ctx = CPMemory(cp_group, layout.cp_rank, layout.cp)
        g = torch.Generator().manual_seed(0)
        lat = torch.randn(1, T + C, cfg.model.latent_channels, h, w, generator=g)
        K, c2w = orbit_cameras(T + C, (h, w))
        with torch.no_grad():
            lo, hi = ctx.shard(T)
            bank = model.encode_memory(lat[:, lo:hi], K[:, lo:hi], c2w[:, lo:hi], lo, ctx=ctx)
            memory_bytes = dict(ctx.bytes)
            ctx.reset_bytes()
            _, stats = model(lat[:, T:], torch.full((1,), 0.5), K[:, T:], c2w[:, T:], T, bank, ctx=ctx)
        bank_bytes = sum(t.numel() * t.element_size() for i in range(len(bank)) for t in
                         (bank.layer(i).k, bank.layer(i).v, bank.layer(i).k_pool, bank.layer(i).v_pool))
        n_b = bank.layer(0).blocks_per_frame
        owned = 0
        for s in stats["layers"]:
            if "selected" in s:
                sel = s["selected"][s["selected_valid"]]
                owned += int(((sel >= lo * n_b) & (sel < hi * n_b)).sum())
        Nf, d, H = bank.layer(0).frame_tokens, model.args.dim // model.args.n_heads, model.args.n_heads
        kv_layer = 2 * T * Nf * H * d * 4                                  # the whole bank's K + V, one layer, fp32
        row = {"rank": rank, "frames": hi - lo, "bank_bytes": bank_bytes, "owned_selected": owned,
               "query_bytes": dict(ctx.bytes), "memory_bytes": memory_bytes,
               "kv_allgather_bytes_per_layer": int(2 * kv_layer * (world - 1) / world)}
        gather_to_json(row, world, rank, out_path)
    finally:
        dist.destroy_process_group()


def run_cp_bench(cfg, cps, bank_frames, json_path=None, log=print):
    results = []
    depth = cfg.model.depth
    base_mem = {}
    for T in bank_frames:
        for cp in cps:
            if cp == 1:      # one process: nothing moves; its bank is the baseline of the memory ratio
                rows = [{"rank": 0, "frames": T, "bank_bytes": _single_bank_bytes(cfg, T), "owned_selected": 1,
                         "query_bytes": {}, "memory_bytes": {}, "kv_allgather_bytes_per_layer": 0}]
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "rows.json")
                    mp.spawn(_worker, args=(cp, free_port(), to_dict(cfg), T, out), nprocs=cp, join=True)
                    with open(out) as f:
                        rows = json.load(f)
            q_bytes = max(sum(r["query_bytes"].values()) for r in rows) / depth
            m_bytes = max(sum(r["memory_bytes"].values()) for r in rows) / depth
            kv = rows[0]["kv_allgather_bytes_per_layer"]
            owned = [r["owned_selected"] for r in rows]
            peak_bank = max(r["bank_bytes"] for r in rows)
            if cp == 1:
                base_mem[T] = peak_bank
            res = {"cp": cp, "bank_frames": T, "query_bytes_per_layer": q_bytes, "memory_halo_bytes_per_layer": m_bytes,
                   "kv_allgather_bytes_per_layer": kv, "fraction_of_kv": (q_bytes / kv) if kv else 0.0,
                   "per_rank_bank_mb": peak_bank / 2**20, "bank_vs_cp1": peak_bank / base_mem.get(T, peak_bank),
                   "imbalance_max_over_mean": (max(owned) / (sum(owned) / len(owned))) if sum(owned) else 1.0,
                   "by_collective": {k: max(r["query_bytes"].get(k, 0) for r in rows) / depth
                                     for k in rows[0]["query_bytes"]}}
            results.append(res)
            log(f"cp={cp} bank {T:>4}: {q_bytes / 1024:9.1f} KiB/layer moved by the query read "
                f"({100 * res['fraction_of_kv']:.2f}% of a K/V all-gather, {kv / 2**20:.1f} MiB), "
                f"bank {res['per_rank_bank_mb']:.1f} MiB/rank (x{res['bank_vs_cp1']:.3f} of cp=1), "
                f"imbalance {res['imbalance_max_over_mean']:.2f}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _single_bank_bytes(cfg, T):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    b = cfg.bench_generate
    K, c2w = orbit_cameras(T, (b.latent_h, b.latent_w))
    with torch.no_grad():
        bank = model.encode_memory(torch.randn(1, T, cfg.model.latent_channels, b.latent_h, b.latent_w), K, c2w)
    return sum(t.numel() * t.element_size() for i in range(len(bank)) for t in
               (bank.layer(i).k, bank.layer(i).v, bank.layer(i).k_pool, bank.layer(i).v_pool))
