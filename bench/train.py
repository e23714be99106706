"""``decmem bench train``: training tokens/s and step memory vs bank length, and the longest bank each strategy fits.

One point is (strategy, bank length L frames). It runs in a fresh spawned
process, so its memory figures are its own: the configured model with
``model.attention.strategy`` overridden, torch AdamW (``training.optim``), and a
synthetic clip of L + C latent frames (random latents with a fixed seed, a
camera orbiting a point). One target chunk starts at frame L, so the memory
stream encodes an L-frame bank (with gradients, as in training) and the chunk
reads it. After warm-up steps, full training steps are timed: forward
``rectified_flow_loss``, backward, gradient clipping (``optim.grad_clip``) and
``optimizer.step``.

Memory: the peak resident set (``VmHWM``) is reset right before the first step
and read after the last, and the RSS measured just before the first step is
subtracted: the difference is the step's own working set ("step MB"), which the
memory budget is compared with. Timed points also run one untimed step under
``LiveTensorPeak`` (the peak of live tensor bytes, whatever the allocator keeps)
and carry ``decmem train --dry-run``'s estimate of the same step, so the
estimate is checked against both. ``ru_maxrss`` is not used because a spawned
child inherits its parent's peak through ``exec`` on Linux (measured: an 800 MB
parent gives an 800 MB ``ru_maxrss`` to a 15 MB child).

Memory-fit search, per strategy: from the smallest requested bank, double L
while the step working set stays under the budget, then bisect between the
last fit and the first miss to within ``tol`` (10 %). A point that exceeds the
budget is stopped by a watchdog inside the child as soon as its RSS goes over;
one killed by the OS or over the time limit also counts as "doesn't fit". The
search stops at ``cap`` frames and then reports "> cap".
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time

import torch

from decmem.bench.common import (
    LiveTensorPeak,
    add_ratio,
    current_rss_mb,
    orbit_cameras,
    peak_rss_mb,
    reset_peak_rss,
    write_json,
    write_rows,
)
from decmem.model.camera import relative_poses
from decmem.model.diffusion import rectified_flow_loss
from decmem.model.factory import build_model
from decmem.training.config import dump_config
from decmem.training.dry_run import estimate_memory
from decmem.training.engine import apply_activation_checkpointing
from decmem.training.optim import build_optimizer

OVER_BUDGET_EXIT = 3          # child exit code: the watchdog saw the step's working set exceed the budget


#################################################################################
#                              Memory measurement                               #
#################################################################################

class _Watchdog:
    """Polls the RSS; once it exceeds base + budget, writes a partial result and exits the process."""

    def __init__(self, base_mb: float, budget_mb: float, out_path: str, row: dict, period_s: float = 0.02):
        self.base, self.budget, self.out_path, self.row, self.period = base_mb, budget_mb, out_path, row, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.period):
            used = current_rss_mb() - self.base
            if used > self.budget:
                row = dict(self.row, status="over_budget", step_rss_mb=max(used, peak_rss_mb() - self.base),
                           peak_rss_mb=peak_rss_mb())
                write_json(self.out_path, row)
                os._exit(OVER_BUDGET_EXIT)


#################################################################################
#                               One point (child)                               #
#################################################################################

def estimate_step(cfg, strategy: str, bank_frames: int, batch: int) -> dict:
    """``decmem train --dry-run``'s estimate of this point's step working set, MiB: what a step adds to the RSS
    measured before it (gradients, AdamW's m and v, the bank's K/V, saved activations, one block's backward
    workspace) for the same model, bank, chunk and batch on one process in fp32 (the bench's plain torch step)."""
    C = cfg.model.chunk_frames
    est_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention=dataclasses.replace(cfg.model.attention, strategy=strategy)),
        data=dataclasses.replace(cfg.data, clip_frames=bank_frames + C, min_context=bank_frames, target_chunks=1,
                                 batch_size=batch),
        train=dataclasses.replace(cfg.train, cp=1, zero_stage=0, precision="fp32", device="cpu", ema=0.0))
    est = estimate_memory(est_cfg, 1, (cfg.bench_generate.latent_h, cfg.bench_generate.latent_w))
    parts = ("grads", "optimizer", "bank_kv", "activations", "workspace")
    return {"est_step_mb": sum(est[k] for k in parts) / 2**20, **{f"est_{k}_mb": est[k] / 2**20 for k in parts}}


def _point(cfg, strategy: str, bank_frames: int, opts: dict, out_path: str) -> None:
    """Runs in a fresh process: build, warm up, time full training steps, write the row to out_path."""
    bg = cfg.bench_generate
    threads = opts.get("threads") or bg.threads or getattr(getattr(cfg, "train", None), "threads", 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    args = dataclasses.replace(cfg.model, attention=dataclasses.replace(cfg.model.attention, strategy=strategy))
    model = build_model(args).train()
    if cfg.train.activation_checkpointing:        # the trainer's own wrapping (what train.activation_checkpointing does)

        apply_activation_checkpointing(model)
    opt = build_optimizer(model, cfg.optim)
    h, w = bg.latent_h, bg.latent_w
    C, L, batch = args.chunk_frames, bank_frames, opts["batch"]
    Nf = model.layout(h, w).tokens
    K, c2w = orbit_cameras(L + C, (h, w))
    c2w = relative_poses(c2w)
    g = torch.Generator().manual_seed(cfg.seed)
    latents = torch.randn(batch, L + C, args.latent_channels, h, w, generator=g)
    K, c2w = K.expand(batch, -1, -1, -1).contiguous(), c2w.expand(batch, -1, -1, -1).contiguous()
    params = [p for p in model.parameters() if p.requires_grad]
    row = {"strategy": strategy, "bank_frames": L, "chunk_frames": C, "tokens_per_frame": Nf, "batch": batch,
           "bank_tokens": L * Nf, "clip_tokens": (L + C) * Nf * batch,
           "activation_checkpointing": bool(cfg.train.activation_checkpointing)}

    def step():
        opt.zero_grad(set_to_none=True)
        loss, stats = rectified_flow_loss(model, latents, K, c2w, [L], cfg.diffusion, generator=g)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        return loss, stats

    rss_before = current_rss_mb()
    reset_peak_rss()
    budget = opts.get("budget_mb")
    times, stats, loss = [], {}, None
    watchdog = _Watchdog(rss_before, budget, out_path, dict(row, rss_before_mb=rss_before)) if budget else None
    if watchdog:
        watchdog.__enter__()
    try:
        for i in range(opts["warmup"] + opts["steps"]):
            t0 = time.perf_counter()
            loss, stats = step()
            if i >= opts["warmup"]:
                times.append(time.perf_counter() - t0)
    finally:
        if watchdog:
            watchdog.__exit__()
    peak = peak_rss_mb()
    if not budget:                               # timed points: one more, untimed step for the live tensors' peak
        with LiveTensorPeak() as live:
            step()
    step_s = statistics.median(times)
    row.update({
        "status": "ok" if not budget or peak - rss_before <= budget else "over_budget",
        "step_s": step_s, "step_s_min": min(times), "steps_timed": len(times),
        "warmup_steps": opts["warmup"], "tokens_per_s": row["clip_tokens"] / step_s, "samples_per_s": batch / step_s,
        "bank_tokens": int(stats.get("bank_tokens", L * Nf)),
        "attended_tokens": int(stats["attended_tokens"]) if "attended_tokens" in stats else None,
        "peak_rss_mb": peak, "rss_before_mb": rss_before, "step_rss_mb": peak - rss_before,
        "loss": float(loss.detach()), "model_size": args.size, "dim": args.dim, "depth": args.depth,
        "n_heads": args.n_heads, "params": sum(p.numel() for p in params), "latent_hw": [h, w],
        "block_size": args.attention.block_size, "top_k": args.attention.top_k, "window": args.attention.window,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        **estimate_step(cfg, strategy, L, batch),
    })
    row["measured_vs_estimate"] = row["step_rss_mb"] / row["est_step_mb"]
    if not budget:
        row["live_peak_mb"] = live.peak_mb
        row["live_vs_estimate"] = live.peak_mb / row["est_step_mb"]
    write_json(out_path, row)


def run_point(cfg, strategy: str, bank_frames: int, steps: int = 3, warmup: int = 1, batch: int = 1,
              budget_mb: float | None = None, timeout_s: float = 600.0, threads: int = 0) -> dict:
    """One (strategy, bank) point in a fresh spawned process -> its row.

    status: ok | over_budget (stopped by the watchdog, or ran over the budget) | killed (a signal, e.g.
    the OOM killer) | timeout | error. A row other than ok carries what was known when it stopped.
    """
    ctx = mp.get_context("spawn")
    opts = {"steps": steps, "warmup": warmup, "batch": batch, "budget_mb": budget_mb, "threads": threads}
    fd, out_path = tempfile.mkstemp(prefix="decmem-bench-train-", suffix=".json")
    os.close(fd)
    os.unlink(out_path)
    t0 = time.perf_counter()
    p = ctx.Process(target=_point, args=(cfg, strategy, bank_frames, opts, out_path), daemon=True)
    p.start()
    p.join(timeout_s)
    status = None
    if p.is_alive():
        p.kill()
        p.join()
        status = "timeout"
    try:
        with open(out_path) as f:
            row = json.load(f)
        os.unlink(out_path)
    except (OSError, ValueError):
        row = {"strategy": strategy, "bank_frames": bank_frames}
    if status is None and row.get("status") not in ("ok", "over_budget"):
        code = p.exitcode
        status = "over_budget" if code == OVER_BUDGET_EXIT else "killed" if code is not None and code < 0 else "error"
        row["exitcode"] = code
    if status is not None:
        row["status"] = status
    row["wall_s"] = time.perf_counter() - t0
    return row


#################################################################################
#                              Memory-fit search                                #
#################################################################################

def fit_search(fits, start: int, cap: int, tol: float = 0.1) -> dict:
    """Longest L in [start, cap] with fits(L) true, assuming fits is monotone (true up to some L, false after).

    Doubles from ``start`` to the first miss, then bisects until the gap is within
    ``tol`` of the last fit. Returns {"longest": L or None (nothing fits, not even
    start), "first_miss": L or None, "capped": true when cap itself fits, "tried": [(L, fits)]}.
    """
    if start < 1 or cap < start:
        raise ValueError(f"fit search needs 1 <= start <= cap, got start={start}, cap={cap}")
    tried = []

    def check(L):
        ok = bool(fits(L))
        tried.append((L, ok))
        return ok

    lo = hi = None
    L = start
    while True:
        if check(L):
            lo = L
            if L >= cap:
                break
            L = min(2 * L, cap)
        else:
            hi = L
            break
    if lo is not None and hi is not None:
        while hi - lo > max(1, math.floor(tol * lo)):
            mid = (lo + hi) // 2
            if check(mid):
                lo = mid
            else:
                hi = mid
    return {"longest": lo, "first_miss": hi, "capped": lo is not None and hi is None, "tried": tried}


#################################################################################
#                                   The bench                                   #
#################################################################################

def run_train_bench(cfg, strategies, bank_frames, json_path=None, log=print, memory_budget_gb: float = 2.0,
                    search: bool = True, steps: int = 3, warmup: int = 1, batch: int = 1, cap: int = 4096,
                    tol: float = 0.1, search_start: int | None = None, search_steps: int = 1,
                    search_warmup: int = 1, timeout_s: float = 600.0, threads: int = 0) -> list[dict]:
    """Timed points for every (bank, strategy), then (search=True) the longest bank each strategy fits.

    Returns rows: kind "point" (the requested banks, ``steps`` timed steps), kind "search" (extra points
    the fit search ran, ``search_steps`` timed steps, stopped as soon as they exceed the budget) and
    kind "fit" (one per strategy: longest bank under the budget); the points come first, then each
    strategy's search points followed by its fit row.
    """
    if not bank_frames or min(bank_frames) < 0:
        raise ValueError(f"bank_frames: expected non-negative frame counts, got {bank_frames!r}")
    if steps < 1 or warmup < 0 or search_steps < 1 or search_warmup < 0 or batch < 1:
        raise ValueError("steps, search_steps and batch: expected >= 1; warmup, search_warmup: expected >= 0")
    if memory_budget_gb <= 0 or cap < 1 or not 0 < tol < 1:
        raise ValueError("memory_budget_gb: expected > 0, cap: expected >= 1, tol: expected in (0, 1)")
    budget_mb = memory_budget_gb * 1024.0
    measured: dict[tuple[str, int], dict] = {}
    rows: list[dict] = []
    for L in bank_frames:
        for s in strategies:
            row = run_point(cfg, s, L, steps, warmup, batch, None, timeout_s, threads)
            row["kind"] = "point"
            rows.append(row)
            measured[(s, L)] = row
            log(_point_line(row))
    add_ratio(rows, "tokens_per_s", "vs_dense", "dense", over_baseline=True,
              keep=lambda r: r.get("kind") == "point" and r.get("status") == "ok")

    if search:
        start = search_start or max(1, min([L for L in bank_frames if L > 0], default=16))
        for s in strategies:
            def fits(L, s=s):
                if (s, L) not in measured:
                    row = run_point(cfg, s, L, search_steps, search_warmup, batch, budget_mb, timeout_s, threads)
                    row["kind"] = "search"
                    rows.append(row)
                    measured[(s, L)] = row
                    log(_point_line(row, budget_mb))
                return _fits(measured[(s, L)], budget_mb)

            res = fit_search(fits, start, max(start, cap), tol)
            fit = {"kind": "fit", "strategy": s, "memory_budget_gb": memory_budget_gb,
                   "longest_fit_frames": res["longest"], "first_miss_frames": res["first_miss"],
                   "capped": res["capped"], "cap_frames": cap, "search_start": start, "tol": tol,
                   "tried": res["tried"], "miss_reason": None}
            if res["first_miss"]:
                miss = measured[(s, res["first_miss"])]
                fit["miss_reason"] = "over_budget" if miss.get("status") == "ok" else miss.get("status")
                fit["step_rss_mb_at_miss"] = miss.get("step_rss_mb")
            if res["longest"]:
                fit["step_rss_mb_at_longest"] = measured[(s, res["longest"])].get("step_rss_mb")
            rows.append(fit)
            log(_fit_line(fit))
        summary = fit_summary(rows)
        if summary:
            log(summary)


    write_rows(json_path, rows)
    return rows


def _fits(row: dict, budget_mb: float) -> bool:
    """A point fits when it ran to the end and its step working set stayed within the budget."""
    return row.get("status") == "ok" and row["step_rss_mb"] <= budget_mb


def _longest_str(fit) -> str:
    if fit["longest_fit_frames"] is None:
        return f"none (< {fit['search_start']})"
    return f"> {fit['cap_frames']}" if fit["capped"] else str(fit["longest_fit_frames"])


def fit_summary(rows, sparse: str = "decmem", dense: str = "dense") -> str:
    """One line: the longest bank of sparse vs dense under the budget and their ratio (a lower bound if capped)."""
    fits = {r["strategy"]: r for r in rows if r.get("kind") == "fit"}
    if sparse not in fits or dense not in fits:
        return ""
    a, b = fits[sparse], fits[dense]
    la, lb = a["longest_fit_frames"], b["longest_fit_frames"]
    head = (f"longest bank under {a['memory_budget_gb']:g} GiB of step memory: {sparse} {_longest_str(a)}, "
            f"{dense} {_longest_str(b)} frames")
    if la is None:
        return head + f"; {sparse} fits nothing"
    if lb is None:
        return head + f"; {dense} fits nothing, {sparse}/{dense} unbounded"
    ratio = la / lb
    bound = ">= " if a["capped"] else ""
    note = "; dense also capped, raise the cap" if b["capped"] else ""
    return head + f" -> {sparse}/{dense} = {bound}{ratio:.2f}x{note}"


def fit_ratio(rows, sparse: str = "decmem", dense: str = "dense") -> float | None:
    fits = {r["strategy"]: r for r in rows if r.get("kind") == "fit"}
    try:
        la, lb = fits[sparse]["longest_fit_frames"], fits[dense]["longest_fit_frames"]
    except KeyError:
        return None
    if la is None:
        return 0.0
    return math.inf if lb is None else la / lb


def _est(r: dict) -> str:
    """Live tensors' peak, the dry run's step estimate and their ratio: three table cells ("-" where not measured)."""
    live = f"{r['live_peak_mb']:.0f}" if r.get("live_peak_mb") is not None else "-"
    est = f"{r['est_step_mb']:.0f}" if r.get("est_step_mb") is not None else "-"
    ratio = f"{r['live_vs_estimate']:.2f}" if r.get("live_vs_estimate") is not None else "-"
    return f"{live} | {est} | {ratio}"


def format_table(rows) -> str:
    """Markdown: the timed points (and search points), then the longest bank per strategy."""
    lines = ["| strategy | bank frames | bank tokens | attended tokens | step s | train tokens/s | this / dense "
             "| step MB | live tensors MB | estimate MB | live / estimate | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("kind") not in ("point", "search"):
            continue
        name = r["strategy"] + (" (search)" if r["kind"] == "search" else "")
        if r.get("status") != "ok":
            step = f"{r['step_rss_mb']:.0f}" if r.get("step_rss_mb") is not None else "-"
            lines.append(f"| {name} | {r['bank_frames']} | {r.get('bank_tokens', '-')} | - | {r['status']} | - | - "
                         f"| {step} | - | - | - | - |")
            continue
        ratio = f"{r['vs_dense']:.2f}x" if r.get("vs_dense") else "-"
        att = r["attended_tokens"] if r.get("attended_tokens") is not None else "-"
        lines.append(f"| {name} | {r['bank_frames']} | {r['bank_tokens']} | {att} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {ratio} | {r['step_rss_mb']:.0f} | {_est(r)} | "
                     f"{r['peak_rss_mb']:.0f} |")
    fits = [r for r in rows if r.get("kind") == "fit"]
    if fits:
        lines += ["", "| strategy | budget GiB (step) | longest bank frames | first miss | step MB at longest "
                      "| search points |", "|---|---:|---:|---:|---:|---|"]
        for f in fits:
            miss = f"{f['first_miss_frames']} ({f['miss_reason']})" if f["first_miss_frames"] else "-"
            mb = f"{f['step_rss_mb_at_longest']:.0f}" if f.get("step_rss_mb_at_longest") is not None else "-"
            tried = ", ".join(f"{L}{'' if ok else '✗'}" for L, ok in f["tried"])
            lines.append(f"| {f['strategy']} | {f['memory_budget_gb']:g} | {_longest_str(f)} | {miss} | {mb} "
                         f"| {tried} |")
        summary = fit_summary(rows)
        if summary:
            lines += ["", summary]
    return "\n".join(lines)


def _point_line(r, budget_mb=None) -> str:
    tag = "search " if r.get("kind") == "search" else ""
    if r.get("status") != "ok":
        mb = f"  step {r['step_rss_mb']:.0f} MB" if r.get("step_rss_mb") is not None else ""
        return f"{tag}{r['strategy']:>8}  bank {r['bank_frames']:>5} frames  {r['status']}{mb}  ({r['wall_s']:.0f} s)"
    fit = "" if budget_mb is None else ("  fits" if r["step_rss_mb"] <= budget_mb else "  over budget")
    return (f"{tag}{r['strategy']:>8}  bank {r['bank_frames']:>5} frames  {r['step_s']:7.2f} s/step  "
            f"{r['tokens_per_s']:8.0f} tokens/s  step {r['step_rss_mb']:6.0f} MB  peak {r['peak_rss_mb']:6.0f} MB"
            f"{fit}  ({r['wall_s']:.0f} s)")


def _fit_line(f) -> str:
    return (f"{f['strategy']:>8}  longest bank under {f['memory_budget_gb']:g} GiB: {_longest_str(f)} frames  "
            f"(tried {', '.join(f'{L}{chr(10003) if ok else chr(10007)}' for L, ok in f['tried'])})")


#################################################################################
#                                 CLI entry                                     #
#################################################################################

def cli_main(cfg, args, log=print) -> int:
    """``decmem bench train``: args has strategies, bank_frames, json, memory_gb, no_search, steps, warmup,
    cap, timeout; dumps the resolved config next to the JSON, prints the table and the summary."""
    if args.json:
        dump_config(cfg, os.path.splitext(args.json)[0] + ".config.yaml")   # the resolved config behind the rows
    rows = run_train_bench(cfg, args.strategies, args.bank_frames, args.json, log, memory_budget_gb=args.memory_gb,
                           search=not args.no_search, steps=args.steps, warmup=args.warmup, cap=args.cap,
                           timeout_s=args.timeout)
    print()
    print(format_table(rows))
    if args.json:
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0
