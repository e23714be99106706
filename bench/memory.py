"""``decmem bench memory``: does a model learn to read its long-term memory? The exact-revisit probe.

Task. A bank of F frames of random smooth textures, each with its own camera (yaw
``yaw_deg`` apart, one camera centre); the target chunk is an exact revisit of bank
frames j .. j+C-1, with their cameras, all older than the ALM window. Nothing in
the window can tell what the chunk looks like: only a read of the right old frames
can, and at high noise (τ = 0.9) almost no content cue is left, so the camera is
the only key to the source. Every sample has fresh textures: a model can only
succeed by learning to retrieve, not by memorising.

Per run (a strategy with config overrides), the configured model is trained from
scratch with AdamW on a stream of probe samples, and every ``eval_every`` steps
scored on a fixed held-out set (same samples and noise for every run):
  loss_tau   velocity MSE at fixed τ (0.3 / 0.6 / 0.9 by default)
  recall     recall@k of the true source block of every query block, averaged over
             layers, heads and query blocks (also per layer x head), at τ = 0.9;
             chance = k / candidate blocks
``window`` cannot know the answer: it is the floor every memory must beat.
Each run is a fresh spawned process; runs are independent and can go ``--jobs`` at a time.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time

import torch

from decmem.bench.common import write_rows
from decmem.bench.figures import figure, line_plot, save_figure
from decmem.bench.targets import target
from decmem.model.diffusion import DiffusionArgs, rectified_flow_loss
from decmem.model.factory import build_model
from decmem.training.config import config_from_dict, to_dict
from decmem.training.run_config import MemoryProbeArgs, RunConfig

PROBE_SEED = 0x9E0B               # the probe's data stream: the same for every run
EVAL_SEED = 0xE7A1                # the held-out set


#################################################################################
#                                    The Task                                   #
#################################################################################

def probe_cameras(p: MemoryProbeArgs, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K [n, 3, 3] (pixels) and c2w [n, 4, 4] (OpenCV axes): one centre, camera i at yaw p.yaw_deg * i about the
    y axis and, once per turn of yaw, on the next ring of pitch (rings p.pitch_deg apart, centred on level)."""
    h, w = p.latent_h, p.latent_w
    f = 0.5 * h / math.tan(math.radians(p.fov_deg) / 2)
    K = torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]]).expand(n, 3, 3).clone()
    i = torch.arange(n, dtype=torch.float64)
    yaw = torch.deg2rad(p.yaw_deg * i)
    ring = (i // round(360 / p.yaw_deg)) if p.yaw_deg > 0 else torch.zeros_like(i)
    pitch = torch.deg2rad(p.pitch_deg * (ring - (p.pitch_levels - 1) / 2))
    Ry = torch.zeros(n, 3, 3, dtype=torch.float64)
    Ry[:, 0, 0], Ry[:, 0, 2], Ry[:, 1, 1], Ry[:, 2, 0], Ry[:, 2, 2] = yaw.cos(), yaw.sin(), 1, -yaw.sin(), yaw.cos()
    Rx = torch.zeros(n, 3, 3, dtype=torch.float64)
    Rx[:, 0, 0], Rx[:, 1, 1], Rx[:, 1, 2], Rx[:, 2, 1], Rx[:, 2, 2] = 1, pitch.cos(), -pitch.sin(), pitch.sin(), pitch.cos()
    c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    c2w[:, :3, :3] = Ry @ Rx
    return K, c2w.float()


def probe_batch(p: MemoryProbeArgs, chunk_frames: int, window: int, n: int, g: torch.Generator) -> dict:
    """n samples: latents [n, F + C, 3, h, w] (bank, then the revisited frames), K, c2w, source frame j [n].

    j is drawn so that every revisited frame is older than the ALM window of the chunk at F.
    """
    F, C, h, w = p.bank_frames, chunk_frames, p.latent_h, p.latent_w
    j_max = F - C - window                                        # frames j..j+C-1 < F - (W - 1)
    if j_max < 0:
        raise ValueError(f"bench_memory.bank_frames={F}: expected >= chunk_frames + window = {C + window}, so the "
                         "revisited frames can lie before the ALM window")
    cells = torch.randn(n, F, 3, p.texture_cells, p.texture_cells, generator=g)
    tex = torch.nn.functional.interpolate(cells.view(n * F, 3, p.texture_cells, p.texture_cells), size=(h, w),
                                          mode="bicubic", align_corners=False).view(n, F, 3, h, w)
    tex = (tex / tex.std(dim=(2, 3, 4), keepdim=True) * 0.5).clamp(-1, 1)             # [n, F, 3, h, w], std ~0.5
    j = torch.randint(0, j_max + 1, (n,), generator=g)
    src = j[:, None] + torch.arange(C)                                               # [n, C]
    K, c2w = probe_cameras(p, F)
    lat = torch.cat([tex, tex[torch.arange(n)[:, None], src]], dim=1)              # [n, F + C, 3, h, w]
    Ks = torch.cat([K.expand(n, F, 3, 3), K[src]], dim=1)
    cs = torch.cat([c2w.expand(n, F, 4, 4), c2w[src]], dim=1)
    return {"latents": lat, "K": Ks, "c2w": cs, "source": j}


#################################################################################
#                                   Evaluation                                  #
#################################################################################

@torch.no_grad()
def evaluate(model, p: MemoryProbeArgs, data: dict, noise: torch.Tensor) -> dict:
    """Held-out velocity loss at each τ, and recall@k of the true source blocks at the largest τ."""
    F = p.bank_frames
    lat, K, c2w = data["latents"], data["K"], data["c2w"]
    n = lat.shape[0]
    bank = model.encode_memory(lat[:, :F], K[:, :F], c2w[:, :F])
    x0 = lat[:, F:]
    out = {}
    for tau in p.taus:
        x_t = (1 - tau) * x0 + tau * noise
        v, stats = model(x_t, torch.full((n,), tau), K[:, F:], c2w[:, F:], F, bank, return_stats=True)
        out[f"loss_tau{tau:g}"] = (v - (noise - x0)).pow(2).mean().item()
    out.update(recall(stats, data["source"], model, p))
    return out


def recall(stats: dict, source: torch.Tensor, model, p: MemoryProbeArgs) -> dict:
    """Fraction of (layer, head, query block) whose true source block is among the blocks it read."""
    layers = [s for s in stats["layers"] if "selected" in s]
    if not layers:
        return {"recall": None, "recall_layer_head": None, "chance": None}
    a = model.args.attention
    C, n_b = model.args.chunk_frames, layers[0]["selected"].shape[2] // model.args.chunk_frames
    G = C * n_b
    q = torch.arange(G)
    true = (source[:, None] + q // n_b) * n_b + q % n_b                              # [n, G] global block index
    per = []
    for s in layers:
        sel, valid = s["selected"], s["selected_valid"]                              # [n, H, G', k]
        if sel.shape[2] == 1:                                                        # fov_frames: one set for all
            sel, valid = sel.expand(-1, -1, G, -1), valid.expand(-1, -1, G, -1)
        hit = ((sel == true[:, None, :, None]) & valid).any(-1).float()             # [n, H, G]
        per.append(hit.mean(dim=(0, 2)))                                             # [H]
    lh = torch.stack(per)                                                            # [layers, H]
    candidates = (p.bank_frames - (a.window - 1)) * n_b
    picked = a.top_k if a.strategy == "decmem" else a.fov_frames * n_b
    return {"recall": lh.mean().item(), "recall_layer_head": [[round(v, 4) for v in r] for r in lh.tolist()],
            "chance": min(1.0, picked / candidates)}


#################################################################################
#                                    One Run                                    #
#################################################################################

def train_run(cfg_dict: dict, name: str, strategy: str, overrides: list[str], threads: int = 0,
              log_path: str | None = None, seed: int = 0) -> list[dict]:
    """Train the configured model with ``strategy`` + ``overrides`` on the probe; one row per evaluation.

    ``seed`` shifts the model's initialisation and the training stream; the held-out set stays the same.
    """
    cfg = config_from_dict(RunConfig, cfg_dict, [f"model.attention.strategy={strategy}", *overrides])
    p = cfg.bench_memory
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed + seed)
    model = build_model(cfg.model)
    C, W = cfg.model.chunk_frames, cfg.model.attention.window
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, p.warmup)))
    diff = DiffusionArgs(**vars(cfg.diffusion))
    g_data = torch.Generator().manual_seed(PROBE_SEED + 2 * seed)
    g_noise = torch.Generator().manual_seed(PROBE_SEED + 2 * seed + 1)
    g_eval = torch.Generator().manual_seed(EVAL_SEED)
    held = probe_batch(p, C, W, p.eval_samples, g_eval)
    noise = torch.randn(held["latents"][:, p.bank_frames:].shape, generator=g_eval)
    rows, losses, t0 = [], [], time.perf_counter()
    base = {"run": name, "seed": seed, "strategy": strategy, "overrides": overrides, "model_size": cfg.model.size,
            "params": sum(q.numel() for q in model.parameters()), "top_k": cfg.model.attention.top_k,
            "window": W, "block_size": cfg.model.attention.block_size, "bank_frames": p.bank_frames,
            "threads": torch.get_num_threads()}

    def record(step):
        model.eval()
        row = {**base, "step": step, "train_loss": sum(losses) / len(losses) if losses else None,
               "seconds": round(time.perf_counter() - t0, 2), **evaluate(model, p, held, noise)}
        model.train()
        losses.clear()
        rows.append(row)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({k: row[k] for k in ("run", "seed", "step", "seconds", "recall", *_loss_keys(p))})
                        + "\n")

    record(0)
    for step in range(1, p.steps + 1):
        b = probe_batch(p, C, W, p.batch, g_data)
        loss, _ = rectified_flow_loss(model, b["latents"], b["K"], b["c2w"], [p.bank_frames], diff, generator=g_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % p.eval_every == 0 or step == p.steps:
            record(step)
    return rows


def _loss_keys(p: MemoryProbeArgs) -> list[str]:
    return [f"loss_tau{t:g}" for t in p.taus]


def _worker(args):
    return train_run(*args)


def run_memory_bench(cfg, runs: list[tuple[str, str, list[str]]], json_path: str | None = None, jobs: int = 1,
                     log=print) -> list[dict]:
    """Every run (name, strategy, overrides), ``jobs`` at a time in spawned processes; rows of every evaluation."""
    p = cfg.bench_memory
    threads = p.threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    progress = (os.path.splitext(json_path)[0] + ".progress.jsonl") if json_path else None
    if progress and os.path.exists(progress):
        os.remove(progress)
    work = [(to_dict(cfg), name, strategy, list(ov), threads, progress, seed)
            for seed in range(p.seeds) for name, strategy, ov in runs]
    log(f"memory probe: {len(runs)} runs x {p.seeds} seed(s) x {p.steps} steps, {jobs} at a time, "
        f"{threads} thread(s) each"
        + (f"; progress in {progress}" if progress else ""))
    rows = []
    if jobs <= 1:
        for w in work:
            got = train_run(*w)
            rows += got
            log(format_table(got, p.taus, last_only=True))
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for got in pool.imap(_worker, work):
                rows += got
                log(format_table(got, p.taus, last_only=True))
    write_rows(json_path, rows, jobs=jobs)
    return rows


#################################################################################
#                        Run Lists, Table, Plot, Targets                        #
#################################################################################

# Each option of the memory recipe switched against the config it runs on: name -> overrides.
ABLATION = {
    "no PRoPE/RoPE (Plücker + sincos)": ["model.camera=plucker", "model.position=sincos"],
    "PRoPE camera only": ["model.camera=prope", "model.position=sincos"],
    "two-gate merge": ["model.attention.merge=gate"],
    "joint-softmax merge": ["model.attention.merge=joint"],
    "no coarse branch": ["model.attention.coarse=false"],
    "no retrieval bias": ["model.attention.retrieval_bias=false"],
    "no position prior": ["model.attention.position_prior=0"],
}
# The recipe before issue #15: added Plücker tokens, sin/cos positions, two gates, selected-only score gradient.
PREVIOUS = ["model.camera=plucker", "model.position=sincos", "model.attention.merge=gate",
            "model.attention.coarse=false", "model.attention.position_prior=0"]


def parse_runs(strategies: list[str], variants: list[str], ablation: bool) -> list[tuple[str, str, list[str]]]:
    """Runs from --strategies, --variant 'NAME=key=value,key=value' (decmem + overrides) and --ablation."""
    runs = [(s, s, []) for s in strategies]
    for v in variants:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            raise ValueError(f"--variant {v!r}: expected NAME=key=value[,key=value...]")
        ov = [x.strip() for x in rest.split(",") if x.strip()]
        strategy = next((x.split("=", 1)[1] for x in ov if x.startswith("model.attention.strategy=")), "decmem")
        runs.append((name, strategy, [x for x in ov if not x.startswith("model.attention.strategy=")]))
    if ablation:
        runs += [(f"decmem, {name}", "decmem", ov) for name, ov in ABLATION.items()]
        runs.append(("decmem, previous recipe", "decmem", PREVIOUS))
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {names}")
    return runs


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per (run, step): losses, recall and seconds averaged over seeds, with ``seeds`` and the
    largest / smallest per-seed value of each loss and of recall (``*_max`` / ``*_min``)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["run"], r["step"]), []).append(r)
    out = []
    for (_, _), rs in groups.items():
        m = dict(rs[0], seeds=len(rs))
        m.pop("seed", None)
        for k in [k for k in rs[0] if k.startswith("loss_tau")] + ["recall", "seconds", "train_loss"]:
            vals = [r[k] for r in rs if r.get(k) is not None]
            m[k] = sum(vals) / len(vals) if vals else None
            if k.startswith("loss_tau") or k == "recall":
                m[f"{k}_min"], m[f"{k}_max"] = (min(vals), max(vals)) if vals else (None, None)
        if rs[0].get("recall_layer_head") is not None:
            lh = [r["recall_layer_head"] for r in rs]
            m["recall_layer_head"] = [[round(sum(x[i][j] for x in lh) / len(lh), 4) for j in range(len(lh[0][i]))]
                                      for i in range(len(lh[0]))]
        out.append(m)
    return out


def format_table(rows: list[dict], taus=(0.3, 0.6, 0.9), last_only: bool = False) -> str:
    """Markdown: per run (and step), held-out losses, recall@k and chance (means over seeds)."""
    rows = seed_means(rows)
    keys = [f"loss_tau{t:g}" for t in taus]
    lines = ["| run | step | " + " | ".join(f"loss τ={t:g}" for t in taus) + " | recall@k | chance | s |",
             "|---|---:|" + "---:|" * len(taus) + "---:|---:|---:|"]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for name in runs:
        rs = [r for r in rows if r["run"] == name]
        for r in (rs[-1:] if last_only else rs):
            rec = "-" if r["recall"] is None else f"{r['recall']:.3f}"
            ch = "-" if r["chance"] is None else f"{r['chance']:.3f}"
            lines.append(f"| {name} | {r['step']} | " + " | ".join(f"{r[k]:.4f}" for k in keys)
                         + f" | {rec} | {ch} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict], baseline: str = "window", factor: float = 0.3) -> str:
    """Markdown: per run, the first step its loss at the largest τ is < factor x the baseline's, and that ratio
    and recall@k at a few steps (means over seeds; the ratio's range over seeds in brackets)."""
    per_seed = {(r["run"], r.get("seed", 0), r["step"]): r for r in rows}
    rows = seed_means(rows)
    tau = max(float(k[len("loss_tau"):]) for k in rows[0] if k.startswith("loss_tau") and k[-4:] not in ("_min", "_max"))
    key = f"loss_tau{tau:g}"
    base = {r["step"]: r[key] for r in rows if r["run"] == baseline}
    steps = sorted(base)
    show = [s for s in steps if s in (100, 200, 300, 500)] + steps[-1:]
    show = sorted(set(show) - {0})
    lines = [f"| run | seeds | first step < {factor:g}x {baseline} | "
             + " | ".join(f"loss/{baseline} (recall) @ {s}" for s in show) + " |",
             "|---|---:|---:|" + "---|" * len(show)]
    for name in dict.fromkeys(r["run"] for r in rows):
        rs = {r["step"]: r for r in rows if r["run"] == name}
        first = next((s for s in steps if s > 0 and s in rs and rs[s][key] < factor * base[s]), None)
        cells = []
        for s in show:
            if s not in rs:
                cells.append("-")
                continue
            seeds = [per_seed[k][key] / base[s] for k in per_seed if k[0] == name and k[2] == s]
            spread = f" [{min(seeds):.2f}-{max(seeds):.2f}]" if len(seeds) > 1 else ""
            rec = f" ({rs[s]['recall']:.2f})" if rs[s]["recall"] is not None else ""
            cells.append(f"{rs[s][key] / base[s]:.2f}{spread}{rec}")
        lines.append(f"| {name} | {rs[steps[-1]]['seeds'] if steps[-1] in rs else '-'} | "
                     f"{first if first is not None else 'never'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_memory(rows: list[dict], path: str) -> None:
    """Left: held-out loss at the largest τ vs step per run. Right: recall@k vs step, chance dashed."""
    rows = seed_means(rows)
    tau = max(float(k[len("loss_tau"):]) for k in rows[0] if k.startswith("loss_tau") and k[-4:] not in ("_min", "_max"))
    key = f"loss_tau{tau:g}"
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, [(a, b)] = figure(1, 2, (13, 5))
    # one colour per run in both panels (the recall panel has no window/dense line, so cycling would shift them)
    styles = {n: {"color": f"C{i % 10}"} for i, n in enumerate(n for n in runs if n != "window")}
    styles["window"] = {"color": "k", "linestyle": "--", "marker": ""}
    line_plot(a, {n: [(r["step"], r[key]) for r in rows if r["run"] == n] for n in runs},
              f"Exact-revisit probe: held-out velocity loss at τ = {tau:g}", "training step", "MSE", logy=True,
              styles=styles)
    rec = {n: [(r["step"], r["recall"]) for r in rows if r["run"] == n and r["recall"] is not None] for n in runs}
    chance = next((r["chance"] for r in rows if r.get("chance") is not None), None)
    if chance is not None:
        steps = sorted({r["step"] for r in rows})
        rec["chance"] = [(s, chance) for s in steps]
        styles["chance"] = {"color": "0.5", "linestyle": ":", "marker": ""}
    line_plot(b, {k: v for k, v in rec.items() if v}, f"Recall@k of the true source block (τ = {tau:g})",
              "training step", "recall@k", styles=styles)
    b.set_ylim(0, 1)
    save_figure(fig, path, rows)


def targets_memory(rows: list[dict], run: str = "decmem", baseline: str = "window", factor: float = 0.3,
                   within: int = 500) -> list[dict]:
    """decmem's held-out loss at the largest τ (mean over seeds) < factor x window's (same step) within ``within``
    steps."""
    out = []
    rows = seed_means(rows)
    tau = max(float(k[len("loss_tau"):]) for k in rows[0]
              if k.startswith("loss_tau") and k[-4:] not in ("_min", "_max")) if rows else 0.9
    key = f"loss_tau{tau:g}"
    name = f"memory probe: {run} loss at τ={tau:g} < {factor:g} x {baseline}'s within {within} steps"
    dec = {r["step"]: r for r in rows if r["run"] == run}
    win = {r["step"]: r for r in rows if r["run"] == baseline}
    common = sorted(set(dec) & set(win))
    if not common:
        return [target(name, f"runs {run!r} and {baseline!r} not both measured", None, None)]
    first = next((s for s in common if s > 0 and dec[s][key] < factor * win[s][key]), None)
    s = first if first is not None else max(s for s in common if s <= max(within, common[0]))
    ratio = dec[s][key] / win[s][key]
    desc = (f"{run} {dec[s][key]:.4f} vs {baseline} {win[s][key]:.4f} at step {s}"
            + ("" if first is not None else f" (never below {factor:g}x in {common[-1]} steps)"))
    out.append(target(name, desc + f"; recall@k {dec[s]['recall']:.3f} (chance {dec[s]['chance']:.3f})",
                      ratio, first is not None and first <= within))
    if "dense" in {r["run"] for r in rows}:
        d = {r["step"]: r for r in rows if r["run"] == "dense"}
        last = max(set(d) & set(win))
        out.append(target(f"memory probe (report): dense loss at τ={tau:g} vs {baseline}'s at the last step",
                          f"dense {d[last][key]:.4f} vs {baseline} {win[last][key]:.4f} at step {last}",
                          d[last][key] / win[last][key], None))
    return out
