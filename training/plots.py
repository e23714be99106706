"""Plots and target checks for ``decmem bench``: next to ``--json PATH``, ``<stem>.png`` and ``<stem>.targets.json``.

Every bench measures its baseline in the same run (dense attention, a K/V
all-gather, the trainer's consumption, the dense memory fit), so each target is a
ratio between rows of one JSON file and is checked from that file alone. A target
whose points the run did not measure is reported with ``met: None``, never guessed.
Drawing is off-screen (Agg) with matplotlib's object API: no display, no pyplot state.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys

NEAREST_TOL = 1.25    # a measured bank size stands in for a wanted one within this factor (and "measured" says so)


#################################################################################
#                                 Figure helpers                                #
#################################################################################

def figure(cols: int, size: tuple[float, float]):
    """A matplotlib Figure with 1 x cols axes, drawn off-screen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, cols, squeeze=False)[0])


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
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))


def bar_plot(ax, labels: list[str], values: list, title: str, ylabel: str, texts: list[str] | None = None) -> None:
    """Bars (linear axis) with their value, or ``texts``, written on top; a missing value draws no bar, keeps its text."""
    import textwrap

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
    fig, (ax,) = figure(1, (7, 4.8))
    r0 = rows[0] if rows else {}
    mode = "fwd+bwd" if r0.get("backward") else "fwd"
    line_plot(ax, _by_strategy(rows, "median_ms"),
              f"One attention layer ({mode}): {r0.get('heads')} heads x {r0.get('head_dim')}, "
              f"{r0.get('tokens_per_frame')} tokens/frame, {r0.get('query_tokens')} query tokens",
              "bank size (frames)", "median time (ms)", logx=True, logy=True)
    save_figure(fig, path, rows)


def plot_generate(rows: list[dict], path: str) -> None:
    """Median seconds per generated latent vs bank latents, one line per strategy."""
    fig, (ax,) = figure(1, (7, 4.8))
    r0 = rows[0] if rows else {}
    line_plot(ax, _by_strategy(rows, "sec_per_latent"),
              f"Generation: {r0.get('model_size')} model, {r0.get('sample_steps')} Euler steps, "
              f"{r0.get('tokens_per_frame')} tokens/latent", "bank size (latent frames)",
              "time per generated latent (s)", logx=True)
    ax.set_ylim(bottom=0)
    save_figure(fig, path, rows)


def plot_cp(rows: list[dict], path: str) -> None:
    """Left: bytes per layer moved by the cp query read vs a K/V all-gather, vs cp. Right: bank MiB per rank vs cp."""
    fig, (a, b) = figure(2, (12, 4.8))
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
    fig, (a, b) = figure(2, (11, 4.8))
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
    fig, (a, b) = figure(2, (12, 4.8))
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


#################################################################################
#                                 Target checks                                 #
#################################################################################

def target(name: str, measured: str, ratio: float | None, met: bool | None) -> dict:
    """One target's verdict; ratio is measured / baseline (or its inverse, as the target is phrased)."""
    ok = ratio is not None and math.isfinite(ratio)
    return {"target": name, "measured": measured, "ratio": round(ratio, 6) if ok else None, "met": met}


def nearest(available, want: int) -> int | None:
    """The measured size closest to ``want`` (by ratio), if within NEAREST_TOL of it; else None."""
    cands = [a for a in set(available) if a > 0]
    if not cands:
        return None
    best = min(cands, key=lambda a: abs(math.log(a / want)))
    return best if max(best / want, want / best) <= NEAREST_TOL else None


def _at(T: int, want: int) -> str:
    """The bank size a figure was taken at, flagged when it stands in for the wanted one."""
    return f"{T}" if T == want else f"{T} (nearest measured to {want})"


def targets_attention(rows: list[dict]) -> list[dict]:
    """dense / decmem median time >= 10x at 448 bank frames."""
    name = "attention: dense / decmem time >= 10x at 448 bank frames"
    ms = {(r["strategy"], r["bank_frames"]): r["median_ms"] for r in rows}
    T = nearest([t for s, t in ms if s == "decmem" and ("dense", t) in ms], 448)
    if T is None:
        return [target(name, "decmem and dense not both measured near 448 bank frames", None, None)]
    ratio = ms[("dense", T)] / ms[("decmem", T)]
    return [target(name, f"dense {ms[('dense', T)]:.2f} ms, decmem {ms[('decmem', T)]:.2f} ms at {_at(T, 448)} "
                         f"bank frames", ratio, ratio >= 10)]


def targets_generate(rows: list[dict]) -> list[dict]:
    """decmem s/latent grows <= 5% from 56 to 448 bank latents; dense / decmem >= 3x at 224 bank latents."""
    s = {(r["strategy"], r["bank_frames"]): r["sec_per_latent"] for r in rows}
    dec = [t for k, t in s if k == "decmem"]
    out = []
    name = "generate: decmem time per latent grows <= 5% from 56 to 448 bank latents"
    lo, hi = nearest(dec, 56), nearest(dec, 448)
    if lo is None or hi is None or lo == hi:
        out.append(target(name, "decmem not measured near both 56 and 448 bank latents", None, None))
    else:
        r = s[("decmem", hi)] / s[("decmem", lo)]
        out.append(target(name, f"decmem {s[('decmem', lo)]:.4g} s/latent at {_at(lo, 56)} -> "
                                f"{s[('decmem', hi)]:.4g} at {_at(hi, 448)} bank latents", r, r <= 1.05))
    name = "generate: dense / decmem time per latent >= 3x at 224 bank latents"
    T = nearest([t for t in dec if ("dense", t) in s], 224)
    if T is None:
        out.append(target(name, "decmem and dense not both measured near 224 bank latents", None, None))
    else:
        r = s[("dense", T)] / s[("decmem", T)]
        out.append(target(name, f"dense {s[('dense', T)]:.4g} s/latent, decmem {s[('decmem', T)]:.4g} at "
                                f"{_at(T, 224)} bank latents", r, r >= 3))
    return out


def targets_cp(rows: list[dict]) -> list[dict]:
    """Query-read bytes <= 1% of a K/V all-gather (largest bank, worst cp); per-rank bank MiB x cp constant within 10%."""
    out = []
    name = "cp: bytes moved by the decmem query read <= 1% of a K/V all-gather"
    par = [r for r in rows if r["cp"] > 1 and r["kv_allgather_bytes_per_layer"] > 0]
    if not par:
        out.append(target(name, "no cp > 1 measured", None, None))
    else:
        T = max(r["bank_frames"] for r in par)
        w = max((r for r in par if r["bank_frames"] == T),
                key=lambda r: r["query_bytes_per_layer"] / r["kv_allgather_bytes_per_layer"])
        f = w["query_bytes_per_layer"] / w["kv_allgather_bytes_per_layer"]
        out.append(target(name, f"{w['query_bytes_per_layer'] / 2**20:.3g} MiB vs {w['kv_allgather_bytes_per_layer'] / 2**20:.3g}"
                                f" MiB per layer ({100 * f:.2f}%) at cp={w['cp']}, bank {T} (largest measured; "
                                f"worst cp)", f, f <= 0.01))
    name = "cp: per-rank bank memory proportional to 1/cp (within 10%)"
    worst = None
    for T in sorted({r["bank_frames"] for r in rows}):
        prod = {r["cp"]: r["per_rank_bank_mb"] * r["cp"] for r in rows if r["bank_frames"] == T}
        if len(prod) >= 2 and min(prod.values()) > 0:
            spread = max(prod.values()) / min(prod.values())
            if worst is None or spread > worst[0]:
                worst = (spread, T, prod)
    if worst is None:
        out.append(target(name, "fewer than two cp sizes measured for any bank", None, None))
    else:
        spread, T, prod = worst
        out.append(target(name, "per-rank MiB x cp: " + ", ".join(f"{v:.3g} (cp={c})" for c, v in sorted(prod.items()))
                          + f" at bank {T} (worst bank); ratio = max / min", spread, spread <= 1.10))
    return out


def targets_data(rows: list[dict]) -> list[dict]:
    """Every loader source >= 3x the trainer's samples/s; local / s3 samples/s <= 1.5."""
    loaders = {r["variant"]: r["samples_per_s"] for r in rows if r["what"] == "loader"}
    trainer = next((r["samples_per_s"] for r in rows if r["what"] == "trainer"), None)
    out = []
    name = "data: loader samples/s >= 3x the trainer's consumption (every source)"
    if not loaders or not trainer:
        out.append(target(name, "loader or trainer not measured", None, None))
    else:
        worst = min(loaders.values()) / trainer
        out.append(target(name, ", ".join(f"{k} {v:.3g}" for k, v in loaders.items()) + f" samples/s vs trainer "
                                f"{trainer:.3g} samples/s; ratio = slowest source / trainer", worst, worst >= 3))
    name = "data: s3:// loader within 1.5x of local (local / s3 samples/s)"
    local = loaders.get("local")
    s3 = next((v for k, v in loaders.items() if k.startswith("s3")), None)
    if not local or not s3:
        out.append(target(name, "local and s3 loaders not both measured", None, None))
    else:
        out.append(target(name, f"local {local:.3g}, s3 {s3:.3g} samples/s", local / s3, local / s3 <= 1.5))
    return out


def targets_train(rows: list[dict], sparse: str = "decmem", dense: str = "dense") -> list[dict]:
    """sparse fits a >= 4x longer bank than dense under the same step-memory budget (None when the search can't tell)."""
    name = f"train: {sparse} fits a >= 4x longer bank than {dense} in the same memory"
    fits = {r["strategy"]: r for r in rows if r.get("kind") == "fit"}
    if sparse not in fits or dense not in fits:
        return [target(name, f"no memory-fit search for both {sparse} and {dense}", None, None)]
    a, b = fits[sparse], fits[dense]
    la, lb = a["longest_fit_frames"], b["longest_fit_frames"]
    desc = (f"longest bank under {a['memory_budget_gb']:g} GiB: {sparse} "
            f"{'none' if la is None else ('> ' if a['capped'] else '') + str(la)}, {dense} "
            f"{'none' if lb is None else ('> ' if b['capped'] else '') + str(lb)} frames")
    if la is None:         # sparse fits nothing: not met if dense fits something, unknown if neither does
        return [target(name, desc, 0.0 if lb is not None else None, False if lb is not None else None)]
    if lb is None:         # dense fits nothing below the search start: the ratio is > la / start
        bound = la / b["search_start"]
        return [target(name, desc + f"; ratio > {bound:.3g}", None, True if bound >= 4 else None)]
    ratio = la / lb
    if b["capped"]:        # both hit the cap: no information
        return [target(name, desc + "; both reached the cap, raise --cap", ratio, None)]
    if a["capped"]:        # a lower bound: conclusive only if already >= 4
        return [target(name, desc + "; ratio is a lower bound", ratio, True if ratio >= 4 else None)]
    return [target(name, desc, ratio, ratio >= 4)]


def format_targets(targets: list[dict]) -> str:
    """Markdown table of the target verdicts."""
    lines = ["| target | measured | ratio | met |", "|---|---|---:|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        ratio = f"{t['ratio']:.3g}" if t["ratio"] is not None else "-"
        lines.append(f"| {t['target']} | {t['measured']} | {ratio} | {met} |")
    return "\n".join(lines)


def plot_memory(rows: list[dict], path: str) -> None:
    from training.bench_memory import plot_memory as plot
    plot(rows, path)


def targets_memory(rows: list[dict]) -> list[dict]:
    from training.bench_memory import targets_memory as targets
    return targets(rows)


PLOTS = {"attention": plot_attention, "generate": plot_generate, "cp": plot_cp, "data": plot_data, "train": plot_train,
         "memory": plot_memory}
TARGETS = {"attention": targets_attention, "generate": targets_generate, "cp": targets_cp, "data": targets_data,
           "train": targets_train, "memory": targets_memory}


def write_bench_outputs(kind: str, json_path: str | None, log=print) -> list[dict]:
    """From the rows at json_path: write <stem>.png and <stem>.targets.json, print the targets table; [] without json."""
    if not json_path:
        return []
    with open(json_path) as f:
        rows = json.load(f)                      # exactly what the bench wrote: the plot shows the saved numbers
    stem = os.path.splitext(json_path)[0]
    PLOTS[kind](rows, stem + ".png")
    targets = TARGETS[kind](rows)
    with open(stem + ".targets.json", "w") as f:
        json.dump(targets, f, indent=1)
    log(f"\n{format_targets(targets)}\n\nwrote {stem}.png and {stem}.targets.json")
    return targets
