"""Seconds per generated chunk at a 56- and a 448-latent bank, side by side, for a config and its overrides.

    python docs/bench/generation_growth.py [--profile] [key=value ...]     # e.g. model.attention.coarse=false

`configs/bench_generate_cpu.yaml` (the demo-size model with random weights, 32x32 latents, chunks of 4, blocks of
16, k = 8) at 10 Euler steps per chunk, timed without the memory encode. Rounds alternate the two banks so the
machine's drift hits both; median of rounds 2-6. One thread. --profile adds torch.profiler's top ops per bank,
which shows where the O(bank) part of SGM goes (BENCHMARKS.md, "Streaming generation vs bank size").
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from decmem.model.diffusion import DiffusionArgs, euler_sample
from decmem.model.factory import build_model
from decmem.training.config import load_config
from decmem.training.run_config import RunConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chunk_growth import cameras  # noqa: E402

BANKS = (56, 448)


def main(argv: list[str]) -> None:
    profile = "--profile" in argv
    overrides = [a for a in argv if a != "--profile"]
    torch.set_num_threads(1)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(RunConfig, os.path.join(root, "configs", "bench_generate_cpu.yaml"), overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    C, ch = model.args.chunk_frames, model.args.latent_channels
    K, c2w = cameras(max(BANKS) + C)
    lat = torch.randn(1, max(BANKS) + C, ch, 32, 32, generator=g)
    args = DiffusionArgs(sample_steps=10)

    def chunk(n, bank):
        euler_sample(model, (1, C, ch, 32, 32), K[:, n:n + C], c2w[:, n:n + C], n, bank, args, None, g, "cpu",
                     torch.float32)

    with torch.no_grad():
        banks = {n: model.encode_memory(lat[:, :n], K[:, :n], c2w[:, :n], 0, None) for n in BANKS}
        times: dict[int, list[float]] = {n: [] for n in BANKS}
        for r in range(6):
            for n, bank in banks.items():
                t0 = time.perf_counter()
                chunk(n, bank)
                if r:
                    times[n].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[n]) for n in BANKS)
        print(f"{' '.join(overrides) or 'as configured'}: bank {BANKS[0]} -> {a * 1e3:.0f} ms, bank {BANKS[1]} -> "
              f"{b * 1e3:.0f} ms per chunk ({100 * (b / a - 1):+.1f}%)")
        if profile:
            for n, bank in banks.items():
                with torch.profiler.profile() as p:
                    chunk(n, bank)
                print(f"bank {n}\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(sys.argv[1:])
