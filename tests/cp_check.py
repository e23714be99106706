"""Worker functions for multi-process context-parallel checks (importable, so spawned processes can run them).

Each worker builds the same tiny model and batch, computes the single-process
reference on its own, then the context-parallel result with its group, and
raises if they differ. Used by tests/test_context_parallel.py.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from decmem.model.attention import AttentionArgs
from decmem.model.diffusion import DiffusionArgs, rectified_flow_loss
from decmem.model.dit import ModelArgs, VideoDiT
from decmem.training.context_parallel import CPMemory, Layout, build_groups
from decmem.training.distributed import init_loopback_group as init
from decmem.training.sequence_parallel import SPMemory

CONTEXTS = {"replicated": CPMemory, "sharded": SPMemory, "shipped": partial(SPMemory, read="ship")}


def tiny_model(strategy: str, dtype, merge="gate", frame_pos=True, camera="plucker", top_k=3, window=3, seed=0,
               position="sincos", coarse=False):
    torch.manual_seed(seed)
    att = AttentionArgs(strategy=strategy, block_size=4, top_k=top_k, window=window, merge=merge, fov_frames=2,
                        coarse=coarse)
    m = VideoDiT(ModelArgs(size="debug", chunk_frames=2, frame_pos=frame_pos, camera=camera, position=position,
                           attention=att)).to(dtype)
    with torch.no_grad():                        # leave the zero-init regime so every path carries gradient
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def batch(T: int, dtype, seed=1, repeat_frames=None):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, T, 3, 8, 8, generator=g, dtype=dtype)
    if repeat_frames:                            # identical frames -> tied block scores across ranks
        for dst, src in repeat_frames:
            lat[:, dst] = lat[:, src]
    K = torch.tensor([[7.0, 0, 4], [0, 7.0, 4], [0, 0, 1]], dtype=dtype).expand(1, T, 3, 3).clone()
    c2w = torch.eye(4, dtype=dtype).repeat(1, T, 1, 1)
    c2w[0, :, 0, 3] = torch.linspace(0, 1, T, dtype=dtype)
    c2w[0, :, 2, 3] = torch.sin(torch.linspace(0, 3, T, dtype=dtype))
    return lat, K, c2w


def loss_and_grads(model, lat, K, c2w, starts, ctx, seed=3, window_dropout=0.0, memory_noise=0.0):
    model.zero_grad(set_to_none=True)
    diff = DiffusionArgs(window_dropout=window_dropout, memory_noise=memory_noise)
    loss, stats = rectified_flow_loss(model, lat, K, c2w, starts, diff,
                                      generator=torch.Generator().manual_seed(seed), ctx=ctx, return_stats=False)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return loss.detach(), grads, stats


def check_equivalence(rank: int, world: int, port: int, cases: list[dict], cp: int | None = None,
                      queries: str = "replicated") -> None:
    """Every case: cp loss, selection and (world-averaged) gradients equal the single-process ones.

    With dp > 1 every dp replica gets the same batch, so the world average must still equal one process.
    queries: the query stream's layout (CONTEXTS). Sharded, each rank also reads a chunk of its own
    (a different one per rank) and its output and selection must equal one process's for that chunk.
    """
    init(rank, world, port)
    try:
        layout = Layout.make(world, cp or world, rank)     # default: one cp group of every rank (dp = 1)
        cp_group, _ = build_groups(layout)
        for case in cases:
            dtype = case.get("dtype", torch.float64)
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            model = tiny_model(case["strategy"], dtype, case.get("merge", "gate"), case.get("frame_pos", True),
                               case.get("camera", "plucker"), case.get("top_k", 3), case.get("window", 3),
                               position=case.get("position", "sincos"), coarse=case.get("coarse", False))
            lat, K, c2w = batch(case["T"], dtype, repeat_frames=case.get("repeat"))
            aug = dict(window_dropout=case.get("window_dropout", 0.0), memory_noise=case.get("memory_noise", 0.0))
            ref_loss, ref_grads, ref_stats = loss_and_grads(model, lat, K, c2w, case["starts"], None, **aug)
            ctx = CONTEXTS[queries](cp_group, layout.cp_rank, layout.cp)
            loss, grads, stats = loss_and_grads(model, lat, K, c2w, case["starts"], ctx, **aug)
            name = f"{case} {queries} rank {rank}"
            if queries in ("sharded", "shipped"):
                check_own_chunk(model, lat, K, c2w, case["starts"], ctx, layout.cp_rank, tol, name)
            with torch.no_grad():                              # the query stream's output itself, not only the loss
                t0, C = case["starts"][-1], model.args.chunk_frames
                x = lat[:, t0:t0 + C] * 0.6 + 0.1
                tau = torch.full((1,), 0.4, dtype=dtype)
                cams = (K[:, t0:t0 + C], c2w[:, t0:t0 + C])
                ref_out, ref_st = model(x, tau, *cams, t0, model.encode_memory(lat[:, :t0], K[:, :t0], c2w[:, :t0]),
                                        return_stats=True)
                lo, hi = ctx.shard(t0)
                bank = model.encode_memory(lat[:, lo:hi], K[:, lo:hi], c2w[:, lo:hi], lo, ctx=ctx)
                out, st = model(x, tau, *cams, t0, bank, ctx=ctx, return_stats=True)
                if not torch.allclose(out, ref_out, atol=tol, rtol=tol):
                    raise AssertionError(f"{name}: output differs from single-process by "
                                         f"{(out - ref_out).abs().max().item():.3g}")
                # the logged attention entropy reads the whole bank too (shares merged across the group)
                if not torch.allclose(st["entropy"], ref_st["entropy"], atol=tol * 10, rtol=tol * 10):
                    raise AssertionError(f"{name}: attention entropy {st['entropy'].item()} != single-process "
                                         f"{ref_st['entropy'].item()}")
                for key in ("dispersion_low", "dispersion_high"):          # masses add up across the group
                    if not torch.allclose(st[key], ref_st[key], atol=tol * 10, rtol=tol * 10):
                        raise AssertionError(f"{name}: {key} {st[key].tolist()} != single-process {ref_st[key].tolist()}")
            if not torch.allclose(loss, ref_loss, atol=tol, rtol=tol):
                raise AssertionError(f"{name}: loss {loss.item()} != single-process {ref_loss.item()}")
            if "selected" in ref_stats["layers"][0] and queries == "replicated":   # sharded: check_own_chunk
                for li, (a, b) in enumerate(zip(stats["layers"], ref_stats["layers"])):
                    va, vb = a["selected"].where(a["selected_valid"], -1), b["selected"].where(b["selected_valid"], -1)
                    if case.get("repeat"):
                        # exact ties: keys of identical frames on different ranks differ by an ulp (GEMMs of
                        # other row counts), so only "equally good" can match one process, not the index
                        sa = b["scores"].gather(-1, a["selected"]).where(a["selected_valid"], 0).sum(-1)
                        sb = b["scores"].gather(-1, b["selected"]).where(b["selected_valid"], 0).sum(-1)
                        if not torch.allclose(sa, sb, atol=tol, rtol=tol):
                            raise AssertionError(f"{name}: layer {li} selection scores worse than single-process")
                    elif not torch.equal(va, vb):
                        raise AssertionError(f"{name}: layer {li} selected blocks differ from single-process")
                    mine = va.clone()
                    dist.broadcast(mine, group=cp_group, group_src=0)
                    if not torch.equal(mine, va):
                        raise AssertionError(f"{name}: layer {li} selection differs between ranks")
            for n, g in grads.items():
                g = g.clone()
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= world                                     # DeepSpeed's average over the world
                if not torch.allclose(g, ref_grads[n], atol=tol, rtol=tol * 10):
                    err = (g - ref_grads[n]).abs().max().item()
                    raise AssertionError(f"{name}: gradient of {n} differs from single-process by {err:.3g}")
            if stats.get("cp_bytes") is None or sum(stats["cp_bytes"].values()) <= 0:
                raise AssertionError(f"{name}: no cp bytes were counted")
    finally:
        dist.destroy_process_group()


def check_own_chunk(model, lat, K, c2w, starts, ctx, cp_rank, tol, name):
    """Sharded queries: each rank reads a different chunk in the same call; output and selection as one process."""
    t0, C = starts[cp_rank % len(starts)], model.args.chunk_frames
    with torch.no_grad():
        x = lat[:, t0:t0 + C] * 0.6 + 0.1
        tau = torch.full((1,), 0.4, dtype=lat.dtype)
        cams = (K[:, t0:t0 + C], c2w[:, t0:t0 + C])
        ref_out, ref_st = model(x, tau, *cams, t0, model.encode_memory(lat[:, :t0], K[:, :t0], c2w[:, :t0])
                                if t0 else None, return_stats=True)
        last = max(starts)
        lo, hi = ctx.shard(last)
        bank = model.encode_memory(lat[:, lo:hi], K[:, lo:hi], c2w[:, lo:hi], lo, ctx=ctx)
        out, st = model(x, tau, *cams, t0, bank, ctx=ctx, return_stats=True)
    if not torch.allclose(out, ref_out, atol=tol, rtol=tol):
        raise AssertionError(f"{name}: own chunk {t0}: output differs by {(out - ref_out).abs().max().item():.3g}")
    if not torch.allclose(st["entropy"], ref_st["entropy"], atol=tol * 10, rtol=tol * 10):
        raise AssertionError(f"{name}: own chunk {t0}: entropy {st['entropy'].item()} != {ref_st['entropy'].item()}")
    for li, (a, b) in enumerate(zip(st["layers"], ref_st["layers"])):
        if "selected" in b and not torch.equal(a["selected"].where(a["selected_valid"], -1),
                                               b["selected"].where(b["selected_valid"], -1)):
            raise AssertionError(f"{name}: own chunk {t0}: layer {li} selected blocks differ from single-process")
