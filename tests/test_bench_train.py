"""decmem bench train: points run full training steps in fresh processes; the memory-fit search is monotone."""
import json
import math

import pytest
import torch

from decmem.bench.common import LiveTensorPeak
from decmem.bench.train import fit_ratio, fit_search, format_table, run_point, run_train_bench
from decmem.model.block_sparse import attend_blocks_flex
from decmem.training.config import load_config
from decmem.training.run_config import RunConfig

TINY = ["model.size=debug", "model.chunk_frames=2", "model.attention.block_size=4", "model.attention.top_k=2",
        "model.attention.window=2", "bench_generate.latent_h=8", "bench_generate.latent_w=8",
        "bench_generate.threads=1"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(RunConfig, None, TINY)


def test_points_and_fit_nothing(cfg, tmp_path):
    """Two real points (subprocesses); a budget below any step's working set fits nothing, for both."""
    path = tmp_path / "train.json"
    rows = run_train_bench(cfg, ["decmem", "dense"], [16], str(path), log=lambda s: None,
                           memory_budget_gb=1e-4, steps=1, warmup=1, cap=64)
    points = {r["strategy"]: r for r in rows if r["kind"] == "point"}
    assert set(points) == {"decmem", "dense"}
    assert not [r for r in rows if r["kind"] == "search"]          # the search reused the measured points
    for r in points.values():
        assert r["status"] == "ok"
        for key in ("step_s", "tokens_per_s", "peak_rss_mb", "rss_before_mb", "step_rss_mb", "bank_tokens",
                    "attended_tokens"):
            assert key in r, key
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
        Nf = (8 // 2) * (8 // 2)
        assert r["tokens_per_frame"] == Nf and r["bank_tokens"] == 16 * Nf
        assert r["tokens_per_s"] == pytest.approx((16 + 2) * Nf / r["step_s"])
        assert 0 < r["step_rss_mb"] < r["peak_rss_mb"]
        # the dry run's estimate of the same step rides along: fp32 gradients and AdamW's m, v of these
        # parameters, plus the bank, activations and workspace, and the measured / estimated ratio
        assert r["est_grads_mb"] == pytest.approx(4 * r["params"] / 2**20, rel=1e-6)
        assert r["est_optimizer_mb"] == pytest.approx(8 * r["params"] / 2**20, rel=1e-6)
        assert r["est_activations_mb"] > 0 and r["est_bank_kv_mb"] > 0
        assert r["measured_vs_estimate"] == pytest.approx(r["step_rss_mb"] / r["est_step_mb"])
        assert 0 < r["live_peak_mb"] and r["live_vs_estimate"] == pytest.approx(r["live_peak_mb"] / r["est_step_mb"])
    # decmem reads top-k blocks + window + chunk; dense reads the whole bank + chunk
    assert points["decmem"]["attended_tokens"] == 2 * 4 + 1 * 16 + 2 * 16
    assert points["dense"]["attended_tokens"] == 16 * 16 + 2 * 16
    assert points["dense"]["vs_dense"] == 1.0
    fits = {r["strategy"]: r for r in rows if r["kind"] == "fit"}
    for f in fits.values():
        assert f["longest_fit_frames"] is None and f["first_miss_frames"] == 16 and not f["capped"]
    assert fit_ratio(rows) == 0.0
    saved = json.loads(path.read_text())
    assert len(saved) == len(rows) and all("machine" in r for r in saved)
    table = format_table(rows)
    assert "| decmem | 16 | 256 | 56 |" in table and "none (< 16)" in table


def test_live_tensor_peak_counts_storages_alive_together():
    """Storages alive together are summed (torch.ones' 2 MiB is alive while the add makes its 2 MiB: 5 MiB),
    a view is free, freed storages leave the count, and a tensor made before the mode is not counted."""
    before = torch.ones(1 << 20)
    with LiveTensorPeak() as live:
        a = torch.zeros(1 << 18)                       # 1 MiB of fp32
        b = torch.ones(1 << 19) + 1.0                  # 2 MiB (torch.ones' own 2 MiB is freed after the add)
        view = b[:10].view(2, 5)                       # shares b's storage
        assert live.bytes == 3 << 20
        del a, b, view
        c = before * 2                                 # 4 MiB, but a, b are gone
        assert live.bytes == 4 << 20
        del c
    assert live.peak == (1 + 2 + 2) << 20 and live.bytes == 0


def test_live_tensor_peak_sees_inside_flex_attention():
    """FlexAttention (sparse_backend=flex) is a higher-order op: the mode runs it (forward and backward, same
    results) and counts the score buffers its CPU reference makes inside, at least one fp32 [B, H, Nq, Nk]."""
    torch.manual_seed(0)
    B, H, S, n_qb, n_kb, d = 1, 2, 16, 4, 32, 8
    q, k, v = (torch.randn(B, H, n * S, d, requires_grad=True) for n in (n_qb, n_kb, n_kb))
    blocks = torch.randint(0, n_kb, (B, H, n_qb, 4))
    bias = torch.randn(B, H, n_qb, 4, requires_grad=True)
    valid = torch.ones_like(blocks, dtype=torch.bool)

    def step():
        out, lse = attend_blocks_flex(q, k, v, blocks, valid, bias, S)
        (out.square().sum() + lse.sum()).backward()
        grads = [t.grad.clone() for t in (q, k, v, bias)]
        for t in (q, k, v, bias):
            t.grad = None
        return out.detach(), grads

    ref, ref_grads = step()
    with LiveTensorPeak() as live:
        out, grads = step()
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert live.peak >= B * H * (n_qb * S) * (n_kb * S) * 4


def test_point_over_budget_is_stopped(cfg):
    """A search point whose working set exceeds the budget reports it (watchdog or after the step)."""
    r = run_point(cfg, "dense", 8, steps=1, warmup=0, budget_mb=0.5)
    assert r["status"] == "over_budget"
    assert r["step_rss_mb"] > 0.5


@pytest.mark.parametrize("limit", [1, 5, 16, 17, 100, 1000, 4096])
def test_fit_search_finds_the_limit_within_tol(limit):
    calls = []

    def fits(L):
        calls.append(L)
        return L <= limit

    res = fit_search(fits, start=16, cap=4096, tol=0.1)
    if limit < 16:
        assert res["longest"] is None and res["first_miss"] == 16 and calls == [16]
    elif limit >= 4096:
        assert res["capped"] and res["longest"] == 4096 and res["first_miss"] is None
    else:
        lo, hi = res["longest"], res["first_miss"]
        assert lo <= limit < hi and hi - lo <= max(1, int(0.1 * lo))
    assert len(calls) == len(set(calls)) <= 20


def test_fit_search_monotone_in_budget():
    """A larger budget never gives a shorter bank (memory = 20 MB/frame + 400 MB)."""
    prev = 0
    for budget in (100, 500, 900, 2000, 4000, 16000):
        res = fit_search(lambda L: 400 + 20 * L <= budget, start=4, cap=1024)
        got = res["longest"] or 0
        assert got >= prev
        prev = got
    assert 780 * 0.9 <= prev <= 780
