"""``decmem bench generate``: seconds per generated latent and peak memory vs bank size, per strategy.

Each (strategy, bank size) point runs in a fresh spawned process, one after
another in the same run: the peak RSS of that process is then the point's own
peak, not the largest of all points so far. The bank is built by the real
memory stream from random latents; only chunk generation (Euler sampling +
encoding the chunk into the bank) is timed.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import statistics
import time

import torch

from decmem.bench.common import add_ratio, current_rss_mb, orbit_cameras, peak_rss_mb, reset_peak_rss, write_rows
from decmem.model.camera import relative_poses
from decmem.model.diffusion import DiffusionArgs
from decmem.model.factory import build_model
from decmem.model.rollout import rollout
from decmem.training.config import config_from_dict, to_dict
from decmem.training.run_config import RunConfig


def _point(cfg_dict: dict, strategy: str, bank_frames: int) -> dict:
    """Runs in a child process: build, fill the bank, time chunks."""
    cfg = config_from_dict(RunConfig, cfg_dict)
    b = cfg.bench_generate
    if b.threads:
        torch.set_num_threads(b.threads)
    torch.manual_seed(cfg.seed)
    args = dataclasses.replace(cfg.model, attention=dataclasses.replace(cfg.model.attention, strategy=strategy))
    dev, dtype = torch.device(b.device), getattr(torch, b.dtype)
    model = build_model(args).eval().to(dev, dtype)
    h, w = b.latent_h, b.latent_w
    C = args.chunk_frames
    n_new = C * (b.warmup_chunks + b.chunks)
    K, c2w = orbit_cameras(bank_frames + n_new, (h, w))
    c2w = relative_poses(c2w)
    K, c2w = K.to(dev, dtype), c2w.to(dev, dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    init = torch.randn(1, bank_frames, args.latent_channels, h, w, generator=g).to(dev, dtype)
    with torch.no_grad():
        bank = model.encode_memory(init, K[:, :bank_frames], c2w[:, :bank_frames])
    rss_before = current_rss_mb()
    reset_peak_rss()                                 # the peak column: this strategy's timed rollout, not the bank fill
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    diff = DiffusionArgs(sample_steps=b.sample_steps)
    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    res = rollout(model, diff, init, K, c2w, n_new, generator=g, bank=bank)
    per_chunk = [s / n for s, n in zip(res.chunk_seconds, res.chunk_frames)][b.warmup_chunks:]
    return {
        "strategy": strategy, "bank_frames": bank_frames, "tokens_per_frame": model.layout(h, w).tokens,
        "bank_tokens": bank_frames * model.layout(h, w).tokens,
        "attended_tokens": res.attended_tokens[-1], "sec_per_latent": statistics.median(per_chunk),
        "sec_per_latent_min": min(per_chunk), "chunks_timed": len(per_chunk),
        "peak_rss_mb": peak_rss_mb(), "rss_before_generation_mb": rss_before,
        "model_size": args.size, "dim": args.dim, "depth": args.depth, "chunk_frames": C,
        "sample_steps": b.sample_steps, "latent_hw": [h, w], "threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": str(dev), "dtype": b.dtype,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }


def run_generate_bench(cfg, strategies, bank_frames, json_path=None, log=print):
    ctx = mp.get_context("spawn")
    rows = []
    for T in bank_frames:
        for s in strategies:
            t0 = time.perf_counter()
            with ctx.Pool(1) as pool:
                row = pool.apply(_point, (to_dict(cfg), s, T))
            rows.append(row)
            log(f"{s:>8}  bank {T:>4} latents  {row['sec_per_latent'] * 1e3:9.1f} ms/latent  "
                f"peak {row['peak_rss_mb']:7.0f} MB  ({time.perf_counter() - t0:.0f} s)")
    add_ratio(rows, "sec_per_latent", "vs_decmem", "decmem", over_baseline=True)
    write_rows(json_path, rows)
    return rows


def format_table(rows) -> str:
    lines = ["| strategy | bank latents | bank tokens | attended tokens | s / latent | peak RSS MB | this / decmem |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['bank_frames']} | {r['bank_tokens']} | {r['attended_tokens']} | "
                     f"{r['sec_per_latent']:.3f} | {r['peak_rss_mb']:.0f} | {r.get('vs_decmem', float('nan')):.2f}x |")
    return "\n".join(lines)
