"""Seconds per generated chunk at a short and a long memory bank, for trained weights, side by side.

    python docs/bench/chunk_growth.py runs/mix/MJ/checkpoints/step-450/weights runs/mix/MJ64/checkpoints/step-450/weights

One chunk = its Euler steps (2, as the demo's minute) + the memory encode of the chunk, timed without the eval's
diagnostics (read statistics, kept selections). Banks of random latents along a turning camera path; every
(weights, bank) pair runs once per round, rounds interleaved so the machine's drift hits all alike; median of
the rounds after the first. One thread. Prints a markdown table (BENCHMARKS.md, `make demo` section).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from decmem.model.diffusion import DiffusionArgs, euler_sample
from decmem.training.weights import load_weights


def cameras(n: int):
    K = torch.tensor([[16.0, 0, 16], [0, 16, 16], [0, 0, 1]]).expand(1, n, 3, 3).clone()
    ang = torch.linspace(0, 20, n)
    c2w = torch.eye(4).repeat(1, n, 1, 1)
    c2w[0, :, 0, 0], c2w[0, :, 0, 2], c2w[0, :, 2, 0], c2w[0, :, 2, 2] = ang.cos(), ang.sin(), -ang.sin(), ang.cos()
    return K, c2w


def main(folders: list[str], banks=(24, 598), rounds: int = 9, steps: int = 2) -> None:
    torch.set_num_threads(1)
    models = {w: load_weights(w)[0].eval() for w in folders}
    g = torch.Generator().manual_seed(0)
    n_max = max(banks) + 4
    K, c2w = cameras(n_max)
    args = DiffusionArgs(sample_steps=steps)
    times: dict = {}
    with torch.no_grad():
        for w, m in models.items():
            lat = torch.randn(1, n_max, m.args.latent_channels, 32, 32, generator=g)
            for n in banks:
                times[(w, n)] = (m, lat, m.encode_memory(lat[:, :n], K[:, :n], c2w[:, :n], 0, None), [])
        for r in range(rounds):
            for (w, n), (m, lat, bank, ts) in times.items():
                C = m.args.chunk_frames
                t0 = time.perf_counter()
                euler_sample(m, (1, C, *lat.shape[2:]), K[:, n:n + C], c2w[:, n:n + C], n, bank, args, None, g, "cpu",
                             torch.float32)
                m.encode_memory(lat[:, n:n + C], K[:, n:n + C], c2w[:, n:n + C], n, None, past=bank)
                if r:
                    ts.append(time.perf_counter() - t0)
    print(f"| weights | bank {banks[0]} frames (ms / chunk) | bank {banks[-1]} frames | growth |\n|---|---:|---:|---:|")
    for w in models:
        a, b = (statistics.median(times[(w, n)][3]) for n in (banks[0], banks[-1]))
        print(f"| {w} | {a * 1e3:.0f} | {b * 1e3:.0f} | {100 * (b / a - 1):+.0f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
