"""Sharded query stream (issue 17) with real processes (gloo, CPU): cp = 2 and 4 reproduce one process."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from cp_check import check_equivalence

from decmem.training.distributed import free_port
from decmem.training.sequence_parallel import chunk_range

#################################################################################
#                                    Cases                                      #
#################################################################################

DECMEM = dict(strategy="decmem", merge="residual", coarse=True, camera="prope", position="rope")
CASES = [
    dict(DECMEM, T=12, starts=[4, 6, 8, 10]),                          # every chunk a target; 10 bank frames
    dict(DECMEM, T=11, starts=[7, 9], merge="gate"),                   # 2 chunks: at cp = 4 two ranks own none
    dict(DECMEM, T=10, starts=[4, 8], merge="joint", top_k=1),         # candidates on few ranks
    dict(DECMEM, T=12, starts=[4, 6, 8, 10], window_dropout=0.5, memory_noise=0.5),
    dict(strategy="decmem", T=12, starts=[5, 10], dtype=torch.float32),
    dict(strategy="window", T=11, starts=[5, 7, 9]),
    dict(strategy="dense", T=9, starts=[4, 7], camera="prope", position="rope"),
    dict(strategy="dense_decay", T=9, starts=[4, 7]),
    dict(strategy="fov_frames", T=11, starts=[7, 9]),
]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_queries_match_single_process(world):
    cases = [c for c in CASES if min(c["starts"]) >= world]            # every rank holds >= 1 bank frame
    mp.spawn(check_equivalence, args=(world, free_port(), cases, None, "sharded"), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_shipped_queries_match_single_process(world):
    """train.cp_block_read=ship: the query groups travel to the holders of their blocks, (out, lse) come back."""
    cases = [c for c in CASES if min(c["starts"]) >= world and c["strategy"] in ("decmem", "fov_frames")]
    mp.spawn(check_equivalence, args=(world, free_port(), cases, None, "shipped"), nprocs=world, join=True)


@pytest.mark.parametrize("queries", ["sharded", "shipped"])
def test_sharded_queries_dp2_x_cp2(queries):
    mp.spawn(check_equivalence, args=(4, free_port(), [CASES[0], CASES[6]], 2, queries), nprocs=4, join=True)


def test_chunk_ranges_are_contiguous_and_balanced():
    assert [chunk_range(7, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [chunk_range(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]    # two ranks own none


def test_cp_scalars_log_bytes_per_layer_and_imbalance():
    from decmem.training.context_parallel import cp_scalars

    out = cp_scalars({"sp_kv": 800, "sp_scores": 80}, {"chunks": [2, 2, 1, 1]}, micro_batches=2, depth=4)
    assert out["cp/bytes_per_step"] == 880
    assert out["cp/bytes_per_layer/sp_kv"] == 100 and out["cp/bytes_per_layer/sp_scores"] == 10
    assert out["cp/imbalance_chunks"] == pytest.approx(2 / 1.5) and out["cp/chunks_per_rank_max"] == 2


def test_bench_sp_runs_both_layouts_on_the_same_loss(tmp_path):
    """`decmem bench sp` on a tiny model: the four timed layouts compute the same loss; bytes come per collective."""
    from decmem.bench.sp import run_sp_bench
    from decmem.training.config import load_config
    from decmem.training.run_config import RunConfig

    cfg = load_config(RunConfig, None, ["model.size=debug", "bench_generate.latent_h=8", "bench_generate.latent_w=8",
                                        "model.attention.block_size=4", "model.chunk_frames=2"])
    res = run_sp_bench(cfg, 8, [2], [8], str(tmp_path / "sp.json"), steps=1, log=lambda *a: None)
    losses = [r["loss"] for r in res["time"]]
    assert [r["queries"] for r in res["time"]] == ["one process", "replicated", "sharded", "shipped"]
    assert all(x == pytest.approx(losses[0], rel=1e-5) for x in losses[1:])
    shipped = next(r for r in res["bytes"] if r["queries"] == "shipped")
    assert shipped["by_collective"]["sp_ship"] > 0 and "sp_kv" not in shipped["by_collective"]
    sharded = next(r for r in res["bytes"] if r["queries"] == "sharded")
    assert sharded["by_collective"]["sp_kv"] > 0 and sharded["every_chunk_chunks_per_rank"] == 2
    # each rank's chunk sits at the end of its bank range: rank 0's candidates are all its own, so only rank 1's
    # pooled queries [1, 4 heads, 8 query blocks, 16] travel (to rank 0), and only rank 0's answers come back:
    # k = 8 (score, index) pairs per (head, query block), a (out [16], lse) per (head, query block), fp32
    one_way = 1 * 4 * 8 * 4
    assert sharded["by_collective"]["sp_queries"] == one_way * 16
    assert sharded["by_collective"]["sp_scores"] == one_way * 2 * 8
    assert sharded["by_collective"]["sp_coarse"] == one_way * (16 + 1)
    assert (tmp_path / "sp.json").exists()
