"""The pictures of ``decmem eval --weights``: metrics over frame index, and retrieval against true overlap."""
from __future__ import annotations

import numpy as np


def _figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib Figure drawn off-screen (Agg): no display, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_frames(path: str, clips: list[dict], strategies: list[str]) -> None:
    """PSNR and SSIM per generated frame (mean over clips) per strategy; the share of clips revisiting a frame
    is shaded behind the curves."""
    n = min(len(c["generated_frames"]) for c in clips)
    x = np.arange(n)                                                               # frames after the init span
    rev = np.mean([np.asarray(c["revisit"][:n], float) for c in clips], axis=0)    # [n] share of clips revisiting
    fig, ax = _figure(2, 1, (8, 6))
    for a, metric, unit in ((ax[0, 0], "psnr", "PSNR (dB)"), (ax[1, 0], "ssim", "SSIM")):
        for name in strategies:
            y = np.mean([np.asarray(c["strategies"][name][metric][:n], float) for c in clips], axis=0)
            a.plot(x, y, marker="o", markersize=3, label=name)
        shade = a.twinx()
        shade.bar(x, rev, width=1.0, color="0.85", zorder=0)
        shade.set_ylim(0, 1)
        shade.set_ylabel("share of clips revisiting")
        a.set_zorder(shade.get_zorder() + 1)
        a.patch.set_visible(False)
        a.set_ylabel(unit)
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=8, ncol=min(5, len(strategies)))
    ax[0, 0].set_title(f"Generated frames vs ground truth, mean over {len(clips)} clip(s)")
    ax[1, 0].set_xlabel("generated frame (0 = first after the init frames)")
    fig.tight_layout()
    fig.savefig(path)


def plot_heatmaps(path: str, clip: dict, strategies: list[str]) -> bool:
    """One clip: true overlap (share of a bank frame's blocks the query view sees) next to the share of each
    retrieving strategy's reads per bank frame; query frames down, bank frames across. False if nothing to draw."""
    panels = [("true overlap", clip.get("true_overlap"))]
    panels += [(n, clip["strategies"][n].get("heatmap")) for n in strategies if n in clip["strategies"]]
    panels = [(t, np.asarray(m, float)) for t, m in panels if m is not None]
    if len(panels) < 2:
        return False
    fig, ax = _figure(1, len(panels), (3.2 * len(panels), 3.4))
    for a, (title, m) in zip(ax[0], panels):
        im = a.imshow(m / max(m.max(), 1e-12), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
        a.set_title(title, fontsize=9)
        a.set_xlabel("bank frame")
    ax[0, 0].set_ylabel("generated frame")
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.17, top=0.84, wspace=0.25)
    fig.colorbar(im, ax=list(ax[0]), shrink=0.8, label="share (scaled to the panel max)")
    fig.suptitle(f"Retrieval vs true overlap: {clip.get('video_id')}", fontsize=10)
    fig.savefig(path)
    return True
