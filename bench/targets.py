"""Target checks of ``decmem bench``: ``<stem>.targets.json`` next to ``--json PATH``.

Every bench measures its baseline in the same run (dense attention, a K/V
all-gather, the trainer's consumption, the dense memory fit), so each target is a
ratio between rows of one JSON file and is checked from that file alone. A target
whose points the run did not measure is reported with ``met: None``, never guessed.
"""
from __future__ import annotations

import math

NEAREST_TOL = 1.25    # a measured bank size stands in for a wanted one within this factor (and "measured" says so)


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


ESTIMATE_BAND = (0.5, 1.0)   # live tensors' peak / the dry run's estimate: the estimate is a worst case, so it must
                             # bound the peak, and stay within 2x of it to be of use when choosing a layout


def targets_train(rows: list[dict], sparse: str = "decmem", dense: str = "dense") -> list[dict]:
    """The dry run's step-memory estimate against the measured step working set (issue #19: the estimate is what
    decides which paper-scale layouts fit 80 GB), then the fit ratio of issue #9 (sparse fits a >= 4x longer bank
    than dense under the same budget; None when the search can't tell)."""
    return [_target_estimate(rows), _target_fit(rows, sparse, dense)]


def _target_estimate(rows: list[dict]) -> dict:
    lo, hi = ESTIMATE_BAND
    name = f"train: live tensors' peak / dry-run estimate in [{lo:g}, {hi:g}] at every point"
    pts = [r for r in rows if r.get("kind") == "point" and r.get("status") == "ok" and r.get("live_vs_estimate")]
    if not pts:
        return target(name, "no point carries the dry run's estimate and the live tensors' peak", None, None)
    ratios = [r["live_vs_estimate"] for r in pts]
    desc = ", ".join(f"{r['strategy']}@{r['bank_frames']} {q:.2f} (RSS {r['measured_vs_estimate']:.2f})"
                     for r, q in zip(pts, ratios))
    worst = max(ratios, key=lambda q: max(q / hi, lo / q))
    return target(name, desc + (" (activation checkpointing)" if pts[0].get("activation_checkpointing") else ""),
                  worst, all(lo <= q <= hi for q in ratios))


def _target_fit(rows: list[dict], sparse: str, dense: str) -> dict:
    name = f"train: {sparse} fits a >= 4x longer bank than {dense} in the same memory"
    fits = {r["strategy"]: r for r in rows if r.get("kind") == "fit"}
    if sparse not in fits or dense not in fits:
        return target(name, f"no memory-fit search for both {sparse} and {dense}", None, None)
    a, b = fits[sparse], fits[dense]
    la, lb = a["longest_fit_frames"], b["longest_fit_frames"]
    desc = (f"longest bank under {a['memory_budget_gb']:g} GiB: {sparse} "
            f"{'none' if la is None else ('> ' if a['capped'] else '') + str(la)}, {dense} "
            f"{'none' if lb is None else ('> ' if b['capped'] else '') + str(lb)} frames")
    if la is None:         # sparse fits nothing: not met if dense fits something, unknown if neither does
        return target(name, desc, 0.0 if lb is not None else None, False if lb is not None else None)
    if lb is None:         # dense fits nothing below the search start: the ratio is > la / start
        bound = la / b["search_start"]
        return target(name, desc + f"; ratio > {bound:.3g}", None, True if bound >= 4 else None)
    ratio = la / lb
    if b["capped"]:        # both hit the cap: no information
        return target(name, desc + "; both reached the cap, raise --cap", ratio, None)
    if a["capped"]:        # a lower bound: conclusive only if already >= 4
        return target(name, desc + "; ratio is a lower bound", ratio, True if ratio >= 4 else None)
    return target(name, desc, ratio, ratio >= 4)


def format_targets(targets: list[dict]) -> str:
    """Markdown table of the target verdicts."""
    lines = ["| target | measured | ratio | met |", "|---|---|---:|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        ratio = f"{t['ratio']:.3g}" if t["ratio"] is not None else "-"
        lines.append(f"| {t['target']} | {t['measured']} | {ratio} | {met} |")
    return "\n".join(lines)
