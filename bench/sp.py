"""``decmem bench sp``: the sharded query stream (train.cp_queries=sharded) against the replicated one and cp = 1.

Two measurements, real processes over gloo:
  time   one clip, every chunk after the first C frames a target: forward + backward of the training
         loss (plain autograd, no optimizer) at cp = 1, cp replicated and cp sharded (fetch, ship), one thread per
         process, median over steps after a warm-up, all in one run: wall time, and the busiest rank's
         CPU time (its work; on a shared machine wall time also counts what other jobs take).
  bytes  one chunk per rank at the end of its own bank range (where the sharded layout puts it), per
         layer, max over ranks, by collective, for both layouts on the same bank; against what
         all-gather and ring context parallelism move for one layer: the whole bank's K and V.
Bytes are counted from the exchanged tensors' shapes as the collectives are called (numel x element
size; an all-to-all counts what a rank sends plus receives, its own segment excluded; all-gather and
all-reduce as ring algorithms: 2S(cp-1)/cp and 4S(cp-1)/cp for S bytes). A ring pass of the K/V sends
and receives each rank's shard cp - 1 times, 2 (cp-1)/cp x the bank's K/V bytes: the same as the all-gather.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from decmem.bench.common import gather_to_json, orbit_cameras
from decmem.model.diffusion import rectified_flow_loss
from decmem.model.factory import build_model
from decmem.training.config import config_from_dict, to_dict
from decmem.training.context_parallel import CPMemory, Layout, build_groups
from decmem.training.distributed import free_port, init_loopback_group
from decmem.training.run_config import RunConfig
from decmem.training.sequence_parallel import SPMemory

CONTEXTS = {"replicated": CPMemory, "sharded": SPMemory, "shipped": partial(SPMemory, read="ship")}

#################################################################################
#                                    Workers                                    #
#################################################################################

def _setup(rank, world, port, cfg_dict):
    torch.set_num_threads(1)
    if world > 1:
        init_loopback_group(rank, world, port)
    cfg = config_from_dict(RunConfig, cfg_dict)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    group = build_groups(Layout.make(world, world, rank))[0] if world > 1 else None
    return cfg, model, group


def _clip(cfg, T):
    b = cfg.bench_generate
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, T, cfg.model.latent_channels, b.latent_h, b.latent_w, generator=g)
    K, c2w = orbit_cameras(T, (b.latent_h, b.latent_w))
    return lat, K, c2w


def _time_worker(rank, world, port, cfg_dict, T, queries, steps, out_path):
    cfg, model, group = _setup(rank, world, port, cfg_dict)
    try:
        C = cfg.model.chunk_frames
        lat, K, c2w = _clip(cfg, T)
        starts = list(range(C, T - C + 1, C))                             # every chunk after the first a target
        ctx = CONTEXTS[queries](group, rank, world) if world > 1 else None
        times, cpus, loss = [], [], None
        for step in range(steps + 1):                                     # step 0: warm-up
            if group is not None:
                dist.barrier(group=group)
            t, cpu = time.perf_counter(), time.process_time()
            model.zero_grad(set_to_none=True)
            loss, _ = rectified_flow_loss(model, lat, K, c2w, starts, cfg.diffusion,
                                          generator=torch.Generator().manual_seed(step), ctx=ctx)
            loss.backward()
            cpu = time.process_time() - cpu                               # this rank's work, whatever else runs
            if group is not None:
                dist.barrier(group=group)                                 # a step ends when its slowest rank does
            if step:
                times.append(time.perf_counter() - t)
                cpus.append(cpu)
        every = [cpus]
        if group is not None:
            every = [None] * world
            dist.all_gather_object(every, cpus, group=group)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"times": times, "cpu": [max(c) for c in zip(*every)], "chunks": len(starts),
                           "cpu_per_rank": [statistics.median(c) for c in every], "loss": float(loss.detach())}, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _bytes_worker(rank, world, port, cfg_dict, T, out_path):
    cfg, model, group = _setup(rank, world, port, cfg_dict)
    try:
        model.eval()
        C = cfg.model.chunk_frames
        lat, K, c2w = _clip(cfg, T + C)
        rows = {}
        with torch.no_grad():
            base = CPMemory(group, rank, world)
            lo, hi = base.shard(T)
            bank = model.encode_memory(lat[:, lo:hi], K[:, lo:hi], c2w[:, lo:hi], lo, ctx=base)
            for queries, cls in CONTEXTS.items():
                ctx = cls(group, rank, world)
                ctx.shard(T)
                # replicated: every rank reads the chunk after the bank; sharded: each its own, at its range's end
                t0 = T if queries == "replicated" else hi
                x = lat[:, t0:t0 + C]
                model(x, torch.full((1,), 0.5), K[:, t0:t0 + C], c2w[:, t0:t0 + C], t0, bank, ctx=ctx)
                rows[queries] = dict(ctx.bytes_moved())
        gather_to_json(rows, world, rank, out_path)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(fn, args=(world, free_port(), *args, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


#################################################################################
#                                     Runs                                      #
#################################################################################

def run_sp_time(cfg, clip_frames: int, cp: int = 2, steps: int = 3, log=print, rounds: int = 1) -> list[dict]:
    """Step time of one clip at cp = 1, cp replicated, cp sharded (fetch) and cp sharded (ship), side by side.

    With rounds > 1 the layouts run in turn that many times, so a shared machine's slow spells fall on
    all of them; each round's ratio to its own cp = 1 is kept, and a layout's ratio is the median of those.
    """
    layouts = ((1, "one process"), (cp, "replicated"), (cp, "sharded"), (cp, "shipped"))
    runs = {q: [] for _, q in layouts}
    for _ in range(rounds):
        for world, queries in layouts:
            runs[queries].append(_spawn(_time_worker, world, to_dict(cfg), clip_frames, queries, steps))
    rows = []
    for world, queries in layouts:
        got = runs[queries]
        times = [t for res in got for t in res["times"]]
        cpus = [c for res in got for c in res["cpu"]]
        rows.append({"cp": world, "queries": queries, "chunks": got[0]["chunks"], "loss": got[0]["loss"],
                     "median_s": statistics.median(times), "times_s": times,
                     "median_cpu_s": statistics.median(cpus), "cpu_s": cpus,
                     "cpu_per_rank_s": [statistics.median(c) for c in zip(*(res["cpu_per_rank"] for res in got))],
                     "round_median_s": [statistics.median(res["times"]) for res in got],
                     "round_median_cpu_s": [statistics.median(res["cpu"]) for res in got]})
    base = rows[0]
    for r in rows:
        ratios = [a / b for a, b in zip(r["round_median_s"], base["round_median_s"])]
        cpu_ratios = [a / b for a, b in zip(r["round_median_cpu_s"], base["round_median_cpu_s"])]
        r["vs_cp1_per_round"], r["cpu_vs_cp1_per_round"] = ratios, cpu_ratios
        r["vs_cp1"], r["cpu_vs_cp1"] = statistics.median(ratios), statistics.median(cpu_ratios)
        log(f"cp={r['cp']} {r['queries']:>11}: {r['median_s']:.2f} s/step wall (x{r['vs_cp1']:.2f} of cp=1; rounds "
            f"{' '.join(f'{x:.2f}' for x in ratios)}), {r['median_cpu_s']:.2f} CPU s/step on the busiest rank "
            f"(x{r['cpu_vs_cp1']:.2f}), {r['chunks']} target chunks, loss {r['loss']:.5f}, "
            f"CPU s per rank {' '.join(f'{c:.2f}' for c in r['cpu_per_rank_s'])}")
    return rows


def run_sp_bytes(cfg, cps, bank_frames, log=print) -> list[dict]:
    """Query-stream bytes per layer per chunk, sharded vs replicated, against a K/V all-gather / ring pass."""
    m = cfg.model
    b = cfg.bench_generate
    depth, H, d = m.depth, m.n_heads, m.dim // m.n_heads
    Nf = (b.latent_h // m.patch_size) * (b.latent_w // m.patch_size)
    rows = []
    for T in bank_frames:
        for cp in cps:
            every = _spawn(_bytes_worker, cp, to_dict(cfg), T)
            kv = 2 * T * Nf * H * d * 4                                   # one layer's bank K + V, fp32
            kv_moved = int(2 * kv * (cp - 1) / cp)                         # all-gather; a ring pass moves the same
            for queries in CONTEXTS:
                names = sorted({n for r in every for n in r[queries]})
                by = {n: max(r[queries].get(n, 0) for r in every) / depth for n in names}
                total = max(sum(r[queries].values()) for r in every) / depth
                # every chunk a target (a clip of T + C frames: T / C chunks): a K/V all-gather or ring pass
                # serves them all once per layer, while the query read moves its bytes for each chunk a rank runs
                chunks = max(1, T // m.chunk_frames)
                per_rank = chunks if queries == "replicated" else -(-chunks // cp)
                rows.append({"cp": cp, "bank_frames": T, "queries": queries, "bytes_per_layer": total,
                             "kv_allgather_bytes_per_layer": kv_moved, "ring_bytes_per_layer": kv_moved,
                             "fraction_of_kv": total / kv_moved, "by_collective": by,
                             "every_chunk_chunks_per_rank": per_rank,
                             "every_chunk_bytes_per_layer_step": per_rank * total,
                             "every_chunk_fraction_of_kv": per_rank * total / kv_moved})
                log(f"cp={cp} bank {T:>4} {queries:>10}: {total / 2**10:8.1f} KiB/layer per chunk "
                    f"({100 * total / kv_moved:.2f}% of a K/V all-gather or ring pass, {kv_moved / 2**20:.1f} MiB); "
                    f"every chunk a target: {per_rank} chunks/rank, {per_rank * total / 2**20:.1f} MiB/layer/step "
                    f"({100 * per_rank * total / kv_moved:.0f}%) | "
                    + " ".join(f"{n}={v / 2**10:.1f}" for n, v in by.items()))
    return rows


def run_sp_bench(cfg, clip_frames, cps, bank_frames, json_path=None, steps=3, log=print, rounds=1):
    res = {"time": run_sp_time(cfg, clip_frames, 2, steps, log, rounds) if clip_frames else [],
           "bytes": run_sp_bytes(cfg, cps, [t for t in bank_frames if t > 0], log) if any(bank_frames) else []}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    return res
