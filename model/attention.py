"""DecMem attention: Sparse Global Memory + Anchored Local Memory over a memory bank, and baselines.

Two entry points per layer (DESIGN §3.2):
  encode_memory   memory stream: clean frames, each attending to itself and the
                  previous W-1 frames; returns the layer's bank entries.
  forward         query stream: a noisy chunk of C frames reads the bank.

Query-stream branches, each one ``attend`` call returning (out, lse):
  chunk   the chunk's own tokens (all C frames, bidirectional)
  window  bank frames [t0 - W + 1, t0)                       (ALM)
  sel     retrieved bank blocks, older than the window       (SGM / baselines)
  coarse  each query block's pooled query over the pooled K/V of every block
          older than the window                              (decmem, optional)
SGM = merge(sel, chunk); ALM = merge(window, chunk). Merges (``merge``):
  residual  o = ALM + G_s * SGM            the paper: ALM is the base, SGM a gated residue
  gate      o = G_s * SGM + G_a * ALM
  joint     o = merge(sel, window, chunk)  one softmax over the union
and the coarse branch adds G_c * coarse. Gates are per head and token, sigmoid of
a linear map of the current features (``gate_act=tanh``: tanh, exactly closed at init). The coarse logits are the retrieval scores
themselves, so every candidate block's score gets a gradient (the top-k selection
alone passes one only to the blocks it picked, through the retrieval bias).
Positions (PRoPE camera, 2-D and temporal RoPE: model/posenc.py) transform q, k,
v before these calls and the merged output after; the bank holds K/V transformed.
Tokens are block-major inside each frame (see model/blocks.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from decmem.model.block_sparse import SPARSE_BACKENDS, attend_blocks_flex
from decmem.model.blocks import pool_blocks
from decmem.model.kernels import BACKENDS, attend, expected_logit, mass_split, merge_lse, softmax_entropy_parts
from decmem.model.memory import LOCAL, BankLayer, MemoryContext
from decmem.model.retrieval import selected_log_weights

STRATEGIES = ("decmem", "dense", "dense_decay", "fov_frames", "window")
MERGES = ("residual", "gate", "joint")
GATE_ACTS = ("sigmoid", "tanh")


#################################################################################
#                                   Arguments                                   #
#################################################################################

@dataclass
class AttentionArgs:
    """How a layer reads the memory bank."""

    strategy: str = "decmem"        # one of STRATEGIES
    block_size: int = 16            # B: tokens per retrieval block (a spatial tile)
    top_k: int = 8                  # blocks retrieved per (query block, head)
    window: int = 4                 # W: local window in frames, current frame included
    merge: str = "residual"         # residual: ALM + G*SGM (the paper); gate: G_s*SGM + G_a*ALM; joint: one softmax
    retrieval_bias: bool = True     # add log softmax of selected scores to their logits
    coarse: bool = True             # gated coarse branch: pooled queries over every candidate block's pooled K/V
    position_prior: float = 12.0    # init: q/k biases on the PRoPE/RoPE channels that add this many logits to a key
                                    # seen from the same viewing direction at the same grid cell (0 = off)
    gate_bias: float = 2.0          # init: sigmoid(+b) on ALM, sigmoid(-b) on SGM and the coarse branch
    gate_act: str = "sigmoid"       # sigmoid: G = σ(z), biased by gate_bias; tanh: memory gates tanh(z) and the ALM
                                    # gate 1 + tanh(z), z = 0 at init: the layer starts exactly as window + chunk
                                    # attention, so a pretrained backbone is unchanged at step 0 (model/wan.py)
    decay: float = 0.05             # dense_decay: logit bias per frame of age
    fov_frames: int = 4             # fov_frames: whole frames retrieved
    fov_age_penalty: float = 0.01   # fov_frames: coverage fraction lost per frame of age
    backend: str = "auto"           # attention kernel, see model/kernels.py
    sparse_backend: str = "gather"  # the selected-block read: gather (copy blocks, then `backend`) or flex
                                    # (FlexAttention block mask over the bank in place, model/block_sparse.py)

    def __post_init__(self):
        checks = [
            (self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}", self.strategy),
            (self.merge in MERGES, "merge", f"one of {MERGES}", self.merge),
            (self.gate_act in GATE_ACTS, "gate_act", f"one of {GATE_ACTS}", self.gate_act),
            (self.backend in BACKENDS, "backend", f"one of {BACKENDS}", self.backend),
            (self.sparse_backend in SPARSE_BACKENDS, "sparse_backend", f"one of {SPARSE_BACKENDS}", self.sparse_backend),
            (self.block_size >= 1, "block_size", ">= 1", self.block_size),
            (self.top_k >= 1, "top_k", ">= 1", self.top_k),
            (self.window >= 1, "window", ">= 1 (frames, current included)", self.window),
            (self.fov_frames >= 1, "fov_frames", ">= 1", self.fov_frames),
            (self.decay >= 0, "decay", ">= 0", self.decay),
        ]
        for ok, key, expected, got in checks:
            if not ok:
                raise ValueError(f"{key}: expected {expected}, got {got!r}")


#################################################################################
#                                 Attention Layer                               #
#################################################################################

def gated_branches(args: AttentionArgs) -> list[str]:
    """The branches a per-head sigmoid gate scales, in the order of the gate layer's outputs.

    They depend on the merge, not on the strategy: weights trained with decmem load under any strategy
    (which then leaves the gates unused), so one model can be rolled out with each.
    """
    names = {"residual": ["sgm"], "gate": ["sgm", "alm"], "joint": []}[args.merge]
    return names + (["coarse"] if args.coarse else [])


class DecMemAttention(nn.Module):
    """Multi-head attention that writes a memory bank (memory stream) and reads it (query stream)."""

    def __init__(self, dim: int, n_heads: int, args: AttentionArgs):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        self.dim, self.n_heads, self.head_dim, self.args = dim, n_heads, dim // n_heads, args
        self.build_projections()
        # per head, one logit per gated branch, in the order of self.gates
        self.gates = gated_branches(args)
        self.gate = nn.Linear(dim, len(self.gates) * n_heads) if self.gates else None
        self.reset_parameters()

    def build_projections(self):
        """q/k/v and output projections. A backbone that brings its own (model/wan.py) overrides this,
        ``reset_projections``, ``_heads`` and ``_out``; every branch, merge and gate below is shared."""
        self.qkv = nn.Linear(self.dim, 3 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)

    def reset_projections(self):
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def reset_parameters(self):
        self.reset_projections()
        if self.gate is not None:
            # gates start input-independent: ALM open, SGM and coarse small but non-zero, so every branch
            # carries gradient from step 0 and the memory reads enter as a learnable residue
            nn.init.zeros_(self.gate.weight)
            if self.args.gate_act == "tanh":              # every gate exactly closed (ALM: exactly open) at init
                nn.init.zeros_(self.gate.bias)
                return
            with torch.no_grad():
                for i, name in enumerate(self.gates):
                    self.gate.bias[i * self.n_heads:(i + 1) * self.n_heads].fill_(
                        self.args.gate_bias if name == "alm" else -self.args.gate_bias)

    def init_position_prior(self, split, camera: bool, spatial: bool) -> None:
        """Query/key biases that make the positional channels score 'same view, same place' highest at init.

        PRoPE: a bias b*e_z on each camera 4-block of q and k adds b^2 (P̃_q P̃_k⁻¹)_zz ~ b^2 cos(angle between
        the two optical axes) to a logit, whatever the positions; RoPE: a bias b on the first channel of each
        rotated pair adds b^2 cos(ω Δ) per pair, largest at the same grid cell. b is set so that the terms
        sum to ``position_prior`` logits for the same view and cell, whatever the head size. Temporal
        channels stay unbiased (no preference for recent frames). The prior only shifts logits at init
        (the memory probe measures what it buys); everything is learned from there.
        """
        d, D = self.head_dim, self.dim
        terms = (split.camera // 4 if camera else 0) + (split.spatial // 2 if spatial else 0)
        if self.args.position_prior <= 0 or terms == 0:
            return
        b = math.sqrt(self.args.position_prior * math.sqrt(d) / terms)
        bias = torch.zeros(d)
        if camera:
            bias[2:split.camera:4] = b                                       # z of every camera 4-block
        if spatial:
            bias[split.camera:split.camera + split.spatial:2] = b            # first channel of every spatial pair
        with torch.no_grad():
            self.qkv.bias[:D].copy_(bias.repeat(self.n_heads))               # q
            self.qkv.bias[D:2 * D].copy_(bias.repeat(self.n_heads))          # k

    def _heads(self, x, pos=None):
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim)        # [B, N, 3, H, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # 3 x [B, H, N, d]
        if pos is not None:                                                # PRoPE / RoPE (model/posenc.py)
            q, k, v = pos.query(q), pos.key(k), pos.value(v)
        return q, k, v

    def _out(self, o, pos=None):
        if pos is not None:
            o = pos.output(o)
        B, H, N, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, H * d))          # [B, N, D]

    def _gate_values(self, x):
        """Per gated branch: gate [B, H, N] from the current features (``gate_act``)."""
        B, N, _ = x.shape
        z = self.gate(x).view(B, N, len(self.gates), self.n_heads).permute(2, 0, 3, 1)                  # [n, B, H, N]
        if self.args.gate_act == "sigmoid":
            return dict(zip(self.gates, torch.sigmoid(z).unbind(0)))
        return {name: (1 + torch.tanh(g)) if name == "alm" else torch.tanh(g) for name, g in zip(self.gates, z.unbind(0))}

    # ----------------------------------------------------------------------------
    # Memory stream
    # ----------------------------------------------------------------------------

    def encode_memory(self, x: torch.Tensor, frame_tokens: int, past=None, ctx: MemoryContext | None = None, pos=None):
        """Clean frames with local causal attention; returns (out, BankLayer of these frames).

        x: [B, T * N_f, D], frames in time order. past: (k, v) [B, H, P, N_f, d] of
        the P <= W-1 frames just before x at this layer (from the bank when
        streaming, or from the previous rank under context parallelism); keys only.
        pos: these frames' TokenPositions; the bank keeps K/V already transformed.
        """
        B, N, _ = x.shape
        T, W, Nf = N // frame_tokens, self.args.window, frame_tokens
        self._check_frames(N, Nf)
        q, k, v = self._heads(x, pos)                                      # [B, H, T*N_f, d]
        H, d = self.n_heads, q.shape[-1]                                   # d: channels per head as attended
        kf, vf = k.view(B, H, T, Nf, d), v.view(B, H, T, Nf, v.shape[-1])
        if past is None and ctx is not None:
            past = ctx.memory_halo(kf, vf, W - 1)                          # cp: the previous ranks' last frames
        P = 0 if past is None else past[0].shape[2]
        if P > W - 1:
            raise ValueError(f"past holds {P} frames, the local window needs at most W-1 = {W - 1}")
        k_all = kf if past is None else torch.cat([past[0], kf], dim=2)   # [B, H, P+T, N_f, d]
        v_all = vf if past is None else torch.cat([past[1], vf], dim=2)
        pad = (0, 0, 0, 0, W - 1, 0)                                       # W-1 empty frames in front
        kw = nn.functional.pad(k_all, pad).unfold(2, W, 1)[:, :, P:]       # [B, H, T, N_f, d, W]
        vw = nn.functional.pad(v_all, pad).unfold(2, W, 1)[:, :, P:]
        kw = kw.permute(0, 1, 2, 5, 3, 4).reshape(B, H, T, W * Nf, d)      # [B, H, T, W*N_f, d]
        vw = vw.permute(0, 1, 2, 5, 3, 4).reshape(B, H, T, W * Nf, -1)
        src = P + torch.arange(T, device=x.device)[:, None] - (W - 1) + torch.arange(W, device=x.device)  # [T, W]
        mask = (src >= 0).repeat_interleave(Nf, dim=1).expand(B, H, T, W * Nf)                         # [B, H, T, W*N_f]
        o, _ = attend(q.view(B, H, T, Nf, d), kw, vw, key_mask=mask, backend=self.args.backend)       # [B, H, T, N_f, d]
        k_pool = pool_blocks(kf, self.args.block_size).view(B, H, T, -1, d)                           # [B, H, T, n_b, d]
        v_pool = pool_blocks(vf, self.args.block_size).view(B, H, T, -1, vf.shape[-1])
        return self._out(o.reshape(B, H, N, -1), pos), BankLayer(kf, vf, k_pool, v_pool)

    # ----------------------------------------------------------------------------
    # Query stream
    # ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, bank: BankLayer | None, chunk_start: int, frame_tokens: int,
                fov_frames: tuple[torch.Tensor, torch.Tensor] | None = None, ctx: MemoryContext | None = None,
                return_stats: bool = False, pos=None, alm_keep: torch.Tensor | None = None):
        """The chunk's tokens read the bank. Returns (out [B, C*N_f, D], stats dict).

        x: [B, C * N_f, D] noisy chunk frames t0..t0+C-1 (t0 = chunk_start);
        bank: frames with global index < t0 are readable, later ones are ignored;
        fov_frames: (frames [B, k], valid [B, k]) for the fov_frames strategy;
        pos: the chunk's TokenPositions (None: no positions inside attention);
        alm_keep: [B] bool, False drops the ALM window's bank frames for that sample (training only, see
        DiffusionArgs.window_dropout): the chunk then reads its own frames and the older memory. dense reads
        the window as part of the bank and ignores it.
        """
        a, ctx = self.args, (ctx or LOCAL)
        B, N, _ = x.shape
        Nf = frame_tokens
        self._check_frames(N, Nf)
        q, k, v = self._heads(x, pos)                                      # [B, H, N, d]
        stats: dict = {}

        L = min(ctx.global_frames(bank), chunk_start)                      # readable bank frames [0, L)
        w_lo = max(0, chunk_start - (a.window - 1))                        # ALM window [w_lo, L)
        old = min(w_lo, L)                                                 # SGM candidates [0, old)

        chunk = attend(q, k, v, backend=a.backend)                         # ([B, H, N, d], [B, H, N])
        win_kv = coarse = None
        if a.strategy not in ("dense", "dense_decay"):                      # dense reads the window anyway
            win_kv = ctx.window_kv(bank, w_lo, L)                         # called on every rank, dropped or not
            window = self._attend_frames(q, win_kv, key_mask=self._keep_mask(alm_keep, win_kv))

        if a.strategy == "window":
            out = merge_lse([window, chunk])[0]
        elif a.strategy in ("dense", "dense_decay"):
            dense = self._dense(q, bank, L, chunk_start, ctx)
            out = merge_lse([dense, chunk])[0]
        else:
            if a.strategy == "decmem":
                sel, coarse, sel_stats = self._sgm(q, bank, old, ctx)
            else:
                (sel, sel_stats), coarse = self._fov(q, bank, old, fov_frames, ctx), None
            stats.update(sel_stats)
            g = self._gate_values(x) if self.gate is not None and a.strategy == "decmem" else {}
            if a.strategy == "decmem" and a.merge != "joint":
                o_sgm = merge_lse([sel, chunk])[0]                                  # [B, H, N, d]
                o_alm = merge_lse([window, chunk])[0]
                if a.merge == "residual":                                           # the paper: ALM is the base
                    out = o_alm + g["sgm"].unsqueeze(-1) * o_sgm
                else:
                    out = g["sgm"].unsqueeze(-1) * o_sgm + g["alm"].unsqueeze(-1) * o_alm
            else:
                out = merge_lse([sel, window, chunk])[0]
            if coarse is not None:
                out = out + g["coarse"].unsqueeze(-1) * coarse
            for name, val in g.items():
                stats[f"gate_{name}"] = val.detach().mean()
        stats["attended_tokens"] = self._attended_tokens(N, Nf, L, w_lo, old)
        stats["attended_pooled"] = old * (Nf // a.block_size) if coarse is not None else 0
        if return_stats:
            stats.update(self._read_stats(q, k, bank, stats, L, w_lo, chunk_start, win_kv, ctx))
        return self._out(out, pos), stats

    # ----------------------------------------------------------------------------
    # Branches
    # ----------------------------------------------------------------------------

    def _attend_frames(self, q, kv, key_bias=None, key_mask=None):
        """All queries over whole frames kv = ([B, H, n, N_f, d], ...) -> (out, lse)."""
        if kv is None:
            return attend(q, q[..., :0, :], q[..., :0, :], backend=self.args.backend)
        kf, vf = kv
        B, H, n, Nf, d = kf.shape
        return attend(q, kf.reshape(B, H, n * Nf, d), vf.reshape(B, H, n * Nf, d),
                      key_bias=key_bias, key_mask=key_mask, backend=self.args.backend)

    @staticmethod
    def _keep_mask(alm_keep, kv):
        """[B] keep flags -> key mask [B, H, n*N_f] over the window's tokens, or None when all are kept."""
        if alm_keep is None or kv is None:
            return None
        B, H, n, Nf, _ = kv[0].shape
        return alm_keep.to(torch.bool).view(B, 1, 1).expand(B, H, n * Nf)

    def _dense_kv(self, bank, L, ctx):
        """(K/V of the readable bank frames this rank reads, global index of its first frame) or (None, 0)."""
        fetched = ctx.fetch_frames(bank, 0, L)                                      # sharded query stream: all of [0, L)
        if fetched is not None:
            return fetched, 0
        return (bank.frames(0, L), bank.frame_offset) if bank is not None else (None, 0)

    def _dense(self, q, bank, L, chunk_start, ctx):
        """Every readable bank token (dense), optionally biased by -decay * age in frames."""
        kv, first = self._dense_kv(bank, L, ctx)
        out, lse = self._attend_frames(q, kv, self._decay_bias(q, first, kv, chunk_start))
        return ctx.merge_partials(out, lse)

    def _decay_bias(self, q, first, kv, chunk_start):
        """dense_decay: -decay * age (frames before the chunk) per bank token [B, H, n*N_f]; None otherwise."""
        if kv is None or self.args.strategy != "dense_decay":
            return None
        B, H, n, Nf, _ = kv[0].shape
        t = first + torch.arange(n, device=q.device)                                  # global frame index
        age = (chunk_start - t).to(q.dtype)                                            # [n], >= 1
        return (-self.args.decay * age).repeat_interleave(Nf).expand(B, H, n * Nf)

    def _sgm(self, q, bank, old, ctx):
        """Sparse Global Memory: pooled query blocks score pooled bank blocks, top-k, token attention.

        Returns ((out, lse) of the selected blocks, the coarse branch's output [B, H, N, d] or None, stats).
        """
        a = self.args
        B, H, N, d = q.shape
        Bs = a.block_size
        nqb = N // Bs
        q_pool = q.view(B, H, nqb, Bs, d).mean(dim=-2)                               # [B, H, n_qb, d]
        idx, valid, sel_scores, scores = ctx.select_blocks(q_pool, bank, old, a.top_k)  # [B, H, n_qb, k] each
        bias = selected_log_weights(sel_scores, valid) if a.retrieval_bias else None
        out, lse = self._attend_blocks(q.view(B, H, nqb, Bs, d), bank, idx, valid, bias, ctx)
        out, lse = ctx.merge_partials(out.reshape(B, H, N, d), lse.reshape(B, H, N))
        coarse = None
        if a.coarse:
            # every candidate block's score is a logit here, so each one gets a gradient, not only the selected
            c_out, _ = ctx.coarse_read(q_pool, bank, old, a.backend, scores)          # [B, H, n_qb, d], whole
            coarse = c_out.repeat_interleave(Bs, dim=2)                              # [B, H, N, d]
        return (out, lse), coarse, {"selected": idx, "selected_valid": valid, "selected_scores": sel_scores.detach(),
                                    "scores": scores.detach() if scores is not None else None}

    def _fov(self, q, bank, old, fov_frames, ctx):
        """WorldMem baseline: whole frames chosen by field-of-view coverage, read by every query."""
        if fov_frames is None:
            raise ValueError("strategy 'fov_frames' needs fov_frames=(frames, valid) from model.retrieval.select_fov_frames")
        frames, valid = fov_frames                                                   # [B, k]
        B, H, N, d = q.shape
        valid = valid & (frames < old)
        n_b = bank.blocks_per_frame if bank is not None else 1
        blocks = (frames.unsqueeze(-1) * n_b + torch.arange(n_b, device=q.device)).flatten(1)  # [B, k*n_b]
        bvalid = valid.repeat_interleave(n_b, dim=1)
        idx = blocks.view(B, 1, 1, -1).expand(B, H, 1, blocks.shape[1])             # [B, H, 1, k*n_b]
        bvalid = bvalid.view(B, 1, 1, -1).expand_as(idx)
        out, lse = self._attend_blocks(q.view(B, H, 1, N, d), bank, idx, bvalid, None, ctx)
        out, lse = ctx.merge_partials(out.reshape(B, H, N, d), lse.reshape(B, H, N))
        return (out, lse), {"selected": idx, "selected_valid": bvalid}

    def _attend_blocks(self, qg, bank, idx, valid, bias, ctx: MemoryContext = LOCAL):
        """Query groups read their selected blocks: fetched by the context, or in the *local* bank shard.

        qg: [B, H, G, n, d]; idx/valid/bias: [B, H, G, k] global block indices.
        Read in place, blocks held by another rank are masked here and counted
        there. The kernel is called even when nothing local is selected, so
        every rank runs the same sequence of calls.
        """
        B, H, G, n, d = qg.shape
        k = idx.shape[-1]
        Bs = self.args.block_size
        read = ctx.read_blocks(qg, bank, idx, valid, bias, Bs, self._attend_tokens)  # sharded, queries shipped
        if read is not None:
            return read
        fetched = ctx.fetch_blocks(bank, idx, valid, Bs)                             # sharded, blocks fetched
        if fetched is not None:
            kb, vb, mask = fetched                                                   # [B, H, G, k*B, d], [B, H, G, k*B]
            tok_bias = bias.repeat_interleave(Bs, dim=-1) if bias is not None else None
            return self._attend_tokens(qg, kb, vb, tok_bias, mask)
        if bank is None or bank.local_frames == 0:
            kk = qg.new_zeros(B, H, G, k * Bs, d)
            return attend(qg, kk, kk, key_mask=torch.zeros(B, H, G, k * Bs, dtype=torch.bool, device=qg.device),
                          backend=self.args.backend)
        n_loc = bank.k_pool.shape[2] * bank.k_pool.shape[3]
        lo = bank.frame_offset * bank.blocks_per_frame
        local = idx - lo
        owned = valid & (local >= 0) & (local < n_loc)
        local = torch.where(owned, local, torch.zeros_like(local))                  # [B, H, G, k]
        if self.args.sparse_backend == "flex":
            return self._attend_blocks_flex(qg, bank, local, owned, bias)
        kb = _gather_blocks(bank.k, local, Bs)                                      # [B, H, G, k*B, d]
        vb = _gather_blocks(bank.v, local, Bs)
        mask = owned.repeat_interleave(Bs, dim=-1)                                   # [B, H, G, k*B]
        tok_bias = bias.repeat_interleave(Bs, dim=-1) if bias is not None else None
        return self._attend_tokens(qg, kb, vb, tok_bias, mask)

    def _attend_tokens(self, q, k, v, key_bias=None, key_mask=None):
        """The layer's kernel on gathered keys: per-token bias and mask over k's tokens -> (out, lse)."""
        return attend(q, k, v, key_bias=key_bias, key_mask=key_mask, backend=self.args.backend)

    def _attend_blocks_flex(self, qg, bank, local, owned, bias):
        """``_attend_blocks`` without the gather: a FlexAttention block mask over the local bank's tokens.

        Query groups of n tokens (a query block for SGM, the whole chunk for fov_frames) become n / B query
        blocks of B tokens, each reading its group's blocks; returns (out [B, H, G, n, d], lse [B, H, G, n]).
        """
        B, H, G, n, d = qg.shape
        Bs = self.args.block_size
        per = n // Bs
        if per > 1:                                                                  # the group's blocks per query block
            local, owned = local.repeat_interleave(per, dim=2), owned.repeat_interleave(per, dim=2)
            bias = bias.repeat_interleave(per, dim=2) if bias is not None else None
        out, lse = attend_blocks_flex(qg.reshape(B, H, G * n, d), _flat_tokens(bank.k), _flat_tokens(bank.v),
                                      local, owned, bias, Bs)
        return out.view(B, H, G, n, d), lse.view(B, H, G, n)

    # ----------------------------------------------------------------------------
    # Bookkeeping
    # ----------------------------------------------------------------------------

    def _check_frames(self, N, Nf):
        if Nf <= 0 or N % Nf:
            raise ValueError(f"{N} tokens are not a whole number of frames of {Nf} tokens")
        if Nf % self.args.block_size:
            raise ValueError(f"frames of {Nf} tokens cannot be cut into blocks of block_size={self.args.block_size}")

    def _attended_tokens(self, N, Nf, L, w_lo, old):
        """Key tokens each query reads (upper bound for sparse strategies); the coarse branch's pooled keys,
        one per candidate block like the retrieval scores, are counted apart (``attended_pooled``)."""
        a = self.args
        win = max(0, L - w_lo) * Nf
        if a.strategy == "window":
            return win + N
        if a.strategy in ("dense", "dense_decay"):
            return L * Nf + N
        sel = min(a.top_k * a.block_size, old * Nf) if a.strategy == "decmem" else min(a.fov_frames, old) * Nf
        return sel + win + N

    @torch.no_grad()
    def _read_stats(self, q, k_chunk, bank, stats, L, w_lo, chunk_start, win_kv, ctx):
        """Entropy and dispersion of the memory read: its softmax over the read keys and the chunk's own.

        The read is the SGM branch for decmem and fov_frames (selected blocks), every bank token for dense,
        the window for window. Dispersion (the paper's measure) is the attention mass on keys of weight
        < 0.02 and > 0.05, per query token [B, H, N]. Under context parallelism each rank holds a share of
        the read keys; (lse, E[logit]) merge like partial outputs and masses add up, so every rank gets
        the single-process values.
        """
        a = self.args
        B, H, N, d = q.shape
        qv, kk, bias, mask, shared = self._read_keys(q, bank, stats, L, w_lo, chunk_start, win_kv, ctx)
        lse_c, e_c = expected_logit(q, k_chunk)
        if kk is None:
            lse_m = torch.full_like(lse_c, -math.inf)
            e_m = torch.zeros_like(e_c)
        else:
            lse_m, e_m = (t.reshape(B, H, N) for t in expected_logit(qv, kk, bias, mask))
        if not shared:
            e_m, lse_m = ctx.merge_partials(e_m.nan_to_num(0.0).unsqueeze(-1), lse_m)
            e_m = e_m.squeeze(-1)
        entropy = softmax_entropy_parts([(lse_m, e_m), (lse_c, e_c)])
        lse_all = torch.logaddexp(lse_m, lse_c)                                      # [B, H, N]
        low, high = mass_split(q, k_chunk, lse_all)
        if kk is not None:
            lm, hm = mass_split(qv, kk, lse_all.view(qv.shape[:-1]), bias, mask)
            lm, hm = lm.reshape(B, H, N), hm.reshape(B, H, N)
        else:
            lm, hm = torch.zeros_like(low), torch.zeros_like(high)
        if not shared:
            lm, hm = ctx.all_sum(torch.stack([lm, hm])).unbind(0)
        out = {"entropy": entropy.mean(), "dispersion_low": low + lm, "dispersion_high": high + hm}
        if a.strategy == "decmem":
            out["entropy_sgm"] = out["entropy"]
        return out

    def _read_keys(self, q, bank, stats, L, w_lo, chunk_start, win_kv, ctx):
        """This rank's keys of the memory read: (queries viewed per key set, keys, bias, mask, whole on every rank).

        Keys the context fetched are whole here; merging them with other ranks' is then the context's identity.
        """
        a = self.args
        B, H, N, d = q.shape
        if a.strategy == "window":                        # the window's K/V are already whole on every rank
            if win_kv is None:
                return q, None, None, None, True
            return q, win_kv[0].flatten(2, 3), None, None, True
        if a.strategy in ("dense", "dense_decay"):
            kv, first = self._dense_kv(bank, L, ctx)
            if kv is None or kv[0].shape[2] == 0:
                return q, None, None, None, False
            return q, kv[0].flatten(2, 3), self._decay_bias(q, first, kv, chunk_start), None, False
        idx, valid = stats["selected"], stats["selected_valid"]                      # global block indices
        G, Bs = idx.shape[2], a.block_size
        bias = None
        if a.strategy == "decmem" and a.retrieval_bias:
            bias = selected_log_weights(stats["selected_scores"], valid).repeat_interleave(Bs, dim=-1)
        qv = q.view(B, H, G, N // G, d)
        fetched = ctx.fetch_blocks(bank, idx, valid, Bs)                             # called on every rank
        if fetched is not None:
            return qv, fetched[0], bias, fetched[2], False
        if bank is None or bank.local_frames == 0:
            return q, None, None, None, False
        local = idx - bank.frame_offset * bank.blocks_per_frame
        owned = valid & (local >= 0) & (local < bank.k_pool.shape[2] * bank.k_pool.shape[3])
        kb = _gather_blocks(bank.k, torch.where(owned, local, torch.zeros_like(local)), Bs)   # [B, H, G, k*Bs, d]
        return qv, kb, bias, owned.repeat_interleave(Bs, dim=-1), False


def _flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """Bank K/V [B, H, T, N_f, d] -> [B, H, T*N_f, d], a view whenever (T, N_f) merge (see _gather_blocks)."""
    B, H, T, Nf, d = x.shape
    return x.view(B, H, T * Nf, d) if x.stride(2) == Nf * x.stride(3) else x.reshape(B, H, T * Nf, d)


def _gather_blocks(x: torch.Tensor, idx: torch.Tensor, Bs: int) -> torch.Tensor:
    """Tokens of bank blocks x [B, H, T, N_f, d] at block indices idx [B, H, G, k] -> [B, H, G, k*Bs, d].

    (T, N_f) always merge into one token axis as a view, both for a bank that is a
    slice of a growing buffer and for the permuted qkv output in training; a flat
    (B*H*blocks) row index would instead copy the whole bank on every call.
    """
    B, H, T, Nf, d = x.shape
    tokens = _flat_tokens(x)
    tok = (idx.unsqueeze(-1) * Bs + torch.arange(Bs, device=x.device)).flatten(-2)   # [B, H, G, k*Bs]
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    h = torch.arange(H, device=x.device).view(1, H, 1, 1)
    return tokens[b, h, tok]                                                          # [B, H, G, k*Bs, d]
