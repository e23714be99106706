"""The SGM read as block-sparse attention: FlexAttention over the selected bank blocks, read in place.

The default path (``sparse_backend: gather``, model/attention.py ``_attend_blocks``) copies each query block's
k selected blocks into a dense ``[B, H, n_qb, k*S, d]`` tensor and runs ``attend`` on it. ``sparse_backend: flex``
instead hands the bank's token K/V ``[B, H, T*N_f, d]`` to FlexAttention with a ``BlockMask`` built here from the
same selection: query block j of (batch b, head h) reads exactly the KV blocks ``blocks[b, h, j, valid]``, as
*full* blocks (a selected block is read whole, so the kernel never evaluates a mask inside it). The retrieval
bias (log softmax of the selected scores, one value per selected block) enters through ``score_mod`` as a lookup
in a ``[B, H, n_qb, n_kv_blocks]`` table scattered from the selection; FlexAttention differentiates captured
score_mod tensors, so the gradient reaches the selected scores as on the gather path. Empty rows (nothing
selected, or nothing on this rank) give out 0 and lse -inf, as ``attend`` does; the lse is returned in natural
log with its gradient, so the LSE merges of the layer are unchanged.

Devices:
  cuda  ``torch.compile``d ``flex_attention`` (the fused Triton kernel, forward and backward). The mask's tiles
        are the retrieval blocks themselves when S is a power of two >= 16 (Triton's dot tiles); otherwise (S = 20
        in the paper-scale configs) tiles of 16 overlapping the selected blocks, cut exactly by the mask_mod.
        Not yet run on a GPU (no device in the session that wrote this; issue #19's gpu-check should).
  cpu   FlexAttention's own reference implementation (the higher-order op's eager math: the scores of every
        bank key are materialised, then the mask applied), called directly, because the public API refuses
        backward on CPU. Same masks, score_mod and autograd formulas as the compiled kernel; only for testing
        and small runs, it is dense in cost.

Requirement: within a row, valid block indices are distinct (top-k and field-of-view selection give that). The
gather path would read a duplicated block twice; here it would be read once.
"""
from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

SPARSE_BACKENDS = ("gather", "flex")

_compiled_flex = None


def attend_blocks_flex(q, k, v, blocks, valid, block_bias=None, block_size=16, scale=None, tile=None):
    """Each query block reads its selected KV blocks of k/v in place.

    q: [B, H, Nq, d], Nq = n_qb * S (S = block_size); k, v: [B, H, Nk, d], Nk = n_kb * S;
    blocks: [B, H, n_qb, k] long, KV block indices in [0, n_kb) (any value where not valid);
    valid: [B, H, n_qb, k] bool; block_bias: [B, H, n_qb, k] float or None, added to every logit of that block.
    tile: the BlockMask's block size (the kernel's unit of sparsity). None: S where the fused kernel can tile it
    (a power of two >= 16, or any S off CUDA), else 16. With tile == S every selected block is a full tile; otherwise
    (e.g. S = 20 for 5x4 token tiles) the mask lists every tile that overlaps a selected block as partial and the
    mask_mod cuts it back to the exact selection, reading a superset of tokens.
    Returns out [B, H, Nq, d] in q's dtype and lse [B, H, Nq] (fp32, or fp64 for fp64 input).
    """
    B, H, Nq, d = q.shape
    Nk, S = k.shape[2], block_size
    if Nq % S or Nk % S:
        raise ValueError(f"query length {Nq} and key length {Nk} must be whole numbers of blocks of {S} tokens")
    n_qb, n_kb = Nq // S, Nk // S
    if blocks.shape[:3] != (B, H, n_qb) or valid.shape != blocks.shape:
        raise ValueError(f"blocks {tuple(blocks.shape)} / valid {tuple(valid.shape)} must be [B, H, n_qb={n_qb}, k] "
                         f"for query blocks of {S} tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    safe = torch.where(valid, blocks, torch.zeros_like(blocks))                       # [B, H, n_qb, k]

    # which KV blocks each query block reads: the mask_mod's table (the reference path evaluates it everywhere)
    hits = torch.zeros(B, H, n_qb, n_kb, dtype=torch.int32, device=dev)
    allowed = hits.scatter_add_(-1, safe, valid.to(torch.int32)) > 0                  # [B, H, n_qb, n_kb]
    table = None
    if block_bias is not None:                                                        # differentiable scatter
        zero = torch.zeros((), dtype=work, device=dev)
        table = torch.zeros(B, H, n_qb, n_kb, dtype=work, device=dev).scatter_add(
            -1, safe, torch.where(valid, block_bias.to(work), zero))

    if tile is None:
        tile = S if dev.type != "cuda" or (S >= 16 and S & (S - 1) == 0) else 16

    block_mask = _selection_block_mask(allowed, safe, valid, S, tile, Nq, Nk)
    if dev.type == "cuda":
        out, lse = _flex_cuda(q, k, v, table, block_mask, scale, S, tile)
    else:
        out, lse = _flex_reference(q, k, v, table, allowed, block_mask, scale, S)
    return out, lse.to(work)


def _selection_block_mask(allowed, safe, valid, S, tile, Nq, Nk):
    """The BlockMask of a selection: allowed [B, H, n_qb, n_kb] bool, safe/valid [B, H, n_qb, k]."""
    n_qb, n_kb, dev = allowed.shape[2], allowed.shape[3], allowed.device

    def mask_mod(b, h, qi, kv):
        return allowed[b, h, qi // S, kv // S]

    if tile == S:
        # the same selection as block lists, all "full" blocks: valid indices first, ascending
        count = valid.sum(-1, dtype=torch.int32)                                      # [B, H, n_qb]
        order = torch.where(valid, safe, torch.full_like(safe, n_kb)).sort(dim=-1).values
        full_idx = torch.where(order < n_kb, order, torch.zeros_like(order)).to(torch.int32)   # [B, H, n_qb, k]
        # BlockMask wants one column per KV block (it transposes the lists into per-KV-block query lists for the
        # backward); distinct valid blocks never exceed n_kb
        k_sel = full_idx.shape[-1]
        full_idx = full_idx[..., :n_kb] if k_sel >= n_kb else torch.nn.functional.pad(full_idx, (0, n_kb - k_sel))
        block_mask = BlockMask.from_kv_blocks(torch.zeros_like(count), torch.zeros_like(full_idx), count, full_idx,
                                              BLOCK_SIZE=(S, S), mask_mod=mask_mod, seq_lengths=(Nq, Nk))
    else:
        # tiles of the kernel that overlap a selected block, all partial (the mask_mod is exact inside them)
        oq = _overlap(-(-Nq // tile), n_qb, tile, S, dev)                             # [n_qt, n_qb]
        ok = _overlap(-(-Nk // tile), n_kb, tile, S, dev)                             # [n_kt, n_kb]
        tiles = (oq @ allowed.to(torch.float32) @ ok.transpose(0, 1)) > 0           # [B, H, n_qt, n_kt]
        count = tiles.sum(-1, dtype=torch.int32)
        idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        block_mask = BlockMask.from_kv_blocks(count, idx, BLOCK_SIZE=(tile, tile), mask_mod=mask_mod,
                                              seq_lengths=(Nq, Nk))
    return block_mask


def _overlap(n_tiles, n_blocks, tile, S, dev):
    """[n_tiles, n_blocks] float: 1 where tokens [t*tile, (t+1)*tile) and [b*S, (b+1)*S) intersect."""
    t = torch.arange(n_tiles, device=dev).unsqueeze(1)
    b = torch.arange(n_blocks, device=dev).unsqueeze(0)
    return ((b * S < (t + 1) * tile) & (t * tile < (b + 1) * S)).to(torch.float32)


def _flex_cuda(q, k, v, table, block_mask, scale, S, tile):
    """The public API, compiled: the fused block-sparse Triton kernel with its own backward."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    score_mod = None
    if table is not None:
        def score_mod(score, b, h, qi, kv):
            return score + table[b, h, qi // S, kv // S]
    # the kernel's tiles must divide the mask's blocks (the defaults are 64-128 wide)
    opts = {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
    out, aux = _compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              kernel_options=opts, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _flex_reference(q, k, v, table, allowed, block_mask, scale, S):
    """FlexAttention's higher-order op with its eager implementation (CPU): forward and backward in autograd.

    The public ``flex_attention`` raises on CPU when an input requires grad (there is no compiled CPU backward);
    the op itself runs its math implementation and the matching backward (``sdpa_dense_backward``), which also
    differentiates the captured score_mod tensor and the returned log-sum-exp. Captured tensors are passed as
    explicit buffers so autograd sees them. The op returns lse in base 2, as the kernel does.
    """
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options

    def mask_mod(b, h, qi, kv, allowed):
        return allowed[b, h, qi // S, kv // S]

    if table is None:
        def score_mod(score, b, h, qi, kv):
            return score
        buffers = ()
    else:
        def score_mod(score, b, h, qi, kv, table):
            return score + table[b, h, qi // S, kv // S]
        buffers = (table,)
    options = _apply_kernel_options(q, k, v, False, None, AuxRequest(lse=True))
    out, lse2, _ = flex_attention_hop(q, k, v, score_mod, (*block_mask.as_tuple()[:-1], mask_mod), scale, options,
                                      buffers, (allowed,))
    return out, lse2 * math.log(2.0)
