"""``decmem bench attention``: one attention layer per strategy and bank size, timed side by side.

Every strategy reads the same synthetic bank with the same queries in the same
process, so ratios between rows are meaningful; absolute times depend on the
machine (recorded in the output).

``sparse_backends`` times the selected-block read of decmem and fov_frames once per backend (model/block_sparse.py);
rows of a backend other than gather are labelled ``strategy[backend]``. On CPU the flex backend runs FlexAttention's
reference implementation (every bank key's score materialised), not a fused kernel: its CPU times say nothing
about the GPU kernel.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from decmem.bench.common import add_ratio, orbit_cameras, sync, write_rows
from decmem.model.attention import DecMemAttention
from decmem.model.blocks import BlockLayout, pool_blocks
from decmem.model.kernels import resolve_backend
from decmem.model.memory import BankLayer
from decmem.model.retrieval import select_fov_frames

SPARSE_READS = ("decmem", "fov_frames")     # strategies whose memory read is the selected-block path


def run_attention_bench(cfg, strategies, bank_frames, json_path=None, log=print, sparse_backends=None):
    """Time every (strategy, sparse backend, bank size); returns the list of result rows."""
    b, a = cfg.bench, cfg.model.attention
    sparse_backends = list(sparse_backends or [a.sparse_backend])
    if b.threads:
        torch.set_num_threads(b.threads)
    dtype = getattr(torch, b.dtype)
    dev = torch.device(b.device)
    layout = BlockLayout(b.frame_h, b.frame_w, a.block_size)  # validates the tiling up front
    Nf, H, d = layout.tokens, b.n_heads, b.dim // b.n_heads
    C, Bt = b.chunk_frames, b.batch
    rows = []
    for T in bank_frames:
        g = torch.Generator().manual_seed(cfg.seed + T)
        kb = torch.randn(Bt, H, T, Nf, d, generator=g).to(dev, dtype)
        vb = torch.randn(Bt, H, T, Nf, d, generator=g).to(dev, dtype)
        bank = BankLayer(kb, vb, pool_blocks(kb, a.block_size).view(Bt, H, T, -1, d),
                         pool_blocks(vb, a.block_size).view(Bt, H, T, -1, d))
        x = torch.randn(Bt, C * Nf, b.dim, generator=g).to(dev, dtype)
        Kc, c2w = orbit_cameras(T + C, (b.frame_h * 8, b.frame_w * 8))
        runs = [(s, sb) for s in strategies for sb in (sparse_backends if s in SPARSE_READS else [a.sparse_backend])]
        for strategy, sparse_backend in runs:
            torch.manual_seed(cfg.seed)
            layer = DecMemAttention(b.dim, H, dataclasses.replace(a, strategy=strategy, sparse_backend=sparse_backend)
                                    ).to(dev, dtype)
            label = strategy if sparse_backend == "gather" or strategy not in SPARSE_READS else f"{strategy}[{sparse_backend}]"

            def step():
                fov = None
                if strategy == "fov_frames":
                    fov = select_fov_frames(Kc[:, :T], c2w[:, :T], Kc[:, T:], c2w[:, T:], (b.frame_h * 8, b.frame_w * 8),
                                            a.fov_frames, max(0, T - (a.window - 1)), T, a.fov_age_penalty)
                out, stats = layer(x, bank, T, Nf, fov_frames=fov)
                if b.backward:
                    out.sum().backward()
                return stats

            times = []
            with torch.set_grad_enabled(b.backward):
                for i in range(b.warmup + b.repeats):
                    sync(dev)
                    t0 = time.perf_counter()
                    stats = step()
                    sync(dev)
                    if i >= b.warmup:
                        times.append((time.perf_counter() - t0) * 1e3)
            rows.append({
                "strategy": label, "sparse_backend": sparse_backend, "bank_frames": T, "tokens_per_frame": Nf, "bank_tokens": T * Nf,
                "query_tokens": C * Nf, "attended_tokens": int(stats["attended_tokens"]),
                "median_ms": statistics.median(times), "min_ms": min(times), "repeats": b.repeats,
                "block_size": a.block_size, "top_k": a.top_k, "window": a.window, "heads": H, "head_dim": d,
                "dtype": b.dtype, "device": str(dev), "backend": resolve_backend(a.backend, x),
                "backward": b.backward, "threads": torch.get_num_threads(),
            })
            log(_row_line(rows[-1]))
    add_ratio(rows, "median_ms", "speedup_vs_dense", "dense", over_baseline=False)
    write_rows(json_path, rows)
    return rows


def format_table(rows) -> str:
    """Markdown table of the rows, with the cost relative to dense at the same bank size."""
    head = "| strategy | bank frames | bank tokens | attended tokens | median ms | dense / this |\n|---|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        ratio = f"{r['speedup_vs_dense']:.1f}x" if r.get("speedup_vs_dense") else "-"
        lines.append(f"| {r['strategy']} | {r['bank_frames']} | {r['bank_tokens']} | {r['attended_tokens']} | "
                     f"{r['median_ms']:.2f} | {ratio} |")
    return "\n".join(lines)


def _row_line(r):
    return (f"{r['strategy']:>12}  bank {r['bank_frames']:>4} frames  attended {r['attended_tokens']:>7}  "
            f"median {r['median_ms']:8.2f} ms")
