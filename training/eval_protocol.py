"""``decmem eval --weights --data``: the WorldMem-style protocol over many clips, every strategy side by side (DESIGN §7).

For each clip (samples of a dataset, in shard order, long enough for ``init_frames + frames`` latents) and each
strategy: the bank starts from the first ``init_frames`` ground-truth latents, ``frames`` latents are generated
along the ground-truth camera path, and the decoded frames are compared with the clip's:

* PSNR / SSIM per generated frame, averaged per clip and then over clips, split into *revisited* frames (at
  least ``revisit_coverage`` of their pixels show surfaces an init frame ``min_gap`` or more frames older also
  saw, by depth + poses: :mod:`training.overlap`) and *novel* ones. Clips without depth fall back to the
  pose rule of :func:`training.evaluate.revisit_mask`; ``eval.json`` records which rule each clip used.
* Retrieval (``decmem``, ``fov_frames``): a bank block is *relevant* to a query frame when at least ``overlap``
  of its pixels are visible in that frame's ground-truth view; recall@k = |read ∩ relevant| / min(k, |relevant|)
  per (layer, head, query block) at the last denoising step, with precision and chance (|relevant| / candidates).
* LPIPS when torchvision's AlexNet weights are already in the torch hub cache (never downloaded); FVD is not
  computed (no I3D weights ship with DecMem). Both are reported with the reason.

Outputs: ``eval.json`` (every number, per-frame arrays), ``eval.md`` (a table per metric × strategy),
``frames.png`` (PSNR / SSIM over frame index per strategy) and ``retrieval_heatmap.png``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from data_pipeline.storage import write_bytes_atomic
from training.evaluate import _clean, _fmt, frame_metrics, revisit_mask
from training.overlap import block_overlap, coverage, pixel_blocks

RETRIEVING = ("decmem", "fov_frames")
METRICS = [  # (section title, key in a strategy's summary, format)
    ("PSNR (dB), revisited frames", "psnr_revisit", ".2f"), ("PSNR (dB), novel frames", "psnr_novel", ".2f"),
    ("PSNR (dB), all generated frames", "psnr_all", ".2f"), ("SSIM, revisited frames", "ssim_revisit", ".4f"),
    ("SSIM, novel frames", "ssim_novel", ".4f"), ("SSIM, all generated frames", "ssim_all", ".4f"),
    ("LPIPS, all generated frames", "lpips_all", ".4f"), ("recall@k of overlapping bank blocks", "recall", ".3f"),
    ("precision@k of overlapping bank blocks", "precision", ".3f"), ("seconds per generated latent", "s_per_latent",
                                                                      ".4g"),
]
TABLE_HEAD = "| strategy | mean | std over clips | clips |"


@dataclass
class EvalArgs:
    """What ``decmem eval --weights`` measures and how a frame counts as revisited or a block as relevant."""

    weights: str = ""
    data: str = ""
    init_frames: int = 24                 # latents given to the model (the bank starts from them)
    frames: int = 16                      # latents generated after them
    strategies: list[str] = field(default_factory=lambda: ["decmem", "dense", "dense_decay", "fov_frames", "window"])
    clips: int = 4                        # the first clips (shard order) with init_frames + frames latents
    sample_steps: int = 0                 # 0: the weights' own diffusion.sample_steps
    seed: int = 0
    device: str = "cpu"
    min_gap: int = 8                      # latents: what the last frames before the rollout saw doesn't count
    revisit_coverage: float = 0.5         # revisited: >= this fraction of pixels seen by an older init frame
    overlap: float = 0.25                 # relevant block: >= this fraction of its pixels visible in the query view
    depth_tol: float = 0.1                # relative depth agreement for "the same surface"
    stride: int = 0                       # pixel stride of the geometry; 0: about 64 samples across the frame
    pos_tol: float = 0.25                 # pose-rule fallback (clips without depth)
    angle_tol_deg: float = 20.0

    def validate(self) -> None:
        from model.attention import STRATEGIES

        for k in ("init_frames", "frames", "clips"):
            if getattr(self, k) < 1:
                raise ValueError(f"eval: {k} must be >= 1, got {getattr(self, k)}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ValueError(f"eval: unknown strategies {bad}; expected a subset of {list(STRATEGIES)}")
        for k in ("revisit_coverage", "overlap"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"eval: {k} must be in (0, 1], got {getattr(self, k)}")


#################################################################################
#                                 Per clip                                      #
#################################################################################

def _lpips():
    """(per-frame LPIPS function or None, why not). Never downloads: the AlexNet weights must be cached."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return None, "unavailable: torchvision is not installed (LPIPS needs its AlexNet; weights are never downloaded)"
    ckpt = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.isfile(ckpt):
        return None, f"unavailable: AlexNet weights not in the local torch hub cache ({ckpt}); never downloaded"
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity as lp

    def fn(gt, gen):
        a = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 127.5 - 1
        b = torch.from_numpy(gen).permute(0, 3, 1, 2).float() / 127.5 - 1
        return np.array([float(lp(b[i:i + 1], a[i:i + 1], net_type="alex")) for i in range(a.shape[0])])
    return fn, f"computed (torchmetrics, AlexNet from {ckpt})"


def _recall(sel_layers, t0: int, keep: int, n_b: int, old: int, rel: dict, budget: int) -> list[tuple]:
    """(recall, precision, chance) per (layer, head, query block, query frame) of one chunk with relevant blocks,
    plus None entries for queries with none. rel[t]: bool [old * n_b] relevance of the candidates to frame t."""
    out = []
    for sel, valid in sel_layers:
        sel, valid = sel[0].numpy(), valid[0].numpy()                              # [H, G, k]
        G = sel.shape[1]
        # fov_frames reads one set per chunk (G = 1); decmem one per query block, n_b of them per frame
        frames_of = [list(range(keep))] * G if G == 1 else [[g // n_b] for g in range(G)]
        cand = valid & (sel < old * n_b)                                            # [H, G, k]
        for g in range(G):
            for q in frames_of[g]:
                if q >= keep:
                    continue
                r = rel[t0 + q]                                                     # [old * n_b]
                n_rel = int(r.sum())
                for h in range(sel.shape[0]):
                    if n_rel == 0:
                        out.append(None)
                        continue
                    picked = sel[h, g][cand[h, g]]
                    hits = int(r[picked].sum())
                    out.append((hits / min(budget, n_rel), hits / max(len(picked), 1), n_rel / r.size))
    return out


def _heat_rows(sel_layers, t0: int, keep: int, n_b: int, total: int) -> np.ndarray:
    """float [keep, total]: fraction of each query frame's valid selections landing in each bank frame."""
    from training.visuals import retrieval_heatmap

    C = max(1, max(s.shape[2] for s, _ in sel_layers) // n_b) if sel_layers else 1
    mat = retrieval_heatmap([{"selected": s, "selected_valid": v} for s, v in sel_layers], C, n_b, t0)
    rows = np.zeros((keep, total))
    rows[:, :t0] = mat[:keep] if mat.shape[0] >= keep else np.repeat(mat[:1], keep, axis=0)
    return rows


def eval_clip(clip: dict, models: dict, diffusion, codec, args: EvalArgs, lpips_fn, log=print) -> dict:
    """Every strategy on one clip: per-frame metrics, revisit split, retrieval recall and heatmaps."""
    from model.rollout import rollout
    from training.generate import clip_inputs

    total = args.init_frames + args.frames
    any_model = next(iter(models.values()))
    latents, K, c2w, actions, _ = clip_inputs(clip, codec, any_model, total, args.device)
    T_src, H, W = clip["frames"].shape[:3]
    first_gen = codec.frame_index(args.init_frames)
    last = min(codec.frame_index(total - 1) + max(1, codec.temporal), T_src)    # source frames the rollout covers
    gen_src = np.arange(first_gen, last)
    stride = args.stride or max(1, min(H, W) // 64)
    gap_src = args.min_gap * max(1, codec.temporal)
    if "depth" in clip:
        cov = coverage(clip, gen_src, range(first_gen), gap_src, args.depth_tol, stride)
        revisit, rule = cov >= args.revisit_coverage, "depth"
    else:
        cov = None
        revisit = revisit_mask(clip["c2w"][:last], first_gen, args.pos_tol, args.angle_tol_deg, gap_src)[first_gen:]
        rule = "pose"
    lay = any_model.layout(*latents.shape[-2:])
    n_b = lay.blocks_per_frame
    blocks = pixel_blocks(H, W, lay.h, lay.w, lay.tile, stride)
    window = any_model.args.attention.window
    rel_cache: dict = {}

    def relevance(t: int, old: int) -> np.ndarray:
        """bool [old * n_b]: candidate bank blocks (frames < old) that latent frame t's view sees enough of."""
        for f in range(old):
            if (f, t) not in rel_cache:
                rel_cache[f, t] = block_overlap(clip, codec.frame_index(f), codec.frame_index(t), blocks, n_b,
                                                args.depth_tol, stride) >= args.overlap
        return np.concatenate([rel_cache[f, t] for f in range(old)]) if old else np.zeros(0, bool)

    res_clip = {"video_id": clip.get("video_id"), "frames": int(T_src), "revisit_rule": rule,
                "generated_frames": gen_src.tolist(), "revisit": revisit, "coverage": cov, "strategies": {}}
    gt = clip["frames"][gen_src]
    for name, model in models.items():
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        t_start = time.perf_counter()
        r = rollout(model, diffusion, latents[:, :args.init_frames], K, c2w, args.frames, actions, g,
                    keep_selections=name in RETRIEVING)
        wall = time.perf_counter() - t_start
        video = codec.decode(r.latents[0])[gen_src]                                   # [n, H, W, 3] uint8
        psnr, ssim = frame_metrics(gt, video)
        row = {"psnr": psnr, "ssim": ssim, "s_per_latent": float(np.median(r.seconds_per_latent())),
               "wall_s": wall, "lpips": lpips_fn(gt, video) if lpips_fn else None}
        if name in RETRIEVING and "depth" in clip and r.selections:
            budget = (model.args.attention.top_k if name == "decmem" else model.args.attention.fov_frames * n_b)
            entries, heat = [], np.zeros((args.frames, total))
            for t0, sel_layers in r.selections:
                keep = min(model.args.chunk_frames, total - t0)
                old = max(0, t0 - (window - 1))
                rel = {t0 + q: relevance(t0 + q, old) for q in range(keep)}
                entries += _recall(sel_layers, t0, keep, n_b, old, rel, budget)
                if sel_layers:
                    heat[t0 - args.init_frames:t0 - args.init_frames + keep] = _heat_rows(sel_layers, t0, keep, n_b,
                                                                                          total)
            scored = [e for e in entries if e is not None]
            row.update(budget_blocks=budget, queries=len(entries), queries_without_relevant=len(entries) - len(scored),
                       recall=float(np.mean([e[0] for e in scored])) if scored else None,
                       precision=float(np.mean([e[1] for e in scored])) if scored else None,
                       chance=float(np.mean([e[2] for e in scored])) if scored else None, heatmap=heat)
        res_clip["strategies"][name] = row
        log(f"eval: {clip.get('video_id')}: {name}: PSNR {np.mean(psnr):.2f} dB"
            + (f", recall@k {row['recall']:.3f} (chance {row['chance']:.3f})" if row.get("recall") is not None else ""))
    if "depth" in clip:
        # ground truth for the heatmap: fraction of each bank frame's blocks relevant to each generated frame
        truth = np.zeros((args.frames, total))
        for i, t in enumerate(range(args.init_frames, total)):
            truth[i, :t] = relevance(t, t).reshape(t, n_b).mean(axis=1)
        res_clip["true_overlap"] = truth
    return res_clip


#################################################################################
#                              Over clips, outputs                              #
#################################################################################

def _split_means(vals: np.ndarray, revisit: np.ndarray) -> dict:
    m = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
    return {"revisit": m(vals[revisit]), "novel": m(vals[~revisit]), "all": m(vals)}


def summarize(clips: list[dict], strategies: list[str]) -> dict:
    """Per strategy and metric: mean and std over clips of the per-clip means, and how many clips had any."""
    out = {}
    for name in strategies:
        per = {k: [] for _, k, _ in METRICS}
        for c in clips:
            row, rev = c["strategies"][name], np.asarray(c["revisit"], bool)
            for metric in ("psnr", "ssim"):
                for part, v in _split_means(np.asarray(row[metric]), rev).items():
                    per[f"{metric}_{part}"].append(v)
            per["lpips_all"].append(float(np.mean(row["lpips"])) if row.get("lpips") is not None else None)
            for k in ("recall", "precision", "s_per_latent"):
                per[k].append(row.get(k))
            per.setdefault("chance", []).append(row.get("chance"))
        out[name] = {}
        for k, vals in per.items():
            vals = [v for v in vals if v is not None]
            out[name][k] = {"mean": float(np.mean(vals)) if vals else None,
                            "std": float(np.std(vals)) if len(vals) > 1 else None, "clips": len(vals)}
    return out


def run_eval(args: EvalArgs, out_dir: str, log=print) -> dict:
    """The whole protocol; writes eval.json, eval.md, frames.png and retrieval_heatmap.png into ``out_dir``."""
    from data_pipeline.clip import iter_clip_sources
    from model.codec import make_codec
    from model.diffusion import DiffusionArgs
    from training.weights import load_weights

    args.validate()
    models, wcfg = {}, None
    for name in args.strategies:
        ov = [f"model.attention.strategy={name}"] + ([f"diffusion.sample_steps={args.sample_steps}"]
                                                      if args.sample_steps else [])
        model, wcfg = load_weights(args.weights, args.device, overrides=ov)
        model.eval()
        models[name] = model
    diffusion = DiffusionArgs(**vars(wcfg.diffusion))
    codec = make_codec(wcfg.codec, args.device)
    lpips_fn, lpips_status = _lpips()
    total = args.init_frames + args.frames
    clips, short = [], []
    for clip in iter_clip_sources(args.data):
        n_lat = codec.latent_frames(clip["frames"].shape[0]) if codec.temporal > 1 else clip["frames"].shape[0]
        if n_lat < total:
            short.append({"video_id": clip.get("video_id"), "latents": int(n_lat)})
            continue
        clips.append(eval_clip(clip, models, diffusion, codec, args, lpips_fn, log))
        if len(clips) >= args.clips:
            break
    if not clips:
        raise ValueError(f"{args.data}: no clip has {total} latent frames (--init-frames {args.init_frames} + "
                         f"--frames {args.frames}); {len(short)} shorter clip(s) skipped")
    if short:
        log(f"eval: skipped {len(short)} clip(s) shorter than {total} latents")
    summary = summarize(clips, args.strategies)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(os.path.abspath(out_dir), k) for k in ("eval.json", "eval.md", "frames.png",
                                                                    "retrieval_heatmap.png")}
    from training.eval_plots import plot_frames, plot_heatmaps

    plot_frames(paths["frames.png"], clips, args.strategies)
    heat = plot_heatmaps(paths["retrieval_heatmap.png"], clips[0], args.strategies)
    if not heat:
        paths.pop("retrieval_heatmap.png")
    result = _clean({
        "args": asdict(args), "weights": os.path.abspath(args.weights), "codec": wcfg.codec,
        "sample_steps": diffusion.sample_steps,
        "attention": {n: vars(m.args.attention) for n, m in models.items()},
        "lpips": lpips_status,
        "fvd": "unavailable: FVD needs I3D weights, which DecMem neither ships nor downloads; not computed",
        "clips": clips, "skipped_short_clips": short, "summary": summary, "paths": paths,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    })
    write_bytes_atomic(paths["eval.json"], json.dumps(result, indent=1).encode())
    with open(paths["eval.md"], "w") as f:
        f.write(report(result))
    log(f"eval: {len(clips)} clip(s) x {len(args.strategies)} strategies -> {out_dir}")
    return result


def report(res: dict) -> str:
    """eval.md: the protocol in words, then one table per metric (rows: strategies)."""
    a = res["args"]
    rules = sorted({c["revisit_rule"] for c in res["clips"]})
    n_rev = [int(np.sum(c["revisit"])) for c in res["clips"]]
    L = ["# DecMem evaluation", "",
         f"- weights `{res['weights']}`, data `{a['data']}`, codec `{res['codec']}`, "
         f"{res['sample_steps']} sampling steps, seed {a['seed']}",
         f"- {len(res['clips'])} clip(s): " + ", ".join(f"`{c['video_id']}`" for c in res["clips"])
         + (f"; {len(res['skipped_short_clips'])} shorter clip(s) skipped" if res["skipped_short_clips"] else ""),
         f"- bank initialised with {a['init_frames']} ground-truth latents, {a['frames']} latents generated along "
         "the ground-truth camera path",
         f"- revisited frame: >= {a['revisit_coverage']:.0%} of its pixels show surfaces an init frame >= "
         f"{a['min_gap']} latents older saw (rule: {', '.join(rules)}; depth agreement {a['depth_tol']:.0%}); "
         f"revisited frames per clip: {n_rev}",
         f"- relevant bank block: >= {a['overlap']:.0%} of its pixels visible in the query frame's view; "
         "recall@k = |read ∩ relevant| / min(k, |relevant|) per (layer, head, query block)",
         "- metrics are averaged per clip, then over clips (mean, std over clips, clips counted)",
         f"- LPIPS: {res['lpips']}", f"- FVD: {res['fvd']}", ""]
    for title, key, spec in METRICS:
        if key == "lpips_all" and not any(s[key]["clips"] for s in res["summary"].values()):
            L += [f"## {title}", "", f"Not measured: {res['lpips']}.", ""]
            continue
        L += [f"## {title}", "", TABLE_HEAD, "|---|---:|---:|---:|"]
        for name, s in res["summary"].items():
            m = s.get(key, {"mean": None, "std": None, "clips": 0})
            if key in ("recall", "precision") and name not in RETRIEVING:
                continue
            L.append(f"| {name} | {_fmt(m['mean'], spec)} | {_fmt(m['std'], spec)} | {m['clips']} |")
        if key == "recall":
            ch = ", ".join(f"{n} {_fmt(res['summary'][n]['chance']['mean'], '.3f')}" for n in res["summary"]
                           if n in RETRIEVING)
            L += ["", f"Chance (|relevant| / candidate blocks): {ch}"]
        L.append("")
    L += ["Files: `eval.json` (every number, per-frame arrays), `frames.png` (PSNR / SSIM over frame index), "
          "`retrieval_heatmap.png` (first clip: true overlap vs blocks read).", ""]
    return "\n".join(L)


def parse_tables(md: str) -> dict:
    """{section title: {strategy: {"mean", "std", "clips"}}} from eval.md (n/a as None)."""
    out, title, lines = {}, None, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.strip() == TABLE_HEAD and title:
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                name, mean, std, n = [c.strip() for c in row.strip("|").split("|")]
                num = lambda c: None if c == "n/a" else float(c)  # noqa: E731
                rows[name] = {"mean": num(mean), "std": num(std), "clips": int(n)}
            out[title] = rows
    return out
