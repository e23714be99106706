"""The trainer's equivalences with explicit batches (real DeepSpeed ZeRO-3 engine, spawned ranks over gloo, CPU):
layouts and gradient accumulation take the same optimizer step. The trainer's runs through `decmem train` (learning,
checkpoints, resume, faults) are the table in tests/test_train_runs.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from decmem.data_pipeline.loader import DataArgs, ShardLoader
from decmem.training.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "debug.yaml")


#################################################################################
#           Equivalences with explicit batches (real engine, spawned ranks)     #
#################################################################################

def samples(data, n, clip_frames=12):
    loader = ShardLoader(DataArgs(data=data, clip_frames=clip_frames, min_context=2, prefetch=0, interleave=2),
                         chunk_frames=2)
    out = [loader.next_batch() for _ in range(n)]
    loader.close()
    return out


def batch_of(items, chunk_starts):
    return {"latents": torch.cat([i["latents"] for i in items]), "K": torch.cat([i["K"] for i in items]),
            "c2w": torch.cat([i["c2w"] for i in items]), "keys": [k for i in items for k in i["keys"]],
            "chunk_starts": chunk_starts}


def run_world(tmp_path, name, world, overrides, steps):
    out = str(tmp_path / f"{name}.pt")
    mp.start_processes(_entry, args=(world, free_port(), CONFIG, overrides, steps, out), nprocs=world,
                       start_method="spawn", join=True)
    return torch.load(out, weights_only=True)


def _entry(rank, world, port, config, overrides, steps, out):
    from train_check import run_steps

    run_steps(rank, world, port, config, overrides, steps, out)


def assert_close_weights(a, b, what, tol=2e-5):
    # Adam's update is invariant to a global gradient scale, so compare the (pre-clipping) norm too
    assert a["grad_norms"][0] == pytest.approx(b["grad_norms"][0], rel=1e-5), f"{what}: gradient norms differ"
    for k in a["weights"]:
        err = (a["weights"][k] - b["weights"][k]).abs().max().item()
        scale = a["weights"][k].abs().max().item() + 1e-3
        assert err <= tol * scale, f"{what}: {k} differs by {err:.3g} (scale {scale:.3g})"


def test_layout_equivalence_dp2_vs_cp2(tmp_path, data):
    """One optimizer step on the same global batch: (dp=2, cp=1) == (dp=1, cp=2) == one process."""
    s = samples(data, 2)
    starts = [4, 8]                                                   # 4 bank frames: 2 per cp rank
    both = batch_of(s, starts)
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}"]
    one = run_world(tmp_path, "one", 1, base + ["data.batch_size=2"], [[[both]]])
    dp2 = run_world(tmp_path, "dp2", 2, base + ["data.batch_size=1", "train.cp=1"],
                    [[[batch_of([s[0]], starts)], [batch_of([s[1]], starts)]]])
    cp2 = run_world(tmp_path, "cp2", 2, base + ["data.batch_size=2", "train.cp=2"], [[[both], [both]]])
    assert cp2["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert_close_weights(dp2, one, "dp=2 vs one process")
    assert_close_weights(cp2, one, "cp=2 vs one process")
    init = run_world(tmp_path, "init", 1, base + ["data.batch_size=2", "optim.lr=1e-9"], [[[both]]])
    moved = max((one["weights"][k] - init["weights"][k]).abs().max().item() for k in one["weights"])
    assert moved > 1e-4, "the step barely moved the weights: the comparison would be vacuous"


@pytest.mark.parametrize("cp,read", [(2, "fetch"), (4, "fetch"), (4, "ship")])
def test_sharded_queries_match_one_process(tmp_path, data, cp, read):
    """train.cp_queries=sharded through the real ZeRO-3 engine, 2 samples, 3 chunks: at cp = 2 rank 1 runs an idle
    slot, at cp = 4 rank 3 owns no chunk at all; their module calls and collectives must still match the others'
    and the step must be one process's, whether the selected blocks come to the queries or the reverse."""
    s = samples(data, 2)
    both = batch_of(s, [4, 6, 8])                                     # 8 bank frames: 2 per rank at cp = 4
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}", "data.batch_size=2"]
    one = run_world(tmp_path, "one", 1, base, [[[both]]])
    sharded = run_world(tmp_path, f"cp{cp}", cp, base + [f"train.cp={cp}", "train.cp_queries=sharded",
                                                         f"train.cp_block_read={read}"], [[[both]] * cp])
    assert sharded["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert_close_weights(sharded, one, f"sharded cp={cp} vs one process")


def test_own_history_step_matches_one_process(tmp_path, data):
    """diffusion.self_history=1: every rank rolls the clip out itself (ZeRO-3 gathers in every forward of it) and the
    sharded cp=2 step equals one process's; the step differs from plain teacher forcing's."""
    s = samples(data, 1)
    both = batch_of(s, [4, 6, 8])
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}", "data.batch_size=1",
            "data.min_context=2", "diffusion.self_history_steps=2"]
    one = run_world(tmp_path, "one", 1, base + ["diffusion.self_history=1.0"], [[[both]]])
    cp2 = run_world(tmp_path, "cp2", 2, base + ["diffusion.self_history=1.0", "train.cp=2", "train.cp_queries=sharded"],
                    [[[both]] * 2])
    plain = run_world(tmp_path, "plain", 1, base, [[[both]]])
    assert cp2["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert_close_weights(cp2, one, "own history, sharded cp=2 vs one process")
    assert abs(one["losses"][0] - plain["losses"][0]) > 1e-4, "the own history did not change the step"


def test_zero3_activation_checkpointing_equals_zero3(tmp_path, data):
    """ZeRO-3 with every parameter partitioned: recomputing each block in backward takes the same three steps as
    keeping the activations, with the query stream replicated (cp=2) and sharded (cp=2, fetch)."""
    s = samples(data, 2)
    both = batch_of(s, [4, 8])
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=3", f"data.data={data}", "data.batch_size=2",
            "train.cp=2", "train.zero3_persistence=0"]
    for queries in ("replicated", "sharded"):
        kept = run_world(tmp_path, f"kept_{queries}", 2, base + [f"train.cp_queries={queries}"], [[[both], [both]]] * 3)
        ckpt = run_world(tmp_path, f"ckpt_{queries}", 2, base + [f"train.cp_queries={queries}",
                                                                   "train.activation_checkpointing=true"],
                         [[[both], [both]]] * 3)
        assert ckpt["partitioned"] == kept["partitioned"] == len(kept["weights"]), "some parameter stayed whole"
        assert ckpt["losses"] == pytest.approx(kept["losses"], rel=1e-6)
        assert ckpt["grad_norms"] == pytest.approx(kept["grad_norms"], rel=1e-6)
        assert_close_weights(ckpt, kept, f"ZeRO-3 + activation checkpointing vs ZeRO-3 ({queries})", tol=1e-6)


def test_gradient_accumulation(tmp_path, data):
    """1 micro-batch of 4 == 2 micro-batches of 2 through DeepSpeed's accumulation."""
    s = samples(data, 4)
    starts = [3, 7]
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}"]
    big = run_world(tmp_path, "big", 1, base + ["data.batch_size=4"], [[[batch_of(s, starts)]]])
    acc = run_world(tmp_path, "acc", 1, base + ["data.batch_size=2", "train.grad_accum=2"],
                    [[[batch_of(s[:2], starts), batch_of(s[2:], starts)]]])
    assert acc["losses"][0] == pytest.approx(big["losses"][0], rel=1e-5)
    assert_close_weights(acc, big, "2 x batch 2 vs 1 x batch 4")
    # ZeRO-2 with activation checkpointing (the combination it needs) takes the same step as ZeRO-3 without
    ckpt = run_world(tmp_path, "ckpt", 1, base + ["data.batch_size=4", "train.activation_checkpointing=true",
                                                  "train.zero_stage=2"], [[[batch_of(s, starts)]]])
    assert_close_weights(ckpt, big, "ZeRO-2 + activation checkpointing vs ZeRO-3", tol=1e-6)
