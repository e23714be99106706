"""The pictures of ``decmem eval --weights``: metrics, dispersion and chunk seconds over the rollout, and retrieval
against true overlap."""
from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LONG_FRAMES = 64        # frames.png: longer rollouts get the smoothed PSNR-only view


def figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib Figure with a rows x cols array of axes (2-D, also for 1 x 1), drawn off-screen (Agg): no
    display, no global pyplot state. The one figure helper: the eval figures here and bench/figures.py use it."""
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    """Centred moving average over w frames (fewer at the ends, never padded with zeros)."""
    if w <= 1:
        return y
    k = np.ones(w)
    return np.convolve(y, k, mode="same") / np.convolve(np.ones(len(y)), k, mode="same")


def _per_strategy(clips: list[dict], name: str, key: str) -> np.ndarray:
    """Mean over clips of a strategy's per-frame (or per-chunk) array, over the frames every clip has."""
    vals = [np.asarray(c["strategies"][name][key], float) for c in clips]
    n = min(len(v) for v in vals)
    return np.mean([v[:n] for v in vals], axis=0)


def _label(clips: list[dict], name: str, frames: int) -> str:
    """The legend entry: the strategy, and how many frames it generated when fewer than the others."""
    n = len(clips[0]["strategies"][name]["psnr"])
    return name if n >= frames else f"{name} (first {n} frames only)"


def plot_frames(path: str, clips: list[dict], strategies: list[str]) -> int:
    """PSNR and SSIM per generated frame (mean over clips) per strategy; the share of clips revisiting a frame
    is shaded behind the curves. Long rollouts (> LONG_FRAMES): the paper's Fig. 7 view, PSNR only, as a
    moving average over about 1/60 of the frames. Returns the moving average's width (1: none)."""
    n = min(len(c["generated_frames"]) for c in clips)
    x = np.arange(n)                                                               # frames after the init span
    rev = np.mean([np.asarray(c["revisit"][:n], float) for c in clips], axis=0)    # [n] share of clips revisiting
    long = n > LONG_FRAMES
    w = max(3, 2 * (n // 120) + 1) if long else 1                                   # odd: centred on the frame
    panels = [("psnr", "PSNR (dB)")] + ([] if long else [("ssim", "SSIM")])
    fig, ax = figure(len(panels), 1, (12, 4.5) if long else (8, 6))
    for a, (metric, unit) in zip(ax[:, 0], panels):
        for name in strategies:
            y = _smooth(_per_strategy(clips, name, metric), w)
            a.plot(x[:len(y)], y, marker=None if long else "o", markersize=3, label=_label(clips, name, n))
        shade = a.twinx()
        shade.bar(x, rev, width=1.0, color="0.85", linewidth=0, zorder=0)
        shade.set_ylim(0, 1)
        shade.set_ylabel("share of clips revisiting")
        a.set_zorder(shade.get_zorder() + 1)
        a.patch.set_visible(False)
        a.set_ylabel(unit)
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=8, ncol=min(5, len(strategies)))
    ax[0, 0].set_title(f"Generated frames vs ground truth, mean over {len(clips)} clip(s)"
                       + (f"; PSNR as a moving average over {w} frames, revisited frames shaded" if long else ""),
                       fontsize=10)
    ax[-1, 0].set_xlabel("generated frame (0 = first after the init frames)")
    fig.tight_layout()
    fig.savefig(path)
    return w


def plot_dispersion(path: str, clips: list[dict], strategies: list[str]) -> None:
    """Attention dispersion per generated latent (mean over clips), one line per strategy: the memory read's mass
    on weak keys (< 0.02) above, on strong keys (> 0.05) below."""
    fig, ax = figure(2, 1, (8, 6))
    for a, key, title in ((ax[0, 0], "dispersion_low", "mass on weak keys (weight < 0.02)"),
                          (ax[1, 0], "dispersion_high", "mass on strong keys (weight > 0.05)")):
        for name in strategies:
            y = _per_strategy(clips, name, key)
            a.plot(np.arange(len(y)), y, label=name)
        a.set_ylabel(title, fontsize=9)
        a.set_ylim(-0.02, 1.02)
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=8, ncol=min(5, len(strategies)))
    ax[0, 0].set_title(f"Attention dispersion of the memory read (last denoising step), mean over {len(clips)} "
                       "clip(s)", fontsize=10)
    ax[1, 0].set_xlabel("generated latent frame (0 = first after the init frames)")
    fig.tight_layout()
    fig.savefig(path)


def plot_chunk_seconds(path: str, clips: list[dict], strategies: list[str]) -> None:
    """Wall seconds per generated chunk (mean over clips) against the chunk's index, one line per strategy."""
    fig, ax = figure(1, 1, (8, 4))
    a = ax[0, 0]
    for name in strategies:
        y = _per_strategy(clips, name, "chunk_seconds")
        a.plot(np.arange(len(y)), y, label=name)
    a.set_xlabel("chunk (0 = first after the init frames)")
    a.set_ylabel("seconds per chunk")
    a.set_ylim(bottom=0)
    a.grid(alpha=0.3)
    a.legend(fontsize=8, ncol=min(5, len(strategies)))
    a.set_title(f"Seconds per chunk (sampling + bank encoding), mean over {len(clips)} clip(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_heatmaps(path: str, clip: dict, strategies: list[str], truth: str) -> bool:
    """One clip: true overlap (``truth`` says what it is, under the eval's relevance rule) next to the share of each
    retrieving strategy's reads per bank frame; query frames (the scored ones) down, bank frames across. False if
    nothing to draw."""
    panels = [("true overlap", clip.get("true_overlap"))]
    panels += [(n, clip["strategies"][n].get("heatmap")) for n in strategies if n in clip["strategies"]]
    panels = [(t, np.asarray(m, float)) for t, m in panels if m is not None]
    if len(panels) < 2:
        return False
    scored = clip.get("scored_frames") or list(range(len(panels[0][1])))
    ticks = np.unique(np.linspace(0, len(scored) - 1, min(6, len(scored))).round().astype(int))
    fig, ax = figure(1, len(panels), (3.2 * len(panels), 3.4))
    for a, (title, m) in zip(ax[0], panels):
        im = a.imshow(m / max(m.max(), 1e-12), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
        a.set_title(title, fontsize=9)
        a.set_xlabel("bank frame")
        a.set_yticks(ticks, [str(scored[i]) for i in ticks])        # rows are the scored frames, not every frame
    ax[0, 0].set_ylabel("generated frame" if clip.get("recall_every", 1) == 1 else
                        f"generated frame (chunks 0, {clip['recall_every']}, ...)")
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.17, top=0.78, wspace=0.25)
    fig.colorbar(im, ax=list(ax[0]), shrink=0.8, label="share (scaled to the panel max)")
    # what the truth panel shows depends on the relevance rule: say it, wrapped to the figure's width
    caption = textwrap.fill(f"true overlap: {truth}", 30 * len(panels))
    fig.suptitle(f"Retrieval vs true overlap: {clip.get('video_id')}\n{caption}", fontsize=9)
    fig.savefig(path)
    return True
