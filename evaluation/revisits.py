"""``decmem eval``: score ``decmem generate`` outputs against the clip's ground truth (DESIGN §7, revisit fidelity).

Each run folder holds ``rollout.mp4`` (init frames, then generated ones) and ``frames.json``
(``summary`` + one record per frame with ``kind`` init|generated). All runs must come from the same
clip with the same number of init frames and the same length. A generated frame is a *revisit*
when its camera is close, in position and viewing direction, to one of the init frames' cameras
(the frames the model was given), so the model could have reproduced it from memory.

Outputs in ``out_dir``: ``compare.mp4`` (ground truth | run 1 | run 2 | ...), ``revisits.png``
(revisited generated frames, one row per source), ``eval.json`` (every number, per-frame arrays)
and ``report.md`` (a table parsable with :func:`parse_report_table`).
"""
from __future__ import annotations

import json
import math
import os
import platform

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from decmem.data_pipeline import clip as clipmod
from decmem.data_pipeline.storage import write_bytes_atomic
from decmem.data_pipeline.video import frame_strip, read_mp4, side_by_side, write_mp4, write_png
from decmem.evaluation.metrics import frame_metrics
from decmem.evaluation.report import fmt, json_safe

TABLE_HEADER = ("| strategy | revisit frames | revisit PSNR (dB) | revisit SSIM | all generated PSNR (dB) "
                "| all generated SSIM | s / latent |")
TABLE_KEYS = ["strategy", "revisit frames", "revisit PSNR (dB)", "revisit SSIM", "all generated PSNR (dB)",
              "all generated SSIM", "s / latent"]
STRIP_FRAMES = 8
GAP = 2


def revisit_mask(c2w: np.ndarray, init_frames: int, pos_tol: float, angle_tol_deg: float,
                 min_gap: int = 0) -> np.ndarray:
    """bool [T]: frame t >= init_frames whose camera centre lies within ``pos_tol`` (pose units) of some init
    frame j < init_frames, j <= t - min_gap, AND whose viewing direction (camera +z, ``c2w[:3, 2]``) is within
    ``angle_tol_deg`` of that same frame's. Frames before ``init_frames`` are False. ``min_gap`` keeps the
    frames just before the rollout (the local window's, which any strategy reads) from counting as revisits."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"revisit_mask: expected c2w [T,4,4], got shape {c2w.shape}")
    T = c2w.shape[0]
    if init_frames < 1:
        raise ValueError(f"revisit_mask: init_frames must be >= 1, got {init_frames}")
    mask = np.zeros(T, dtype=bool)
    if init_frames >= T:
        return mask
    pos = c2w[:, :3, 3]                                                   # [T, 3] camera centres
    fwd = c2w[:, :3, 2]
    fwd = fwd / np.maximum(np.linalg.norm(fwd, axis=-1, keepdims=True), 1e-12)   # [T, 3] unit view directions
    dist = np.linalg.norm(pos[init_frames:, None] - pos[None, :init_frames], axis=-1)     # [T-I, I]
    cos = np.clip(np.einsum("gc,ic->gi", fwd[init_frames:], fwd[:init_frames]), -1.0, 1.0)
    angle = np.degrees(np.arccos(cos))                                    # [T-I, I]
    gap = np.arange(init_frames, T)[:, None] - np.arange(init_frames)[None, :] >= min_gap   # [T-I, I]
    mask[init_frames:] = ((dist <= pos_tol) & (angle <= angle_tol_deg) & gap).any(axis=1)
    return mask


def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if x.size else None


def _load_run(run_dir: str) -> dict:
    """frames.json + decoded rollout.mp4 of one ``decmem generate`` output folder."""
    fj = os.path.join(run_dir, "frames.json")
    if not os.path.isfile(fj):
        raise ValueError(f"{run_dir}: no frames.json (expected a `decmem generate` output folder)")
    try:
        with open(fj) as f:
            info = json.load(f)
        summary, records = info["summary"], info["frames"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{fj}: expected JSON with 'summary' and 'frames' ({e})") from e
    kinds = [r.get("kind") for r in records]
    if any(k not in ("init", "generated") for k in kinds):
        raise ValueError(f"{fj}: every frame record needs kind 'init' or 'generated'")
    n_init = kinds.index("generated") if "generated" in kinds else len(kinds)
    if kinds != ["init"] * n_init + ["generated"] * (len(kinds) - n_init) or n_init == len(kinds):
        raise ValueError(f"{fj}: expected init frames followed by at least one generated frame")
    video = read_mp4(os.path.join(run_dir, "rollout.mp4"))
    if video.shape[0] != len(records):
        raise ValueError(f"{run_dir}: rollout.mp4 has {video.shape[0]} frames but frames.json lists {len(records)}")
    return {"dir": run_dir, "summary": summary, "init": n_init, "length": len(records), "video": video}


def _labels(runs: list[dict]) -> list[str]:
    names = [str(r["summary"].get("strategy") or os.path.basename(os.path.normpath(r["dir"]))) for r in runs]
    out = []
    for name, r in zip(names, runs):
        label = name if names.count(name) == 1 else f"{name} ({os.path.basename(os.path.normpath(r['dir']))})"
        out.append(label.replace("|", "/"))
    return out


def _strip_image(rows: list[np.ndarray], labels: list[str], gap: int = GAP) -> np.ndarray:
    """Stack uint8 [n, H, W, 3] rows (one per source) into one image, with a text label column on the left."""
    strips = [frame_strip(r, range(r.shape[0]), gap=gap) for r in rows]          # each [H, n*W+(n-1)*gap, 3]
    h, w = strips[0].shape[:2]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(math.ceil(max(probe.textlength(t, font=font) for t in labels))) + 6
    H = len(strips) * h + (len(strips) - 1) * gap
    canvas = Image.new("RGB", (label_w + w, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (s, t) in enumerate(zip(strips, labels)):
        y = i * (h + gap)
        canvas.paste(Image.fromarray(s), (label_w, y))
        draw.text((3, y + max(0, h // 2 - 6)), t, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def evaluate(clip_spec: str, run_dirs: list[str], out_dir: str, pos_tol: float = 0.25, angle_tol_deg: float = 20.0,
             log=print, min_gap: int = 8) -> dict:
    """Score ``decmem generate`` run folders against ``clip_spec``'s ground truth; write compare.mp4,
    revisits.png, eval.json and report.md into ``out_dir``; return the eval.json dict (``rows``, ``paths``...)."""
    if not run_dirs:
        raise ValueError("evaluate: give at least one run folder")
    if pos_tol < 0 or angle_tol_deg < 0:
        raise ValueError(f"evaluate: tolerances must be >= 0, got pos_tol={pos_tol}, angle_tol_deg={angle_tol_deg}")
    clip = clipmod.load_clip_source(clip_spec)
    runs = [_load_run(d) for d in run_dirs]
    first = runs[0]
    for r in runs[1:]:
        if r["init"] != first["init"] or r["length"] != first["length"]:
            raise ValueError(f"{r['dir']}: {r['init']} init frames, {r['length']} frames in all; "
                             f"{first['dir']} has {first['init']} init, {first['length']} in all: runs must match")
    n_init, length = first["init"], first["length"]
    frames_gt = clip["frames"]
    T, H, W = frames_gt.shape[:3]
    if T < length:
        raise ValueError(f"{clip_spec}: {T} frames, but the runs are {length} frames long ({first['dir']})")
    vid = clip.get("video_id")
    for r in runs:
        rid = r["summary"].get("video_id")
        if rid is not None and vid is not None and str(rid) != str(vid):
            raise ValueError(f"{r['dir']}: generated from video_id {rid!r}, but {clip_spec} is video_id {vid!r}")
        h, w = r["video"].shape[1:3]
        if (h, w) not in ((H, W), (H + H % 2, W + W % 2)):
            raise ValueError(f"{r['dir']}: rollout.mp4 frames are {h}x{w}, clip frames are {H}x{W}")
        r["video"] = np.ascontiguousarray(r["video"][:, :H, :W])          # drop write_mp4's even-size padding
    gt = frames_gt[:length]
    revisit = revisit_mask(clip["c2w"][:length], n_init, pos_tol, angle_tol_deg, min_gap)  # [length]
    gen_idx = np.arange(n_init, length)
    rev_idx = np.flatnonzero(revisit)
    labels = _labels(runs)
    log(f"eval: {len(runs)} run(s), {n_init} init + {length - n_init} generated frames, "
        f"{len(rev_idx)} revisit frame(s) (pos <= {pos_tol}, angle <= {angle_tol_deg} deg)")

    rows = []
    for r, label in zip(runs, labels):
        psnr, ssim = frame_metrics(gt, r["video"])
        s = r["summary"]
        spl = s.get("seconds_per_latent_median")
        att = s.get("attended_tokens_per_query")
        rows.append({
            "run_dir": os.path.abspath(r["dir"]), "label": label, "strategy": s.get("strategy"),
            "revisit_frames": int(len(rev_idx)),
            "revisit_psnr": _mean(psnr[rev_idx]), "revisit_ssim": _mean(ssim[rev_idx]),
            "generated_psnr": _mean(psnr[gen_idx]), "generated_ssim": _mean(ssim[gen_idx]),
            "seconds_per_latent_median": spl,
            "attended_tokens_per_query": att,
            "attended_tokens_mean": _mean(att) if isinstance(att, list) and att else (att if isinstance(
                att, (int, float)) else None),
            "weights": s.get("weights"), "sample_steps": s.get("sample_steps"), "chunk_frames": s.get("chunk_frames"),
            "seed": s.get("seed"), "teacher_forcing": s.get("teacher_forcing"), "clip": s.get("clip"),
            "init_latents": s.get("init_frames"), "generated_latents": s.get("generated_latents"),
            "psnr": psnr, "ssim": ssim,
        })
        log(f"eval: {label}: revisit PSNR {fmt(rows[-1]['revisit_psnr'], '.2f')} dB, "
            f"all generated PSNR {fmt(rows[-1]['generated_psnr'], '.2f')} dB")

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(os.path.abspath(out_dir), k) for k in ("compare.mp4", "revisits.png", "eval.json",
                                                                    "report.md")}
    fps = clip.get("fps") or 10
    write_mp4(paths["compare.mp4"], side_by_side([gt] + [r["video"] for r in runs]), fps=int(round(fps)) or 10)

    if len(rev_idx):
        pick = rev_idx[np.unique(np.linspace(0, len(rev_idx) - 1, min(STRIP_FRAMES, len(rev_idx))).round().astype(int))]
        strip_source = "revisits"
    else:
        pick = gen_idx[-STRIP_FRAMES:]
        strip_source = "last_generated"
    write_png(paths["revisits.png"], _strip_image([gt[pick]] + [r["video"][pick] for r in runs],
                                                  ["ground truth"] + labels))

    result = {
        "clip": clip_spec, "video_id": vid, "fps": fps, "frames": int(length), "init_frames": int(n_init),
        "generated_frames": int(length - n_init), "pos_tol": pos_tol, "angle_tol_deg": angle_tol_deg, "min_gap": min_gap,
        "revisit_count": int(len(rev_idx)), "revisit_frames": rev_idx.tolist(), "revisit": revisit,
        "strip_frames": [int(i) for i in pick], "strip_source": strip_source,
        "compare_panels": ["ground truth"] + labels, "rows": rows, "paths": paths,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    result = json_safe(result)
    write_bytes_atomic(paths["eval.json"], json.dumps(result, indent=1).encode())
    with open(paths["report.md"], "w") as f:
        f.write(_report(result))
    log(f"eval: wrote {out_dir}")
    return result


def _report(res: dict) -> str:
    L = [f"# Revisit fidelity: {res['video_id'] or os.path.basename(res['clip'])}", "",
         f"- clip: `{res['clip']}`" + (f" (video_id `{res['video_id']}`)" if res["video_id"] else ""),
         f"- init frames (given to the model): {res['init_frames']}; generated frames: {res['generated_frames']}",
         f"- revisit: a generated frame whose camera centre is within {res['pos_tol']} (clip pose units) of an init "
         f"frame at least {res['min_gap']} frames older AND whose viewing direction (camera +z) is within "
         f"{res['angle_tol_deg']} deg of that frame's; "
         f"{res['revisit_count']} of {res['generated_frames']} generated frames are revisits"
         + (f" (frames {res['revisit_frames']})" if res["revisit_count"] else ""),
         "- PSNR (dB, 0..255, 100 = identical) and SSIM (gaussian 11/1.5, data range 255) compare each decoded "
         "rollout.mp4 frame with the clip's frame; means over the revisit frames and over all generated frames",
         "", TABLE_HEADER, "|" + "---|" * len(TABLE_KEYS)]
    for r in res["rows"]:
        L.append(f"| {r['label']} | {r['revisit_frames']} | {fmt(r['revisit_psnr'], '.2f')} | "
                 f"{fmt(r['revisit_ssim'], '.4f')} | {fmt(r['generated_psnr'], '.2f')} | "
                 f"{fmt(r['generated_ssim'], '.4f')} | {fmt(r['seconds_per_latent_median'], '.4g')} |")
    L += ["", "## Runs", ""]
    for r in res["rows"]:
        att = r["attended_tokens_mean"]
        L.append(f"- **{r['label']}**: `{r['run_dir']}`; weights `{r['weights']}`, sample_steps {r['sample_steps']}"
                 + (f", chunk_frames {r['chunk_frames']}" if r["chunk_frames"] is not None else "")
                 + (f", seed {r['seed']}" if r["seed"] is not None else "")
                 + (", teacher forcing" if r["teacher_forcing"] else "")
                 + (f", attended tokens per query {att:.0f} (mean over chunks)" if att is not None else ""))
    shown = "revisited generated frames" if res["strip_source"] == "revisits" else \
        "the last generated frames (no generated frame is a revisit)"
    L += ["", "## Files", "",
          f"- `compare.mp4`: panels left to right: {' | '.join(res['compare_panels'])}",
          f"- `revisits.png`: {shown}, frames {res['strip_frames']}; rows: {', '.join(res['compare_panels'])}",
          "- `eval.json`: every number above plus per-frame PSNR / SSIM / revisit arrays", "",
          f"PSNR and SSIM were computed on this machine ({res['machine']['platform']}, "
          f"{res['machine']['cpu_count']} CPUs) from the run folders as they are; s / latent is the median per-latent "
          "generation time copied from each run's frames.json, as measured by `decmem generate` where it ran.", ""]
    return "\n".join(L)


def parse_report_table(md: str) -> list[dict]:
    """Rows of report.md's results table as dicts keyed by the header cells (numbers as float/int, n/a as None)."""
    lines = md.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == TABLE_HEADER)
    except StopIteration:
        raise ValueError("parse_report_table: results table header not found") from None
    rows = []
    for line in lines[start + 2:]:
        line = line.strip()
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(TABLE_KEYS):
            raise ValueError(f"parse_report_table: expected {len(TABLE_KEYS)} cells, got {len(cells)} in {line!r}")
        row = {}
        for k, c in zip(TABLE_KEYS, cells):
            if k == "strategy":
                row[k] = c
            elif c == "n/a":
                row[k] = None
            elif k == "revisit frames":
                row[k] = int(c)
            else:
                row[k] = float(c)
        rows.append(row)
    return rows
