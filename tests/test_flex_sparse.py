"""Block-sparse SGM read with FlexAttention (``sparse_backend: flex``) equals the gather path and the dense reference.

The flex path reads the selected bank blocks in place through a BlockMask built from the selected block indices;
the retrieval bias enters through score_mod. Forward (out, lse) and gradients (q, k, v, the selected scores upstream of
the bias, every parameter, the bank) must match the gather path (``sparse_backend: gather``) and the masked-dense math.
"""
from __future__ import annotations

import math

import pytest
import torch
from reference import reference_decmem

from decmem.model.attention import AttentionArgs, DecMemAttention, _gather_blocks
from decmem.model.block_sparse import SPARSE_BACKENDS, attend_blocks_flex
from decmem.model.blocks import pool_blocks
from decmem.model.kernels import attend
from decmem.model.memory import BankLayer
from decmem.model.retrieval import selected_log_weights

F64 = torch.float64
F32 = torch.float32


# ------------------------------------------------------------------------------------
# Kernel: attend_blocks_flex == gather + attend == masked dense softmax
# ------------------------------------------------------------------------------------

def uneven_selection(B, H, nqb, nkb, k, seed):
    """Distinct valid blocks per row, a varying number of them (0..k), invalid slots pointing anywhere,
    including at a block a valid slot of the same row selected (it must not be read twice nor dropped)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.zeros(B, H, nqb, k, dtype=torch.long)
    valid = torch.zeros(B, H, nqb, k, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in range(nqb):
                n = int(torch.randint(0, k + 1, (1,), generator=g))
                if (b, h, j) == (0, 0, 0):
                    n = 0                                     # a query block with nothing selected: out 0, lse -inf
                if (b, h, j) == (0, 0, 1):
                    n = k                                     # a full row
                pick = torch.randperm(nkb, generator=g)[:n].sort().values
                idx[b, h, j, :n] = pick
                valid[b, h, j, :n] = True
                if n < k:                                     # padding slots: a duplicate of a valid block, or block 0
                    idx[b, h, j, n:] = pick[0] if n and j % 2 else 0
    return idx, valid


def dense_reference(q, k, v, idx, valid, bias, Bs):
    """Every key of the bank, masked to the selected blocks, bias added per selected block; fp64."""
    B, H, Nq, d = q.shape
    nkb = k.shape[2] // Bs
    allowed = torch.zeros(B, H, Nq // Bs, nkb, dtype=torch.bool)
    table = torch.zeros(B, H, Nq // Bs, nkb, dtype=F64)
    for p in valid.nonzero().tolist():
        allowed[p[0], p[1], p[2], idx[tuple(p)]] = True
        if bias is not None:
            table[p[0], p[1], p[2], idx[tuple(p)]] = bias[tuple(p)].double()
    expand = lambda t: t.repeat_interleave(Bs, 2).repeat_interleave(Bs, 3)            # noqa: E731
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d) + expand(table)
    logits = logits.masked_fill(~expand(allowed), -math.inf)
    lse = torch.logsumexp(logits, -1)
    return torch.softmax(logits, -1).nan_to_num(0.0) @ v.double(), lse


def gather_path(q, k, v, idx, valid, bias, Bs, backend):
    B, H, Nq, d = q.shape
    nqb = Nq // Bs
    kb = _gather_blocks(k.view(B, H, 1, k.shape[2], d), idx, Bs)
    vb = _gather_blocks(v.view(B, H, 1, v.shape[2], d), idx, Bs)
    out, lse = attend(q.view(B, H, nqb, Bs, d), kb, vb, key_bias=None if bias is None else bias.repeat_interleave(Bs, -1),
                      key_mask=valid.repeat_interleave(Bs, -1), backend=backend)
    return out.reshape(B, H, Nq, d), lse.reshape(B, H, Nq)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 2e-5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_flex_kernel_matches_gather_and_dense(dtype, tol, with_bias):
    B, H, Bs, nqb, nkb, k, d = 2, 3, 4, 5, 9, 3, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, nqb * Bs, d, generator=g, dtype=dtype, requires_grad=True)
    kk = torch.randn(B, H, nkb * Bs, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, nkb * Bs, d, generator=g, dtype=dtype, requires_grad=True)
    scores = torch.randn(B, H, nqb, k, generator=g, dtype=dtype, requires_grad=True)   # upstream of the bias
    idx, valid = uneven_selection(B, H, nqb, nkb, k, seed=1)
    leaves = [q, kk, v] + ([scores] if with_bias else [])

    def run(fn):
        bias = selected_log_weights(scores, valid) if with_bias else None
        out, lse = fn(bias)
        finite = torch.isfinite(lse)
        wo = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
        wl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
        loss = (out.double() * wo).sum() + (torch.where(finite, lse.double(), 0) * wl).sum()
        return out.double(), lse.double(), torch.autograd.grad(loss, leaves)

    flex = run(lambda bias: attend_blocks_flex(q, kk, v, idx, valid, bias, Bs))
    gath = run(lambda bias: gather_path(q, kk, v, idx, valid, bias, Bs, "auto"))
    dense = run(lambda bias: dense_reference(q, kk, v, idx, valid, bias, Bs))
    assert flex[0].shape == (B, H, nqb * Bs, d) and flex[1].shape == (B, H, nqb * Bs)
    assert torch.isinf(flex[1][0, 0, :Bs]).all() and (flex[0][0, 0, :Bs] == 0).all()    # nothing selected
    assert torch.equal(torch.isfinite(flex[1]), torch.isfinite(dense[1]))
    for other in (gath, dense):
        torch.testing.assert_close(flex[0], other[0], atol=tol, rtol=tol)
        fin = torch.isfinite(other[1])
        torch.testing.assert_close(flex[1][fin], other[1][fin], atol=tol, rtol=tol)
        for a, b in zip(flex[2], other[2]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b.double(), atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("S,tile", [(4, 4), (6, 4), (4, 8), (20, 16)])
def test_block_mask_lists_exactly_the_tiles_of_the_selection(S, tile):
    """Kernel tiles = retrieval blocks (all full) when they coincide; otherwise every tile that overlaps a selected
    block and no other, as partial tiles (S = 20 is the paper-scale configs' 5x4 block, tile 16 the CUDA kernel's)."""
    from decmem.model.block_sparse import _selection_block_mask

    B, H, nqb, nkb, k = 2, 2, 5, 9, 3
    idx, valid = uneven_selection(B, H, nqb, nkb, k, seed=3)
    safe = torch.where(valid, idx, 0)
    allowed = torch.zeros(B, H, nqb, nkb, dtype=torch.int32).scatter_add_(-1, safe, valid.int()) > 0
    Nq, Nk = nqb * S, nkb * S
    bm = _selection_block_mask(allowed, safe, valid, S, tile, Nq, Nk)
    tok = allowed.repeat_interleave(S, 2).repeat_interleave(S, 3)                       # [B, H, Nq, Nk]
    pad = torch.nn.functional.pad(tok, (0, (-Nk) % tile, 0, (-Nq) % tile))
    n_qt, n_kt = pad.shape[2] // tile, pad.shape[3] // tile
    want = pad.view(B, H, n_qt, tile, n_kt, tile).any(5).any(3)                       # tiles holding a selected key
    assert torch.equal(bm.to_dense().bool(), want)
    if tile == S:
        assert bm.full_kv_num_blocks is not None and int(bm.kv_num_blocks.sum()) == 0   # full blocks, no mask_mod
        assert torch.equal(want, allowed)
    else:
        assert bm.full_kv_num_blocks is None                                            # all partial: mask_mod cuts


@pytest.mark.parametrize("S,tile", [(6, 4), (4, 8)])
def test_flex_kernel_with_tiles_unlike_blocks(S, tile):
    B, H, nqb, nkb, k, d = 2, 2, 3, 7, 3, 8
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, H, nqb * S, d, generator=g, dtype=F64, requires_grad=True)
    kk = torch.randn(B, H, nkb * S, d, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, nkb * S, d, generator=g, dtype=F64, requires_grad=True)
    scores = torch.randn(B, H, nqb, k, generator=g, dtype=F64, requires_grad=True)
    idx, valid = uneven_selection(B, H, nqb, nkb, k, seed=2)
    res = []
    for fn in (lambda b: attend_blocks_flex(q, kk, v, idx, valid, b, S, tile=tile),
               lambda b: dense_reference(q, kk, v, idx, valid, b, S)):
        out, lse = fn(selected_log_weights(scores, valid))
        fin = torch.isfinite(lse)
        loss = (out * out.detach().cos()).sum() + torch.where(fin, lse, 0).sum()
        res.append((out, lse, torch.autograd.grad(loss, [q, kk, v, scores])))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-12, rtol=1e-12)
    for a, b in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_flex_kernel_under_no_grad_and_bad_shapes():
    B, H, Bs, d = 1, 2, 4, 8
    q, k = torch.randn(B, H, 8, d), torch.randn(B, H, 12, d)
    idx, valid = torch.tensor([[[[0, 2], [1, 1]]]]).expand(B, H, 2, 2), torch.tensor([[[[True, True], [True, False]]]]).expand(B, H, 2, 2)
    with torch.no_grad():
        out, lse = attend_blocks_flex(q, k, k, idx, valid, None, Bs)
    ref = dense_reference(q, k, k, idx, valid, None, Bs)
    torch.testing.assert_close(out.double(), ref[0], atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="block"):
        attend_blocks_flex(q[:, :, :7], k, k, idx, valid, None, Bs)
    with pytest.raises(ValueError, match="block"):
        attend_blocks_flex(q, k[:, :, :11], k[:, :, :11], idx, valid, None, Bs)


# ------------------------------------------------------------------------------------
# Layer: DecMemAttention(sparse_backend=flex) == sparse_backend=gather == reference_decmem
# ------------------------------------------------------------------------------------

def layer(sparse_backend, dim, heads, dtype=F64, **kw):
    torch.manual_seed(0)
    m = DecMemAttention(dim, heads, AttentionArgs(sparse_backend=sparse_backend, **kw)).to(dtype)
    if m.gate is not None:
        with torch.no_grad():
            m.gate.weight.normal_(0, 0.3)
    return m


def bank_of(B, H, T, Nf, d, Bs, dtype, seed=1, frame_offset=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, Nf, d, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, H, T, Nf, d, generator=g, dtype=dtype).requires_grad_(True)
    kp, vp = pool_blocks(k, Bs).view(B, H, T, Nf // Bs, d), pool_blocks(v, Bs).view(B, H, T, Nf // Bs, d)
    return k, v, BankLayer(k, v, kp, vp, frame_offset)


def run_layer(m, x, kb, vb, bank, chunk_start, Nf, **kw):
    out, stats = m(x, bank, chunk_start, Nf, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    leaves = [x, kb, vb, *m.parameters()]
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    return out, stats, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]


@pytest.mark.parametrize("merge,bias,coarse,drop", [
    ("residual", True, True, False), ("residual", False, False, True), ("gate", True, False, False),
    ("joint", True, True, True), ("joint", False, True, False)])
def test_layer_flex_matches_gather_and_reference_fp64(merge, bias, coarse, drop):
    """Batch 2, 3 heads, uneven selections (top_k above the candidate count for some chunk starts), fp64."""
    from test_attention import chunk_positions

    B, H, T, Nf, d, Bs, C = 2, 3, 7, 16, 8, 4, 2
    kw = dict(block_size=Bs, top_k=6, window=3, merge=merge, retrieval_bias=bias, coarse=coarse)
    for chunk_start in (3, 7):                                    # 3: 1 candidate frame (4 blocks) < top_k
        kb, vb, bank = bank_of(B, H, T, Nf, d, Bs, F64)
        x = torch.randn(B, C * Nf, d * H, dtype=F64, generator=torch.Generator().manual_seed(chunk_start),
                        requires_grad=True)
        pos = chunk_positions(C, Nf, d)
        keep = torch.tensor([False, True]) if drop else None
        runs = {}
        for sb in SPARSE_BACKENDS:
            m = layer(sb, d * H, H, **kw)
            runs[sb] = run_layer(m, x, kb, vb, bank, chunk_start, Nf, pos=pos, alm_keep=keep)
        ref, selected = reference_decmem(m, x, kb, vb, chunk_start, Nf, merge, bias, pos, keep)
        torch.testing.assert_close(runs["flex"][0], ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(runs["flex"][0], runs["gather"][0], atol=1e-12, rtol=1e-12)
        assert torch.equal(runs["flex"][1]["selected"], runs["gather"][1]["selected"])
        for a, b in zip(runs["flex"][2], runs["gather"][2]):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
        gr = torch.autograd.grad((ref * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3),
                                                    dtype=F64)).sum(), [x, kb, vb])
        for a, b in zip(runs["flex"][2][:3], gr):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("merge", ["residual", "joint"])
def test_layer_flex_matches_gather_fp32(merge):
    B, H, T, Nf, d, Bs, C = 2, 4, 12, 16, 8, 4, 2
    kw = dict(block_size=Bs, top_k=3, window=3, merge=merge, coarse=True)
    kb, vb, bank = bank_of(B, H, T, Nf, d, Bs, F32)
    x = torch.randn(B, C * Nf, d * H, generator=torch.Generator().manual_seed(2), requires_grad=True)
    runs = {sb: run_layer(layer(sb, d * H, H, dtype=F32, **kw), x, kb, vb, bank, 10, Nf) for sb in SPARSE_BACKENDS}
    torch.testing.assert_close(runs["flex"][0], runs["gather"][0], atol=2e-6, rtol=2e-5)
    for a, b in zip(runs["flex"][2], runs["gather"][2]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


def test_layer_flex_on_a_bank_shard():
    """A cp shard (frame_offset > 0): selected blocks held by another rank are masked, as on the gather path."""
    B, H, Nf, d, Bs = 2, 2, 8, 8, 4
    kb, vb, bank = bank_of(B, H, 5, Nf, d, Bs, F64, frame_offset=3)           # holds global frames 3..7
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, 2, Bs, d, generator=g, dtype=F64, requires_grad=True)
    n_b = Nf // Bs
    idx = torch.randint(0, 10 * n_b, (B, H, 2, 5), generator=g)              # global blocks, some on other ranks
    valid = torch.rand(B, H, 2, 5, generator=g) > 0.2
    scores = torch.randn(B, H, 2, 5, generator=g, dtype=F64, requires_grad=True)
    # distinct valid blocks per row, as top-k gives them
    for p in valid.nonzero().tolist():
        row = idx[p[0], p[1], p[2]]
        if (row[: p[3]] == row[p[3]]).any():
            valid[tuple(p)] = False
    res = {}
    for sb in SPARSE_BACKENDS:
        m = layer(sb, d * H, H, block_size=Bs)
        out, lse = m._attend_blocks(q, bank, idx, valid, selected_log_weights(scores, valid))
        fin = torch.isfinite(lse)
        loss = (out * out.detach().sin()).sum() + torch.where(fin, lse, 0).sum()
        res[sb] = (out, lse, torch.autograd.grad(loss, [q, kb, vb, scores]))
    torch.testing.assert_close(res["flex"][0], res["gather"][0], atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isfinite(res["flex"][1]), torch.isfinite(res["gather"][1]))
    for a, b in zip(res["flex"][2], res["gather"][2]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_fov_frames_flex_matches_gather():
    """fov_frames reads whole frames for every query through the same block path (one query group of N tokens)."""
    B, H, T, Nf, d, Bs = 2, 2, 10, 8, 8, 4
    frames, valid = torch.tensor([[2, 5, 0], [7, 1, 1]]), torch.tensor([[True, True, False], [True, True, False]])
    kb, vb, bank = bank_of(B, H, T, Nf, d, Bs, F64)
    x = torch.randn(B, Nf, d * H, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    runs = {sb: run_layer(layer(sb, d * H, H, strategy="fov_frames", block_size=Bs, window=2), x, kb, vb, bank, 10, Nf,
                          fov_frames=(frames, valid)) for sb in SPARSE_BACKENDS}
    torch.testing.assert_close(runs["flex"][0], runs["gather"][0], atol=1e-12, rtol=1e-12)
    for a, b in zip(runs["flex"][2], runs["gather"][2]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_sparse_backend_is_validated():
    assert SPARSE_BACKENDS == ("gather", "flex")
    assert AttentionArgs().sparse_backend == "gather"
    with pytest.raises(ValueError, match="sparse_backend"):
        AttentionArgs(sparse_backend="triton")


# ------------------------------------------------------------------------------------
# Whole model: VideoDiT loss and gradients, flex == gather
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(F64, 1e-11), (F32, 1e-5)])
def test_videodit_flex_equals_default(dtype, tol, monkeypatch):
    from test_dit import cameras

    import decmem.model.attention as attention
    from decmem.model.diffusion import DiffusionArgs, rectified_flow_loss
    from decmem.model.dit import ModelArgs, VideoDiT

    lat = torch.randn(2, 10, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=F64).to(dtype)
    K, c2w = cameras(2, 10, dtype=dtype)
    calls = []
    monkeypatch.setattr(attention, "attend_blocks_flex", lambda *a, **k: calls.append(1) or attend_blocks_flex(*a, **k))
    res = {}
    for sb in SPARSE_BACKENDS:
        torch.manual_seed(0)
        att = AttentionArgs(block_size=4, top_k=3, window=3, sparse_backend=sb)
        m = VideoDiT(ModelArgs(size="debug", chunk_frames=2, attention=att)).to(dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=dtype) * 0.05)
        gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
        loss = rectified_flow_loss(m, lat, K, c2w, [4, 8], DiffusionArgs(), generator=gens)[0]
        res[sb] = (loss, torch.autograd.grad(loss, list(m.parameters())))
    assert len(calls) == 2 * m.args.depth, len(calls)             # flex read the memory in every layer, both chunks
    torch.testing.assert_close(res["flex"][0], res["gather"][0], atol=tol, rtol=tol)
    for a, b in zip(res["flex"][1], res["gather"][1]):
        torch.testing.assert_close(a, b, atol=tol, rtol=10 * tol)
