"""Teacher-forced diagnostic: velocity loss on held-out chunks with SGM on vs off (same weights).

Run from the repo root: python docs/bench/rendered/tf/tf_loss.py A=DIR H=DIR ... [data=DIR] [out=FILE]
(data: the held-out shards, default runs/rendered/heldout; out: the JSON, default runs/rendered/tf/tf_loss.json).
Chunks t0 = 24, 26, ..., 62 of 8 held-out clips; the bank holds the ground truth [0, t0); fixed noise per
(clip, chunk, tau). A chunk counts as 'revisit' when >= 50% of its frames' pixels were seen by a frame >= 8 older
(depth rule, as decmem eval) and 'far revisit' when the frames inside the ALM window (t0-3..t0-1) show < 50%;
'memory only' when the window shows < 50% and the frames before it >= 50% (decmem eval's rule).
"""
import json
import sys

import numpy as np
import torch

from decmem.data_pipeline.clip import iter_clip_sources
from decmem.data_pipeline.overlap import coverage
from decmem.evaluation.generate import clip_inputs
from decmem.model.codec import make_codec
from decmem.training.weights import load_weights

torch.set_num_threads(1)
runs = dict(a.split("=", 1) for a in sys.argv[1:])
DATA, OUT = runs.pop("data", "runs/rendered/heldout"), runs.pop("out", "runs/rendered/tf/tf_loss.json")
TAUS, STARTS, CLIPS = (0.3, 0.6, 0.9), list(range(24, 63, 2)), 8
clips = []
for clip in iter_clip_sources(DATA):
    clips.append(clip)
    if len(clips) == CLIPS:
        break
res = {}
for name, folder in runs.items():
    for strat in ("decmem", "window"):
        model, cfg = load_weights(folder, "cpu", overrides=[f"model.attention.strategy={strat}"])
        model.eval()
        codec = make_codec(cfg.codec, "cpu")
        rows = []
        for ci, clip in enumerate(clips):
            lat, K, c2w, _, _ = clip_inputs(clip, codec, model, 64)
            with torch.no_grad():
                bank = model.encode_memory(lat[:, :62], K[:, :62], c2w[:, :62])
                for t0 in STARTS:
                    x0 = lat[:, t0:t0 + 2]
                    far = coverage(clip, [t0, t0 + 1], range(0, t0 - 7), 0, 0.1, 1).mean() >= 0.5
                    near = coverage(clip, [t0, t0 + 1], range(t0 - 3, t0), 0, 0.1, 1).mean() >= 0.5
                    held = coverage(clip, [t0, t0 + 1], range(0, t0 - 3), 0, 0.1, 1).mean() >= 0.5
                    for tau in TAUS:
                        g = torch.Generator().manual_seed(ci * 1000 + t0 * 10 + int(tau * 10))
                        eps = torch.randn(x0.shape, generator=g)
                        x_t = (1 - tau) * x0 + tau * eps
                        pred, _ = model(x_t, torch.full((1,), tau), K[:, t0:t0 + 2], c2w[:, t0:t0 + 2], t0, bank)
                        rows.append((ci, t0, tau, bool(far), bool(near), float((pred - (eps - x0)).pow(2).mean()),
                                     bool(held)))
        res[f"{name}/{strat}"] = rows
        print(name, strat, "done", flush=True)
with open(OUT, "w") as f:
    json.dump(res, f)
for name in runs:
    for tau in TAUS:
        for label, sel in (("all", lambda r: True), ("revisit", lambda r: r[3]),
                           ("far revisit (ALM sees <50%)", lambda r: r[3] and not r[4]),
                           ("memory only", lambda r: r[6] and not r[4])):
            n = sum(1 for r in res[f"{name}/decmem"] if r[2] == tau and sel(r))
            if not n:
                continue
            d = np.mean([r[5] for r in res[f"{name}/decmem"] if r[2] == tau and sel(r)])
            w = np.mean([r[5] for r in res[f"{name}/window"] if r[2] == tau and sel(r)])
            print(f"{name} tau {tau} {label:28s} n={n:3d} SGM on {d:.4f} off {w:.4f} ratio {d / w:.3f}")
