"""Context parallelism with real processes (gloo, CPU): cp = 2 and 4 reproduce the single-process model."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.multiprocessing as mp
from cp_check import check_equivalence

from decmem.model.memory import LocalMemory, MemoryContext
from decmem.training.context_parallel import CPMemory, Layout, shard_range
from decmem.training.distributed import free_port
from decmem.training.sequence_parallel import SPMemory

CASES = [
    dict(strategy="decmem", T=11, starts=[7, 9]),                       # 9 bank frames: not divisible by 2 or 4
    dict(strategy="decmem", T=10, starts=[8], merge="joint"),
    dict(strategy="decmem", T=8, starts=[6], top_k=1),                  # candidates only on the first ranks
    dict(strategy="decmem", T=12, starts=[5, 10], dtype=torch.float32),
    dict(strategy="decmem", T=10, starts=[8], frame_pos=False, camera="none", repeat=[(5, 1), (6, 2), (7, 3)]),  # ties
    dict(strategy="decmem", T=11, starts=[7, 9], merge="residual", coarse=True, camera="prope", position="rope"),
    dict(strategy="decmem", T=10, starts=[4, 8], merge="joint", coarse=True, top_k=1),   # coarse candidates on few ranks
    dict(strategy="decmem", T=12, starts=[4, 6, 8, 10], merge="residual", coarse=True, camera="prope", position="rope",
         window_dropout=0.5),                                           # chunks 4 and 6 lose their window, 8 and 10 keep it
    dict(strategy="decmem", T=11, starts=[7, 9], merge="residual", coarse=True, camera="prope", position="rope",
         memory_noise=0.5),                                             # noisy bank frames, drawn once for all ranks
    dict(strategy="dense", T=9, starts=[7], camera="prope", position="rope"),
    dict(strategy="dense_decay", T=9, starts=[4, 7]),
    dict(strategy="window", T=9, starts=[7]),
    dict(strategy="fov_frames", T=11, starts=[9]),
]


@pytest.mark.parametrize("world", [2, 4])
def test_cp_matches_single_process(world):
    cases = [c for c in CASES if min(c["starts"]) >= world]            # every rank holds >= 1 bank frame
    mp.spawn(check_equivalence, args=(world, free_port(), cases), nprocs=world, join=True)


def test_dp2_x_cp2_groups():
    cases = [CASES[0], CASES[5]]                                        # decmem and dense, 4 processes as 2 x 2
    mp.spawn(check_equivalence, args=(4, free_port(), cases, 2), nprocs=4, join=True)


def test_layout_and_shard_rules():
    assert Layout.make(4, 2, 3).dp_rank == 1 and Layout.make(4, 2, 3).cp_rank == 1
    with pytest.raises(ValueError, match="world size 6 does not factor as dp x cp with cp=4"):
        Layout.make(6, 4, 0)
    assert [shard_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="a bank of 3 frames cannot be split across cp=4"):
        shard_range(3, 4, 0)


def test_both_memory_contexts_implement_the_protocol():
    """The attention layer calls the same methods on one process and under cp: every method of the protocol,
    with its parameters, exists on both implementations (they had drifted before the protocol existed)."""
    methods = [n for n, f in vars(MemoryContext).items() if callable(f) and not n.startswith("_")]
    assert {"select_blocks", "merge_partials", "window_kv", "memory_halo", "bank_cameras", "bytes_moved",
            "fetch_blocks", "query_slots", "chunk_loss"} <= set(methods)
    for impl in (LocalMemory, CPMemory, SPMemory):
        for name in methods:
            assert callable(getattr(impl, name, None)), f"{impl.__name__} lacks {name}"
            want = list(inspect.signature(getattr(MemoryContext, name)).parameters)[1:]
            got = list(inspect.signature(getattr(impl, name)).parameters)[1:]
            assert got == want, f"{impl.__name__}.{name}{got} != protocol {want}"
