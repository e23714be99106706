"""The figures of ``decmem bench``: ``<stem>.png`` next to ``--json PATH``, drawn from the rows saved there.

Drawing is off-screen (Agg) with matplotlib's object API: no display, no pyplot state.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import textwrap

from matplotlib.ticker import FuncFormatter

from decmem.evaluation.figures import figure  # the one off-screen figure helper

#################################################################################
#                                 Figure helpers                                #
#################################################################################

def line_plot(ax, series: dict, title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
              styles: dict | None = None) -> None:
    """One line per series ({label: [(x, y), ...]}); points a log axis cannot show (<= 0, None) are dropped."""
    xs = set()
    for label, pts in series.items():
        pts = sorted((x, y) for x, y in pts if x is not None and y is not None and math.isfinite(y)
                     and (not logx or x > 0) and (not logy or y > 0))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{"marker": "o", **(styles or {}).get(label, {})})
        xs.update(p[0] for p in pts)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    if xs and len(xs) <= 12:                # label the measured sizes themselves, not powers of ten
        ticks = _spaced(sorted(xs), logx)
        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
    _decorate(ax, title, xlabel, ylabel, legend=bool(series))


def _spaced(ticks: list, log: bool) -> list:
    """Drop ticks too close to the previous kept one for their labels not to overlap (448 next to 512)."""
    span = (ticks[-1] - ticks[0]) or 1
    kept = [ticks[0]]
    for t in ticks[1:]:
        if (t / kept[-1] >= 1.3) if log else (t - kept[-1] >= 0.06 * span):
            kept.append(t)
    return kept


def _plain_log_labels(axis) -> None:
    """Log-axis labels as plain numbers (400, not 4x10^2), minor ones only at 2 and 5 so they never crowd."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))


def bar_plot(ax, labels: list[str], values: list, title: str, ylabel: str, texts: list[str] | None = None) -> None:
    """Bars (linear axis) with their value, or ``texts``, written on top; a missing value draws no bar, keeps its text."""
    heights = [v if v is not None and math.isfinite(v) else 0 for v in values]
    bars = ax.bar(range(len(labels)), heights, color=[f"C{i}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels=[textwrap.fill(lb, 22) for lb in labels], fontsize=8)
    for b, v, t in zip(bars, values, texts or [None] * len(values)):
        ax.annotate(t or (f"{v:.3g}" if v is not None else "none"), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    _decorate(ax, title, None, ylabel, legend=False)


def _decorate(ax, title, xlabel, ylabel, legend: bool) -> None:
    """Title, axis labels, a light grid and (if anything is labelled) the legend."""
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def machine_string(rows: list[dict]) -> str:
    """The machine the rows were stamped with (bench cp's rows carry none: this process's, the same run)."""
    m = next((r["machine"] for r in rows if isinstance(r.get("machine"), dict)), None)
    if m is None:
        torch = sys.modules.get("torch")
        m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cpus": os.cpu_count(), "torch": getattr(torch, "__version__", None)}
    parts = [m.get("platform"), m.get("processor"), f"{m['cpus']} CPUs" if m.get("cpus") else None,
             f"torch {m['torch']}" if m.get("torch") else None]
    r0 = rows[0] if rows else {}
    if r0.get("device"):
        parts.append(f"{r0['device']} {r0.get('dtype', '')}".strip())
    if r0.get("threads"):
        parts.append(f"{r0['threads']} thread{'s' if r0['threads'] != 1 else ''}")
    return "machine: " + ", ".join(p for p in parts if p)


def save_figure(fig, path: str, rows: list[dict]) -> None:
    """Footnote the machine, lay out and write the PNG."""
    fig.text(0.01, 0.01, machine_string(rows), fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)


def _by_strategy(rows, y: str, keep=lambda r: True) -> dict:
    """{strategy: [(bank_frames, row[y]), ...]} over the rows ``keep`` accepts."""
    out: dict[str, list] = {}
    for r in rows:
        if keep(r) and r.get(y) is not None:
            out.setdefault(r["strategy"], []).append((r["bank_frames"], r[y]))
    return out


#################################################################################
#                                Plots per bench                                #
#################################################################################

def plot_attention(rows: list[dict], path: str) -> None:
    """Median ms of one attention layer vs bank frames, one line per strategy (log-log)."""
    fig, [(ax,)] = figure(1, 1, (7, 4.8))
    r0 = rows[0] if rows else {}
    mode = "fwd+bwd" if r0.get("backward") else "fwd"
    line_plot(ax, _by_strategy(rows, "median_ms"),
              f"One attention layer ({mode}): {r0.get('heads')} heads x {r0.get('head_dim')}, "
              f"{r0.get('tokens_per_frame')} tokens/frame, {r0.get('query_tokens')} query tokens",
              "bank size (frames)", "median time (ms)", logx=True, logy=True)
    save_figure(fig, path, rows)


def plot_generate(rows: list[dict], path: str) -> None:
    """Median seconds per generated latent vs bank latents, one line per strategy."""
    fig, [(ax,)] = figure(1, 1, (7, 4.8))
    r0 = rows[0] if rows else {}
    line_plot(ax, _by_strategy(rows, "sec_per_latent"),
              f"Generation: {r0.get('model_size')} model, {r0.get('sample_steps')} Euler steps, "
              f"{r0.get('tokens_per_frame')} tokens/latent", "bank size (latent frames)",
              "time per generated latent (s)", logx=True)
    ax.set_ylim(bottom=0)
    save_figure(fig, path, rows)


def plot_cp(rows: list[dict], path: str) -> None:
    """Left: bytes per layer moved by the cp query read vs a K/V all-gather, vs cp. Right: bank MiB per rank vs cp."""
    fig, [(a, b)] = figure(1, 2, (12, 4.8))
    banks = sorted({r["bank_frames"] for r in rows})
    moved, mem, styles = {}, {}, {}
    for i, T in enumerate(banks):
        rs = sorted((r for r in rows if r["bank_frames"] == T), key=lambda r: r["cp"])
        c = f"C{i}"
        q = [(r["cp"], r["query_bytes_per_layer"] / 2**20) for r in rs]
        same = next((k for k, v in moved.items() if k.startswith("decmem") and v == q), None)
        if same:            # it does not grow with the bank: one line named after every bank it stands for
            moved[f"{same}, {T}"] = moved.pop(same)
            styles[f"{same}, {T}"] = {"color": "k"}
        else:
            moved[f"decmem query read, bank {T}"] = q
        moved[f"K/V all-gather, bank {T}"] = [(r["cp"], r["kv_allgather_bytes_per_layer"] / 2**20) for r in rs]
        if T == banks[-1]:      # the same at every bank size: one line is enough
            moved["  of which top-k scores (every bank)"] = [(r["cp"], r.get("by_collective", {}).get("scores", 0) / 2**20) for r in rs]
        styles.setdefault(f"decmem query read, bank {T}", {"color": c, "linewidth": 2.5})
        styles.update({f"K/V all-gather, bank {T}": {"color": c, "linestyle": "--", "marker": "s"},
                       "  of which top-k scores (every bank)": {"color": "0.3", "linestyle": ":", "marker": "."}})
        mem[f"bank {T}"] = [(r["cp"], r["per_rank_bank_mb"]) for r in rs]
        mem[f"ideal 1/cp, bank {T}"] = [(r["cp"], rs[0]["per_rank_bank_mb"] * rs[0]["cp"] / r["cp"]) for r in rs]
        styles.update({f"bank {T}": {"color": c}, f"ideal 1/cp, bank {T}": {"color": c, "linestyle": ":", "marker": ""}})
    line_plot(a, moved, "Bytes moved per layer by context parallelism (query stream)", "cp (ranks)",
              "MiB per layer (max over ranks)", logx=True, logy=True, styles=styles)
    line_plot(b, mem, "Memory-bank bytes per rank (K, V, pooled K and V)", "cp (ranks)", "MiB per rank (max over ranks)",
              logx=True, logy=True, styles=styles)
    save_figure(fig, path, rows)


def plot_data(rows: list[dict], path: str) -> None:
    """Left: samples/s of the loader per source next to what the trainer consumes. Right: preprocess frames/s."""
    fig, [(a, b)] = figure(1, 2, (11, 4.8))
    feed = [r for r in rows if r["what"] in ("loader", "trainer")]
    labels = [("loader " if r["what"] == "loader" else "trainer: ") + r["variant"] for r in feed]
    vals = [r["samples_per_s"] for r in feed]
    bar_plot(a, labels, vals, "Samples/s: data loader per source vs the trainer's consumption", "samples / s")
    trainer = next((r["samples_per_s"] for r in rows if r["what"] == "trainer"), None)
    if trainer:
        a.axhline(3 * trainer, color="0.3", linestyle="--", linewidth=1, label="target: 3x trainer")
        a.legend(fontsize=8)
    pre = [r for r in rows if r["what"] == "preprocess"]
    bar_plot(b, [r["variant"] for r in pre], [r["frames_per_s_per_worker"] for r in pre],
             "Preprocessing throughput", "frames / s per worker")
    save_figure(fig, path, rows)


def plot_train(rows: list[dict], path: str) -> None:
    """Left: training tokens/s vs bank frames per strategy. Right: longest bank under the memory budget per strategy."""
    fig, [(a, b)] = figure(1, 2, (12, 4.8))
    r0 = next((r for r in rows if r.get("kind") == "point" and r.get("status") == "ok"), {})
    line_plot(a, _by_strategy(rows, "tokens_per_s", lambda r: r.get("kind") == "point" and r.get("status") == "ok"),
              f"Training steps: {r0.get('model_size')} model, batch {r0.get('batch')}, "
              f"{r0.get('tokens_per_frame')} tokens/frame", "bank size (frames)", "training tokens / s", logx=True)
    a.set_ylim(bottom=0)
    fits = [r for r in rows if r.get("kind") == "fit"]
    if fits:
        texts = [("none" if f["longest_fit_frames"] is None else
                  f"> {f['cap_frames']}" if f["capped"] else str(f["longest_fit_frames"])) for f in fits]
        bar_plot(b, [f["strategy"] for f in fits], [f["longest_fit_frames"] for f in fits],
                 f"Longest bank under {fits[0]['memory_budget_gb']:g} GiB of step memory", "bank size (frames)",
                 texts=texts)
    else:
        b.text(0.5, 0.5, "no memory-fit search in this run (--no-search)", ha="center", va="center")
        b.set_axis_off()
    save_figure(fig, path, rows)
