"""``decmem eval --weights --data``: the WorldMem-style protocol over many clips, every strategy side by side (DESIGN §7).

For each clip (samples of a dataset, in shard order, long enough for ``init_frames + frames`` latents) and each
strategy: the bank starts from the first ``init_frames`` ground-truth latents, ``frames`` latents are generated
along the ground-truth camera path, and the decoded frames are compared with the clip's:

* PSNR / SSIM per generated frame, averaged per clip and then over clips, split into *revisited* frames (at
  least ``revisit_coverage`` of their pixels show surfaces an init frame ``min_gap`` or more frames older also
  saw, by depth + poses: :mod:`data_pipeline.overlap`) and *novel* ones. Clips without depth fall back to the
  pose rule of :func:`evaluation.revisits.revisit_mask`; ``eval.json`` records which rule each clip used.
* Retrieval (``decmem``, ``fov_frames``) at the last denoising step. ``relevance`` "block" (the default): a bank
  block is *relevant* to a query block when at least ``block_overlap`` of the query block's pixels, back-projected
  with the ground-truth depth, land in it with depth agreement (the bank frame shows that very surface there:
  :func:`data_pipeline.overlap.block_relevance`); recall@k = |read ∩ relevant| / min(k, |relevant|) per (layer, head,
  query block) against that query block's own relevant set, with precision and chance (|relevant| / candidates).
  fov_frames reads one set per chunk: it is scored against every query block's set, as decmem's are. ``relevance``
  "frame" (the earlier rule): a bank block is relevant to a whole query frame when at least ``overlap`` of its
  pixels are visible in that frame's view; most bank blocks of a revisiting clip are, so chance is high and
  recall cannot tell a query block that found its own content from one that read another part of the view.
  Long rollouts score every ``recall_every``-th chunk only (by default about 32 chunks in all), so the geometry
  grows linearly with the number of generated latents, not quadratically (600 after 24 take seconds).
* Attention dispersion per generated latent (the paper's measure): the memory read's softmax mass on keys of
  weight < 0.02 (*low*) and > 0.05 (*high*) at its chunk's last denoising step; means over all generated frames
  and over their first vs last quarter (dense spreads ever more mass over negligible keys as the bank grows).
* Seconds per chunk (sampling + encoding into the bank, plus the read statistics of the last step): the list per
  strategy, and the mean of the first vs the last 10% of the chunks with their ratio.
* LPIPS when torchvision's AlexNet weights are already in the torch hub cache (never downloaded); FVD is not
  computed (no I3D weights ship with DecMem). Both are reported with the reason.

``weights`` is one folder (the strategy is an inference-time switch of the same weights) or
``STRATEGY=DIR[,STRATEGY=DIR...]``: separately trained models, which must share the codec and latent geometry.
``frames_for`` rolls a slow strategy out for fewer latents; its per-frame metrics cover only those.

Outputs: ``eval.json`` (every number, per-frame arrays), ``eval.md`` (a table per metric × strategy),
``frames.png`` (PSNR / SSIM over frame index per strategy; long rollouts: smoothed PSNR, the paper's Fig. 7),
``dispersion.png``, ``chunk_seconds.png`` and ``retrieval_heatmap.png``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from decmem.data_pipeline.clip import iter_clip_sources
from decmem.data_pipeline.overlap import block_overlap, block_relevance, coverage, pixel_blocks
from decmem.data_pipeline.storage import write_bytes_atomic
from decmem.evaluation.figures import plot_chunk_seconds, plot_dispersion, plot_frames, plot_heatmaps
from decmem.evaluation.generate import clip_inputs
from decmem.evaluation.metrics import frame_metrics, lpips_fn
from decmem.evaluation.report import fmt, json_safe
from decmem.evaluation.revisits import revisit_mask
from decmem.model.attention import STRATEGIES
from decmem.model.codec import make_codec
from decmem.model.diffusion import DiffusionArgs
from decmem.model.rollout import rollout
from decmem.training.visuals import retrieval_heatmap
from decmem.training.weights import load_weights

RETRIEVING = ("decmem", "fov_frames")
ALL_STRATEGIES = ["decmem", "dense", "dense_decay", "fov_frames", "window"]   # one weights folder: every strategy
METRICS = [  # (section title, key in a strategy's summary, format)
    ("PSNR (dB), revisited frames", "psnr_revisit", ".2f"), ("PSNR (dB), novel frames", "psnr_novel", ".2f"),
    ("PSNR (dB), all generated frames", "psnr_all", ".2f"),
    ("PSNR (dB), frames only memory holds (out of the window, seen before it)", "psnr_memory", ".2f"),
    ("SSIM, revisited frames", "ssim_revisit", ".4f"),
    ("SSIM, novel frames", "ssim_novel", ".4f"), ("SSIM, all generated frames", "ssim_all", ".4f"),
    ("SSIM, frames only memory holds", "ssim_memory", ".4f"),
    ("LPIPS, all generated frames", "lpips_all", ".4f"), ("recall@k of overlapping bank blocks", "recall", ".3f"),
    ("precision@k of overlapping bank blocks", "precision", ".3f"), ("seconds per generated latent", "s_per_latent",
                                                                      ".4g"),
    ("dispersion: attention mass on weak keys (< 0.02), all generated frames", "dispersion_low", ".4f"),
    ("dispersion: attention mass on weak keys (< 0.02), first quarter", "dispersion_low_first", ".4f"),
    ("dispersion: attention mass on weak keys (< 0.02), last quarter", "dispersion_low_last", ".4f"),
    ("dispersion: attention mass on strong keys (> 0.05), all generated frames", "dispersion_high", ".4f"),
    ("dispersion: attention mass on strong keys (> 0.05), first quarter", "dispersion_high_first", ".4f"),
    ("dispersion: attention mass on strong keys (> 0.05), last quarter", "dispersion_high_last", ".4f"),
    ("seconds per chunk, first 10% of the chunks", "chunk_s_first", ".4g"),
    ("seconds per chunk, last 10% of the chunks", "chunk_s_last", ".4g"),
    ("seconds per chunk, last 10% / first 10%", "chunk_s_ratio", ".3f"),
]
TABLE_HEAD = "| strategy | mean | std over clips | clips |"
# relevance rule -> (what makes a bank block relevant, with {th} its threshold; what the heatmap's truth panel shows)
RELEVANCE = {
    "block": (("a bank block is relevant to a query block when >= {th:.0%} of the query block's pixels (valid depth) "
               "land in it and show the same surface there (depth agreement)"),
              "share of the frame's query blocks with a relevant block in the bank frame"),
    "frame": (("a bank block is relevant to a query frame when >= {th:.0%} of its pixels are visible in that "
               "frame's view"), "share of the bank frame's blocks relevant to the frame"),
}
RECALL_CHUNKS = 32      # recall_every 0: score every chunk up to this many, else about this many spread evenly
# What separately trained weights must share to be compared: frames decode, tile into tokens and retrieval
# blocks (the relevance ground truth), and chunk the same way.
GEOMETRY = [("codec", lambda c: c.codec), ("frame size", lambda c: list(c.frame_hw)),
            ("latent channels", lambda c: c.model.latent_channels), ("patch size", lambda c: c.model.patch_size),
            ("retrieval block size", lambda c: c.model.attention.block_size),
            ("chunk frames", lambda c: c.model.chunk_frames), ("action size", lambda c: c.model.action_dim)]


def weights_map(spec: str) -> dict[str, str]:
    """``STRATEGY=DIR[,STRATEGY=DIR...]`` -> {strategy: DIR}; {} for one folder (which every strategy reads)."""
    items = [i.strip() for i in spec.split(",")]
    if not all(i.partition("=")[0].strip() in STRATEGIES and i.partition("=")[2].strip() for i in items):
        return {}
    out: dict[str, str] = {}
    for name, _, folder in (i.partition("=") for i in items):
        if name.strip() in out:
            raise ValueError(f"eval: --weights names strategy {name.strip()!r} twice")
        out[name.strip()] = folder.strip()
    return out


def parse_frames_for(s: str) -> tuple[str, int]:
    """``STRATEGY=M`` (``--frames-for``) -> (strategy, M)."""
    name, sep, n = (p.strip() for p in s.partition("="))
    try:
        if sep and int(n) >= 1:
            return name, int(n)
    except ValueError:
        pass
    raise ValueError(f"--frames-for: expected STRATEGY=M with M >= 1, got {s!r}")


@dataclass
class EvalArgs:
    """What ``decmem eval --weights`` measures and how a frame counts as revisited or a block as relevant."""

    weights: str = ""                     # one folder, or STRATEGY=DIR[,STRATEGY=DIR...]
    data: str = ""
    init_frames: int = 24                 # latents given to the model (the bank starts from them)
    frames: int = 16                      # latents generated after them
    strategies: list[str] = field(default_factory=list)   # empty: the mapping's keys, or ALL_STRATEGIES
    frames_for: dict = field(default_factory=dict)        # {strategy: latents}: fewer than ``frames`` for slow ones
    recall_every: int = 0                 # score recall on every N-th chunk; 0: every chunk up to RECALL_CHUNKS
    clips: int = 4                        # the first clips (shard order) with init_frames + frames latents
    sample_steps: int = 0                 # 0: the weights' own diffusion.sample_steps
    seed: int = 0
    device: str = "cpu"
    min_gap: int = 8                      # latents: what the last frames before the rollout saw doesn't count
    revisit_coverage: float = 0.5         # revisited: >= this fraction of pixels seen by an older init frame
    relevance: str = "block"              # block: a query block's own surface; frame: the query frame's view
    block_overlap: float = 0.1            # block rule: >= this fraction of the query block's pixels in the bank block
    overlap: float = 0.25                 # frame rule: >= this fraction of the bank block visible in the query view
    depth_tol: float = 0.1                # relative depth agreement for "the same surface"
    stride: int = 0                       # pixel stride of the geometry; 0: about 64 samples across the frame
    pos_tol: float = 0.25                 # pose-rule fallback (clips without depth)
    angle_tol_deg: float = 20.0

    def validate(self) -> None:
        """Check the arguments; empty ``strategies`` become the weights mapping's keys (or ALL_STRATEGIES)."""
        for k in ("init_frames", "frames", "clips"):
            if getattr(self, k) < 1:
                raise ValueError(f"eval: {k} must be >= 1, got {getattr(self, k)}")
        per = weights_map(self.weights)
        self.strategies = list(self.strategies or per or ALL_STRATEGIES)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"eval: unknown strategies {bad}; expected a subset of {list(STRATEGIES)}")
        if per and set(self.strategies) - set(per):
            raise ValueError(f"eval: no weights for {sorted(set(self.strategies) - set(per))}: --weights names "
                             f"{', '.join(per)}")
        for name, n in self.frames_for.items():
            if name not in self.strategies or not 1 <= n <= self.frames:
                raise ValueError(f"eval: --frames-for {name}={n}: expected one of the evaluated strategies "
                                 f"({', '.join(self.strategies)}) and 1 <= M <= --frames {self.frames}")
        if self.recall_every < 0:
            raise ValueError(f"eval: recall_every must be >= 0, got {self.recall_every}")
        if self.relevance not in RELEVANCE:
            raise ValueError(f"eval: relevance must be one of {list(RELEVANCE)}, got {self.relevance!r}")
        for k in ("revisit_coverage", "overlap", "block_overlap"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"eval: {k} must be in (0, 1], got {getattr(self, k)}")

    def weights_for(self) -> dict[str, str]:
        """{strategy: absolute weights folder} for the evaluated strategies."""
        per = weights_map(self.weights)
        return {s: os.path.abspath(per.get(s, self.weights)) for s in self.strategies}

    def recall_stride(self, chunks: int) -> int:
        """Score recall on chunks 0, N, 2N, ... of a rollout of ``chunks`` chunks: this N."""
        return self.recall_every or max(1, math.ceil(chunks / RECALL_CHUNKS))

    def relevance_rule(self) -> dict:
        """What eval.json records of the relevance ground truth: rule, threshold, depth tolerance, in words."""
        th = self.block_overlap if self.relevance == "block" else self.overlap
        relevant, truth = RELEVANCE[self.relevance]
        return {"rule": self.relevance, "threshold": th, "depth_tol": self.depth_tol,
                "relevant": relevant.format(th=th), "true_overlap": truth}


#################################################################################
#                                 Per clip                                      #
#################################################################################

def _recall(sel_layers, t0: int, keep: int, n_b: int, old: int, rel: dict, budget: int) -> list[tuple]:
    """(recall, precision, chance) per (layer, selection, query, head) of one chunk with relevant blocks, plus None
    entries for queries with none.

    rel[t]: bool [n_q, old * n_b], the candidates relevant to each query of frame t: its n_b query blocks (block
    rule) or the one whole frame (n_q = 1, frame rule). decmem selects per query block, n_b per frame (query block
    g is block g % n_b of frame g // n_b): scored against that block's row (the frame's only row under the frame
    rule). fov_frames reads one set per chunk (G = 1): scored against every query of every frame in the chunk.
    """
    out = []
    for sel, valid in sel_layers:
        sel, valid = sel[0].numpy(), valid[0].numpy()                              # [H, G, k]
        G = sel.shape[1]
        cand = valid & (sel < old * n_b)                                            # [H, G, k]
        for g in range(G):
            if G == 1:                                                              # fov_frames: every query
                queries = [row for q in range(keep) for row in rel[t0 + q]]
            elif g // n_b < keep:                                                   # decmem: this query block's
                rows = rel[t0 + g // n_b]
                queries = [rows[g % n_b if len(rows) > 1 else 0]]
            else:                                                                   # a frame past the rollout
                continue
            for r in queries:                                                       # [old * n_b]
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
    C = max(1, max(s.shape[2] for s, _ in sel_layers) // n_b) if sel_layers else 1
    mat = retrieval_heatmap([{"selected": s, "selected_valid": v} for s, v in sel_layers], C, n_b, t0)
    rows = np.zeros((keep, total))
    rows[:, :t0] = mat[:keep] if mat.shape[0] >= keep else np.repeat(mat[:1], keep, axis=0)
    return rows


def _memory_only(clip: dict, frames: np.ndarray, recent: int, share: float, depth_tol: float, stride: int) -> np.ndarray:
    """bool [len(frames)]: frames that only long-term memory can show: the ``recent`` frames before each (what the
    local window holds besides the frame's own chunk) see < ``share`` of its pixels, and the older frames of the
    clip, ground truth or generated alike, see >= ``share`` (depth + poses of the ground truth)."""
    out = np.zeros(len(frames), bool)
    for i, t in enumerate(frames):
        split = max(0, t - recent)
        if split and coverage(clip, [t], range(split, t), 0, depth_tol, stride)[0] < share:
            out[i] = coverage(clip, [t], range(split), 0, depth_tol, stride)[0] >= share
    return out


def eval_clip(clip: dict, models: dict, diffusions: dict, codec, args: EvalArgs, lpips, log=print) -> dict:
    """Every strategy on one clip: per-frame metrics, revisit split, dispersion, chunk seconds, retrieval recall
    and heatmaps (on the scored chunks)."""
    total = args.init_frames + args.frames
    any_model = next(iter(models.values()))
    latents, K, c2w, actions, _ = clip_inputs(clip, codec, any_model, total, args.device)
    T_src, H, W = clip["frames"].shape[:3]
    # a time-compressing (causal) autoencoder decodes latent i >= 1 to frames frame_index(i-1)+1 .. frame_index(i):
    # the first generated latent's frames start right after the last init latent's
    first_gen = codec.frame_index(args.init_frames - 1) + 1

    def src_end(n: int) -> int:
        """End (exclusive) of the source frames that the first n generated latents decode to."""
        return min(codec.frame_index(args.init_frames + n - 1) + 1, T_src)

    gen_src = np.arange(first_gen, src_end(args.frames))
    stride = args.stride or max(1, min(H, W) // 64)
    gap_src = args.min_gap * max(1, codec.temporal)
    mem_masks: dict[int, np.ndarray] = {}

    def memory_only_for(model) -> np.ndarray:
        """Frames only long-term memory can show *to this model* (what its own ALM window holds differs by W);
        none without depth."""
        if "depth" not in clip:
            return np.zeros(len(gen_src), bool)
        recent = (model.args.attention.window - 1) * max(1, codec.temporal)
        if recent not in mem_masks:
            mem_masks[recent] = _memory_only(clip, gen_src, recent, args.revisit_coverage, args.depth_tol, stride)
        return mem_masks[recent]

    memory_only = memory_only_for(any_model)                       # the clip's: the first model's window
    if "depth" in clip:
        cov = coverage(clip, gen_src, range(first_gen), gap_src, args.depth_tol, stride)
        revisit, rule = cov >= args.revisit_coverage, "depth"
    else:
        cov = None
        revisit = revisit_mask(clip["c2w"][:gen_src[-1] + 1], first_gen, args.pos_tol, args.angle_tol_deg,
                               gap_src)[first_gen:]
        rule = "pose"
    # the retrieval blocks of recall's ground truth: a retrieving model's (they agree; window/dense may differ)
    lay = next((m for n, m in models.items() if n in RETRIEVING), any_model).layout(*latents.shape[-2:])
    n_b = lay.blocks_per_frame
    blocks = pixel_blocks(H, W, lay.h, lay.w, lay.tile)             # every pixel: query pixels land on any of them
    C = any_model.args.chunk_frames                                  # shared: checked with the geometry
    every = args.recall_stride(math.ceil(args.frames / C))
    # the generated latents whose relevance is scored: those of chunks 0, every, 2 * every, ...
    scored = [t for t in range(args.init_frames, total) if (t - args.init_frames) // C % every == 0]
    rel_cache: dict = {}

    def relevance(t: int, old: int) -> np.ndarray:
        """bool [n_q, old * n_b]: candidate bank blocks (frames < old) relevant to latent frame t's queries: each
        of its n_b query blocks (block rule), or the frame as one query (n_q = 1, frame rule)."""
        for f in range(old):
            if (f, t) not in rel_cache:
                fs, ts = codec.frame_index(f), codec.frame_index(t)
                if args.relevance == "block":
                    frac = block_relevance(clip, fs, ts, blocks, n_b, args.depth_tol, stride)     # [n_b, n_b]
                    rel_cache[f, t] = frac >= args.block_overlap
                else:
                    frac = block_overlap(clip, fs, ts, blocks[::stride, ::stride], n_b, args.depth_tol, stride)
                    rel_cache[f, t] = frac[None] >= args.overlap                                 # [1, n_b]
        n_q = n_b if args.relevance == "block" else 1
        return np.concatenate([rel_cache[f, t] for f in range(old)], axis=1) if old else np.zeros((n_q, 0), bool)

    res_clip = {"video_id": clip.get("video_id"), "frames": int(T_src), "revisit_rule": rule,
                "generated_frames": gen_src.tolist(), "revisit": revisit, "coverage": cov, "memory_only": memory_only,
                "recall_every": every,
                "scored_frames": [t - args.init_frames for t in scored], "strategies": {}}
    gt = clip["frames"][gen_src]
    for name, model in models.items():
        n_new = args.frames_for.get(name, args.frames)
        n_src = src_end(n_new) - first_gen                                           # its generated source frames
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        t_start = time.perf_counter()
        r = rollout(model, diffusions[name], latents[:, :args.init_frames], K, c2w, n_new, actions, g,
                    keep_selections=name in RETRIEVING, keep_stats=True)
        wall = time.perf_counter() - t_start
        video = codec.decode(r.latents[0])[gen_src[:n_src]]                          # [n_src, H, W, 3] uint8
        psnr, ssim = frame_metrics(gt[:n_src], video)
        row = {"generated_latents": n_new, "psnr": psnr, "ssim": ssim,
               "s_per_latent": float(np.median(r.seconds_per_latent())), "chunk_seconds": r.chunk_seconds,
               "dispersion_low": r.dispersion_low, "dispersion_high": r.dispersion_high, "wall_s": wall,
               "lpips": lpips(gt[:n_src], video) if lpips else None,
               "memory_only": memory_only_for(model).tolist()}
        if name in RETRIEVING and "depth" in clip and r.selections:
            window = model.args.attention.window
            budget = (model.args.attention.top_k if name == "decmem" else model.args.attention.fov_frames * n_b)
            rows = [t for t in scored if t < args.init_frames + n_new]
            entries, heat = [], np.zeros((len(rows), total))                        # [scored frames, bank frames]
            for t0, sel_layers in r.selections:
                if (t0 - args.init_frames) // C % every:
                    continue
                keep = min(C, args.init_frames + n_new - t0)
                old = max(0, t0 - (window - 1))
                rel = {t0 + q: relevance(t0 + q, old) for q in range(keep)}
                entries += _recall(sel_layers, t0, keep, n_b, old, rel, budget)
                if sel_layers:
                    i = rows.index(t0)
                    heat[i:i + keep] = _heat_rows(sel_layers, t0, keep, n_b, total)
            scored_entries = [e for e in entries if e is not None]
            recall, precision, chance = (float(np.mean([e[j] for e in scored_entries])) if scored_entries else None
                                         for j in range(3))
            row.update(budget_blocks=budget, queries=len(entries),
                       queries_without_relevant=len(entries) - len(scored_entries), recall=recall,
                       precision=precision, chance=chance, heatmap=heat)
        res_clip["strategies"][name] = row
        log(f"eval: {clip.get('video_id')}: {name}: {n_new} latents in {wall:.1f} s, PSNR {np.mean(psnr):.2f} dB"
            + (f", recall@k {row['recall']:.3f} (chance {row['chance']:.3f})" if row.get("recall") is not None else ""))
    if "depth" in clip:
        # ground truth for the heatmap, one value per (scored frame, bank frame), as the strategies' panels are:
        # block rule, the share of the frame's query blocks the bank frame holds a relevant block for; frame rule,
        # the share of the bank frame's blocks relevant to the frame
        truth = np.zeros((len(scored), total))
        for i, t in enumerate(scored):
            r = relevance(t, t).reshape(-1, t, n_b)                                  # [n_q, bank frames, n_b]
            truth[i, :t] = r.any(axis=2).mean(axis=0) if args.relevance == "block" else r[0].mean(axis=1)
        res_clip["true_overlap"] = truth
    return res_clip


#################################################################################
#                              Over clips, outputs                              #
#################################################################################

def _split_means(vals: np.ndarray, revisit: np.ndarray, memory_only: np.ndarray) -> dict:
    m = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
    return {"revisit": m(vals[revisit]), "novel": m(vals[~revisit]), "all": m(vals), "memory": m(vals[memory_only])}


def ends(x, share: float) -> tuple[float, float] | None:
    """(mean of the first, mean of the last) ``share`` of x, at least one element each; None if x is empty."""
    x = np.asarray(x, dtype=np.float64)
    if not x.size:
        return None
    n = max(1, int(len(x) * share))
    return float(x[:n].mean()), float(x[-n:].mean())


def summarize(clips: list[dict], strategies: list[str]) -> dict:
    """Per strategy and metric: mean and std over clips of the per-clip means, and how many clips had any.

    A strategy rolled out for fewer frames (``frames_for``) counts only those: its revisit mask is cut to them.
    Dispersion first/last: the first and the last quarter of its generated latents; chunk seconds first/last:
    the first and the last 10% of its chunks (at least one each), and their ratio.
    """
    out = {}
    for name in strategies:
        per = {k: [] for _, k, _ in METRICS}
        for c in clips:
            row = c["strategies"][name]
            for metric in ("psnr", "ssim"):
                vals = np.asarray(row[metric])
                # memory-only frames depend on the model's own ALM window: the row's mask (older eval.json: clip's)
                mem = row.get("memory_only", c["memory_only"])
                masks = (np.asarray(m[:len(vals)], bool) for m in (c["revisit"], mem))
                for part, v in _split_means(vals, *masks).items():
                    per[f"{metric}_{part}"].append(v)
            per["lpips_all"].append(float(np.mean(row["lpips"])) if row.get("lpips") is not None else None)
            for k in ("recall", "precision", "s_per_latent"):
                per[k].append(row.get(k))
            per.setdefault("chance", []).append(row.get("chance"))
            for k in ("dispersion_low", "dispersion_high"):
                q = ends(row[k], 0.25)
                per[k].append(float(np.mean(row[k])) if q else None)
                per[f"{k}_first"].append(q[0] if q else None)
                per[f"{k}_last"].append(q[1] if q else None)
            e = ends(row["chunk_seconds"], 0.1)
            per["chunk_s_first"].append(e[0] if e else None)
            per["chunk_s_last"].append(e[1] if e else None)
            per["chunk_s_ratio"].append(e[1] / e[0] if e and e[0] > 0 else None)
            per.setdefault("generated_latents", []).append(row["generated_latents"])
        out[name] = {}
        for k, vals in per.items():
            vals = [v for v in vals if v is not None]
            out[name][k] = {"mean": float(np.mean(vals)) if vals else None,
                            "std": float(np.std(vals)) if len(vals) > 1 else None, "clips": len(vals)}
    return out


def check_geometry(cfgs: dict, folders: dict) -> None:
    """Refuse weights folders that differ in codec or latent geometry (GEOMETRY), naming both and what differs;
    the block size binds only the strategies that retrieve blocks.

    cfgs: {strategy: WeightsConfig}, folders: {strategy: folder}.
    """
    names = list(cfgs)
    retrieving = [n for n in names if n in RETRIEVING]
    blocks = [g for g in GEOMETRY if g[0] == "retrieval block size"]
    pairs = [(names[0], n, [g for g in GEOMETRY if g not in blocks]) for n in names[1:]]
    pairs += [(retrieving[0], n, blocks) for n in retrieving[1:]]   # window and dense read no retrieval blocks
    for ref, name, geometry in pairs:
        rc, c = cfgs[ref], cfgs[name]
        diff = [f"{what} {get(rc)!r} vs {get(c)!r}" for what, get in geometry if get(rc) != get(c)]
        if diff:
            raise ValueError(f"eval: weights {folders[ref]} ({ref}) and {folders[name]} ({name}) differ in "
                             f"{'; '.join(diff)}: strategies are compared only on one codec and latent geometry")


def run_eval(args: EvalArgs, out_dir: str, log=print) -> dict:
    """The whole protocol; writes eval.json, eval.md and the plots (frames, dispersion, chunk seconds, retrieval
    heatmap) into ``out_dir``."""
    args.validate()
    folders = args.weights_for()
    models, cfgs = {}, {}
    for name in args.strategies:
        ov = [f"model.attention.strategy={name}"] + ([f"diffusion.sample_steps={args.sample_steps}"]
                                                      if args.sample_steps else [])
        model, cfgs[name] = load_weights(folders[name], args.device, overrides=ov)
        models[name] = model.eval()
    check_geometry(cfgs, folders)
    diffusions = {n: DiffusionArgs(**vars(c.diffusion)) for n, c in cfgs.items()}
    codec = make_codec(cfgs[args.strategies[0]].codec, args.device)
    lpips, lpips_status = lpips_fn()
    total = args.init_frames + args.frames
    clips, short = [], []
    for clip in iter_clip_sources(args.data):
        n_lat = codec.latent_frames(clip["frames"].shape[0]) if codec.temporal > 1 else clip["frames"].shape[0]
        if n_lat < total:
            short.append({"video_id": clip.get("video_id"), "latents": int(n_lat)})
            continue
        clips.append(eval_clip(clip, models, diffusions, codec, args, lpips, log))
        if len(clips) >= args.clips:
            break
    if not clips:
        raise ValueError(f"{args.data}: no clip has {total} latent frames (--init-frames {args.init_frames} + "
                         f"--frames {args.frames}); {len(short)} shorter clip(s) skipped")
    if short:
        log(f"eval: skipped {len(short)} clip(s) shorter than {total} latents")
    summary = summarize(clips, args.strategies)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(os.path.abspath(out_dir), k) for k in (
        "eval.json", "eval.md", "frames.png", "dispersion.png", "chunk_seconds.png", "retrieval_heatmap.png")}

    smooth = plot_frames(paths["frames.png"], clips, args.strategies)
    plot_dispersion(paths["dispersion.png"], clips, args.strategies)
    plot_chunk_seconds(paths["chunk_seconds.png"], clips, args.strategies)
    relevance = args.relevance_rule()
    heat = plot_heatmaps(paths["retrieval_heatmap.png"], clips[0], args.strategies, relevance["true_overlap"])
    if not heat:
        paths.pop("retrieval_heatmap.png")
    result = json_safe({
        "args": asdict(args), "weights": folders, "codec": cfgs[args.strategies[0]].codec,
        "sample_steps": {n: d.sample_steps for n, d in diffusions.items()},
        "attention": {n: vars(m.args.attention) for n, m in models.items()}, "frames_smoothing": smooth,
        "relevance": relevance, "lpips": lpips_status,
        "fvd": "unavailable: FVD needs I3D weights, which DecMem neither ships nor downloads; not computed",
        "clips": clips, "skipped_short_clips": short, "summary": summary, "paths": paths,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    })
    write_bytes_atomic(paths["eval.json"], json.dumps(result, indent=1).encode())
    with open(paths["eval.md"], "w") as f:
        f.write(report(result))
    log(f"eval: {len(clips)} clip(s) x {len(args.strategies)} strategies -> {out_dir}")
    return result


def _arrow(s: dict, key: str, spec: str) -> str:
    """'first → last' of a summary's <key>_first / <key>_last means."""
    return f"{fmt(s[key + '_first']['mean'], spec)} → {fmt(s[key + '_last']['mean'], spec)}"


def report(res: dict) -> str:
    """eval.md: the protocol in words, then one table per metric (rows: strategies)."""
    a = res["args"]
    rules = sorted({c["revisit_rule"] for c in res["clips"]})
    n_rev = [int(np.sum(c["revisit"])) for c in res["clips"]]
    n_mem = [int(np.sum(c.get("memory_only", []))) for c in res["clips"]]
    n_mem_by = {n: [int(np.sum(c["strategies"][n].get("memory_only", c.get("memory_only", [])))) for c in res["clips"]]
                for n in res["args"]["strategies"]}
    mem_counts = (f"per clip: {n_mem}" if all(v == n_mem for v in n_mem_by.values()) else
                  "per clip and strategy (each model's own window): "
                  + ", ".join(f"{n} {v}" for n, v in n_mem_by.items()))
    folders, steps = res["weights"], res["sample_steps"]
    one = len(set(folders.values())) == 1
    weights = (f"weights `{next(iter(folders.values()))}` (every strategy)" if one else
               "weights per strategy: " + ", ".join(f"{n} `{w}`" for n, w in folders.items()))
    n_steps = (f"{next(iter(steps.values()))} sampling steps" if len(set(steps.values())) == 1 else
               "sampling steps " + ", ".join(f"{n} {k}" for n, k in steps.items()))
    every = sorted({c["recall_every"] for c in res["clips"]})
    rel = res["relevance"]
    L = ["# DecMem evaluation", "",
         f"- {weights}; data `{a['data']}`, codec `{res['codec']}`, {n_steps}, seed {a['seed']}",
         f"- {len(res['clips'])} clip(s): " + ", ".join(f"`{c['video_id']}`" for c in res["clips"])
         + (f"; {len(res['skipped_short_clips'])} shorter clip(s) skipped" if res["skipped_short_clips"] else ""),
         f"- bank initialised with {a['init_frames']} ground-truth latents, {a['frames']} latents generated along "
         "the ground-truth camera path"]
    for name, m in a["frames_for"].items():
        L.append(f"- **{name} generated only {m} of the {a['frames']} latents** (`--frames-for {name}={m}`): its "
                 "per-frame arrays, means, first/last quarter and plots cover only those frames")
    L += [f"- revisited frame: >= {a['revisit_coverage']:.0%} of its pixels show surfaces an init frame >= "
          f"{a['min_gap']} latents older saw (rule: {', '.join(rules)}; depth agreement {a['depth_tol']:.0%}); "
          f"revisited frames per clip: {n_rev}",
          f"- frame only memory holds: the frames of its local window before it (window - 1 latents, the window of "
          f"the model being scored) see < {a['revisit_coverage']:.0%} of its pixels and older frames (ground truth or "
          f"generated) >= {a['revisit_coverage']:.0%}: what SGM alone can bring back (depth rule only); {mem_counts}",
          f"- relevance (rule `{rel['rule']}`, depth agreement {rel['depth_tol']:.0%}): {rel['relevant']}; "
          "recall@k = |read ∩ relevant| / min(k, |relevant|) per "
          + ("(layer, head, query block) against that query block's own relevant set (fov_frames: its one read set "
             "per chunk, against every query block's)" if rel["rule"] == "block" else
             "(layer, head, query block) for decmem, per (layer, head, query frame) for fov_frames (its one read set "
             "per chunk)")
          + (f"; scored on chunks 0, {every[0]}, {2 * every[0]}, ... only (every {every[0]} chunks)"
             if every != [1] else ""),
          "- dispersion: the memory read's softmax mass on keys of weight < 0.02 (weak) and > 0.05 (strong) at each "
          "chunk's last denoising step, per generated latent; first / last quarter: the first and the last "
          "quarter of a strategy's generated latents",
          "- seconds per chunk: sampling, encoding into the bank and the last step's read statistics; first / last: "
          "mean of the first and the last 10% of the chunks",
          "- metrics are averaged per clip, then over clips (mean, std over clips, clips counted)",
          f"- LPIPS: {res['lpips']}", f"- FVD: {res['fvd']}", "",
          "## Over the rollout: first → last", "",
          "| strategy | latents generated | weak-key mass, first → last quarter | strong-key mass, first → last "
          "quarter | s / chunk, first → last 10% | ratio |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in res["summary"].items():
        L.append(f"| {name} | {fmt(s['generated_latents']['mean'], '.0f')} | {_arrow(s, 'dispersion_low', '.4f')} | "
                 f"{_arrow(s, 'dispersion_high', '.4f')} | {_arrow(s, 'chunk_s', '.4g')} | "
                 f"{fmt(s['chunk_s_ratio']['mean'], '.3f')} |")
    L.append("")
    for title, key, spec in METRICS:
        if key == "lpips_all" and not any(s[key]["clips"] for s in res["summary"].values()):
            L += [f"## {title}", "", f"Not measured: {res['lpips']}.", ""]
            continue
        L += [f"## {title}", "", TABLE_HEAD, "|---|---:|---:|---:|"]
        for name, s in res["summary"].items():
            m = s.get(key, {"mean": None, "std": None, "clips": 0})
            if key in ("recall", "precision") and name not in RETRIEVING:
                continue
            L.append(f"| {name} | {fmt(m['mean'], spec)} | {fmt(m['std'], spec)} | {m['clips']} |")
        if key == "recall":
            ch = ", ".join(f"{n} {fmt(res['summary'][n]['chance']['mean'], '.3f')}" for n in res["summary"]
                           if n in RETRIEVING)
            L += ["", f"Chance (|relevant| / candidate blocks): {ch}"]
        L.append("")
    smooth = res["frames_smoothing"]
    L += ["Files: `eval.json` (every number, per-frame arrays), `frames.png` ("
          + (f"PSNR per generated frame, moving average over {smooth} frames, revisited frames shaded"
             if smooth > 1 else "PSNR / SSIM over frame index, revisited frames shaded")
          + "), `dispersion.png` (weak- and strong-key mass per generated frame), `chunk_seconds.png` (seconds per "
          "chunk), `retrieval_heatmap.png` (first clip: true overlap, the "
          f"{rel['true_overlap']}, vs the share of each strategy's reads per bank frame"
          + (", scored frames only" if every != [1] else "") + ").", ""]
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
