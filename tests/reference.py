"""Independent dense references for DecMem attention: full logits, explicit masks, Python top-k."""
from __future__ import annotations

import math

import torch


def python_topk(scores_row, k, eligible):
    """Top-k by (score desc, index asc) among eligible indices, in plain Python."""
    cand = [b for b in range(len(scores_row)) if eligible[b]]
    cand.sort(key=lambda b: (-float(scores_row[b]), b))
    return sorted(cand[:k])


def reference_decmem(m, x, bank_k, bank_v, chunk_start, Nf, merge, bias_on, pos=None, alm_keep=None):
    """Masked-dense DecMem read: [B, N, D]. bank_k/v: [B, H, T, N_f, d] (all frames, block-major, as stored).

    merge: joint / gate / residual, as the layer's args say; the coarse branch when m.args.coarse.
    pos: the chunk's TokenPositions (bank K/V are already transformed).
    alm_keep: [B] bool or None; a False sample's window holds only the chunk's own tokens.
    """
    a = m.args
    B, N, _ = x.shape
    H, d, Bs = m.n_heads, m.head_dim, a.block_size
    q, kc, vc = m._heads(x, pos)
    T = bank_k.shape[2]
    L = min(T, chunk_start)
    w_lo = max(0, chunk_start - (a.window - 1))
    old = min(w_lo, L)
    n_b = Nf // Bs
    K = torch.cat([bank_k.reshape(B, H, T * Nf, d), kc], dim=2)          # [B, H, T*Nf + N, d]
    V = torch.cat([bank_v.reshape(B, H, T * Nf, d), vc], dim=2)
    logits = q @ K.transpose(-1, -2) / math.sqrt(d)                       # [B, H, N, T*Nf+N]
    tok_frame = torch.arange(T * Nf) // Nf
    chunk_cols = torch.arange(T * Nf, T * Nf + N)
    win_mask = torch.zeros(T * Nf + N, dtype=torch.bool)
    win_mask[: T * Nf] = (tok_frame >= w_lo) & (tok_frame < L)
    win_mask[chunk_cols] = True
    win_mask = win_mask.expand(B, T * Nf + N).clone()                    # [B, T*Nf + N], per sample
    if alm_keep is not None:
        win_mask[~alm_keep, : T * Nf] = False
    win_mask = win_mask.view(B, 1, 1, -1)                                 # [B, 1, 1, T*Nf + N]
    q_pool = q.view(B, H, N // Bs, Bs, d).mean(-2)
    k_pool = bank_k.reshape(B, H, T * n_b, Bs, d).mean(-2)
    scores = q_pool @ k_pool.transpose(-1, -2) / math.sqrt(d)             # [B, H, n_qb, T*n_b]
    eligible = [(b // n_b) < old for b in range(T * n_b)]
    sgm_mask = torch.zeros(B, H, N, T * Nf + N, dtype=torch.bool)
    sgm_bias = torch.zeros(B, H, N, T * Nf + N, dtype=x.dtype)
    selected = torch.zeros(B, H, N // Bs, T * n_b, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            for j in range(N // Bs):
                sel = python_topk(scores[bi, h, j].tolist(), a.top_k, eligible)
                rows = slice(j * Bs, (j + 1) * Bs)
                sgm_mask[bi, h, rows, chunk_cols] = True
                if not sel:
                    continue
                lsm = torch.log_softmax(scores[bi, h, j, sel], dim=0)
                for s_i, blk in enumerate(sel):
                    cols = slice(blk * Bs, (blk + 1) * Bs)
                    sgm_mask[bi, h, rows, cols] = True
                    if bias_on:
                        sgm_bias[bi, h, rows, cols] = lsm[s_i]
                    selected[bi, h, j, blk] = True

    def masked(mask, bias):
        lg = (logits + bias).masked_fill(~mask, -math.inf)
        return torch.softmax(lg, dim=-1) @ V

    gates = {}
    if m.gate is not None:
        g = torch.sigmoid(m.gate(x)).view(B, N, len(m.gates), H).permute(2, 0, 3, 1).unsqueeze(-1)
        gates = dict(zip(m.gates, g))
    o_win = masked(win_mask.expand_as(sgm_mask), torch.zeros_like(sgm_bias))
    if merge == "joint":
        o = masked(sgm_mask | win_mask, sgm_bias)
    elif merge == "residual":
        o = o_win + gates["sgm"] * masked(sgm_mask, sgm_bias)
    else:
        o = gates["sgm"] * masked(sgm_mask, sgm_bias) + gates["alm"] * o_win
    if a.coarse:
        # pooled queries over every eligible block's pooled key/value, one softmax, copied to the block's tokens
        v_pool = bank_v.reshape(B, H, T * n_b, Bs, d).mean(-2)
        elig = torch.tensor(eligible, dtype=torch.bool)
        if elig.any():
            p = torch.softmax(scores[..., elig], dim=-1)                      # [B, H, n_qb, n_eligible]
            coarse = (p @ v_pool[:, :, elig]).repeat_interleave(Bs, dim=2)    # [B, H, N, d]
        else:
            coarse = torch.zeros_like(o)
        o = o + gates["coarse"] * coarse
    if pos is not None:
        o = pos.output(o)
    return m._out(o), selected


def reference_dense(m, x, bank_k, bank_v, chunk_start, Nf, decay=0.0):
    """Plain softmax over bank frames [0, chunk_start) and the chunk, optional -decay*age bias."""
    B, N, _ = x.shape
    H, d = m.n_heads, m.head_dim
    q, kc, vc = m._heads(x)
    L = min(bank_k.shape[2], chunk_start)
    K = torch.cat([bank_k[:, :, :L].reshape(B, H, L * Nf, d), kc], dim=2)
    V = torch.cat([bank_v[:, :, :L].reshape(B, H, L * Nf, d), vc], dim=2)
    logits = q @ K.transpose(-1, -2) / math.sqrt(d)
    age = torch.cat([(chunk_start - torch.arange(L)).repeat_interleave(Nf).to(x.dtype), torch.zeros(N, dtype=x.dtype)])
    logits = logits - decay * age
    return m._out(torch.softmax(logits, -1) @ V)
