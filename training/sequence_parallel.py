"""Sequence parallelism over both streams (DESIGN §4, issue 17): the query stream is sharded too.

``CPMemory`` shards the memory stream and replicates the query stream: every rank of
a cp group runs every target chunk. ``SPMemory`` also shards the target chunks:
rank r runs the chunks [lo, hi) of ``chunk_range(n_chunks, cp, r)``, a contiguous,
balanced (by count) slice of the chunks in time order. Count is the right balance
for decmem and window: a chunk reads k blocks per query block plus its window
whatever its age, so every chunk costs about the same (only the pooled scoring,
small, grows with history); dense reads grow with age and are not balanced by it.

Per layer of one chunk slot (every rank runs ceil(n_chunks / cp) slots; a rank
short of chunks runs the cheapest chunk again with loss weight 0, so that every
rank makes the same module calls and collectives, as ZeRO-3 requires):
  select_blocks  rank r's pooled queries ([B, H, n_qb, d], independent of the bank's length; the pooled keys,
                 the alternative, grow with it) go only to the ranks holding frames older than its chunk's
                 candidate limit (every rank's limit arrives with the window's range gather); each scores
                 them against its candidates, takes a local top-k and returns k (score, index) pairs per
                 (query block, head) to r, which takes the global top-k exactly as CPMemory does
  fetch_blocks   the owner sends the keys of its selected blocks (deduplicated over query blocks) to
                 the ranks holding them; they send back those blocks' K/V: 2 all-to-alls of indices
                 (counts, keys) and one of K/V, bounded by k · B tokens per (query block, head)
  coarse_read    the same holders return (out, lse) of r's pooled queries over their candidates, merged at r
  read_blocks    with read="ship" (train.cp_block_read) instead of fetch_blocks: each query block goes to
                 the holders of its selected blocks, which return its (out, lse) over them; bounded by the
                 chunk's tokens per holder, whatever k and the block size
  window_kv      the ALM window's frames come from the rank that holds them, to the chunk's owner only
  fetch_frames   dense: the whole readable history is fetched (it reads every token; no saving there)
All-to-alls are variable-size ``all_to_all_single`` (gloo supports it in torch 2.13). Gradients:
``_AllToAll``'s adjoint is the reverse exchange, so a fetched block's gradient returns to its owner.
Loss: each rank's loss is cp x (its chunks' losses) / n_chunks, so the ranks' gradients sum to
cp x the true one, like CPMemory's, and DeepSpeed's world average is the dp average; the loss's
value is the full loss. Every autograd exchange output of the step is tied into the loss by a
zero-valued ``_Sink``, so each backward exchange runs on every rank even where a result went unused
(an empty window, no candidate); autograd then runs them in reverse creation order everywhere.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from decmem.model.kernels import merge_lse
from decmem.model.memory import block_scores, coarse_partial, pooled_candidates
from decmem.model.retrieval import topk_blocks
from decmem.training.context_parallel import CPMemory, wide_dtype

#################################################################################
#                                  Chunk Layout                                 #
#################################################################################

BLOCK_READS = ("fetch", "ship")


def chunk_range(n_chunks: int, cp: int, cp_rank: int) -> tuple[int, int]:
    """Contiguous chunks [lo, hi) of rank cp_rank: the first n % cp ranks get one more; a rank may get none."""
    base, extra = divmod(n_chunks, cp)
    lo = cp_rank * base + min(cp_rank, extra)
    return lo, lo + base + (1 if cp_rank < extra else 0)


def _local_blocks(bank, b, h, blk, block_size: int):
    """K and V of local blocks blk of (sample b, head h), index tensors of one shape S -> ([*S, Bs, dk], [*S, Bs, dv]).

    A block is Bs consecutive tokens of one frame, so a view splits the bank's token axis into blocks.
    """
    n_b = bank.blocks_per_frame
    kt, vt = bank.k.unflatten(3, (n_b, block_size)), bank.v.unflatten(3, (n_b, block_size))  # [B, H, T, n_b, Bs, d]
    return kt[b, h, blk // n_b, blk % n_b], vt[b, h, blk // n_b, blk % n_b]


#################################################################################
#                          Autograd-aware Exchanges                             #
#################################################################################

class _AllToAll(torch.autograd.Function):
    """Flat x cut into segments of ``send`` elements, segment r to rank r; receives ``recv`` elements per rank.

    Adjoint: the reverse exchange (a received element's gradient goes back to the rank that sent it).
    ``anchor`` records the node on every rank even where x needs no gradient (see context_parallel).
    """

    @staticmethod
    def forward(ctx, x, send, recv, group, anchor=None):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty(sum(ctx.send))
        dist.all_to_all_single(gx, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return gx, None, None, None, None


class _Sink(torch.autograd.Function):
    """A zero scalar that depends on every input: adding it to the loss makes autograd visit them all."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.shapes = [(x.shape, x.dtype, x.device) for x in xs]
        return xs[0].new_zeros(()).float()

    @staticmethod
    def backward(ctx, g):
        return tuple(torch.zeros(s, dtype=t, device=d) for s, t, d in ctx.shapes)


#################################################################################
#                           The Sharded-query Context                           #
#################################################################################

class SPMemory(CPMemory):
    """Memory context of one rank when both streams are sharded over the cp group (train.cp_queries=sharded)."""

    def __init__(self, group, cp_rank: int, cp_size: int, read: str = "fetch"):
        super().__init__(group, cp_rank, cp_size)
        if read not in BLOCK_READS:
            raise ValueError(f"cp_block_read: expected one of {BLOCK_READS}, got {read!r}")
        self.read = read                                   # fetch: blocks come to the queries; ship: the reverse
        self._pending: list[torch.Tensor] = []             # autograd exchange outputs of this step (for _Sink)
        self._counts: list[int] = []                       # chunks per rank of this step
        self._q_cache = None                               # (pooled queries, candidates, what _queries returned)
        self._win_asks = None                              # every rank's raw (lo, hi) of this layer's window_kv

    # ---- chunks ---------------------------------------------------------------------

    def shard(self, n_frames: int) -> tuple[int, int]:
        """A new step: forget exchange outputs of any earlier forward that never reached ``chunk_loss``."""
        self._pending, self._q_cache, self._win_asks = [], None, None
        return super().shard(n_frames)

    def query_slots(self, n_chunks: int) -> list[int | None]:
        """This rank's chunks, then None up to ceil(n_chunks / cp) slots (the most any rank runs)."""
        self._counts = [b - a for a, b in (chunk_range(n_chunks, self.size, r) for r in range(self.size))]
        lo, hi = chunk_range(n_chunks, self.size, self.rank)
        return list(range(lo, hi)) + [None] * (max(self._counts) - (hi - lo))

    def chunk_loss(self, losses, idle, n_chunks: int):
        """Value: the full loss; gradient: cp x this rank's share (see the module docstring)."""
        parts = losses + [0.0 * x for x in idle]           # idle slots join the graph, weight 0
        local = torch.stack(parts).sum() if parts else torch.zeros(())
        full = local.detach().float().reshape(1).clone()                                 # no grad: the value only
        self._count("loss", full)
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)
        full = full[0] / n_chunks
        share = local * (self.size / n_chunks)
        loss = share + (full - share.detach()).to(share.dtype)
        if torch.is_grad_enabled() and self._pending:
            loss = loss + _Sink.apply(*self._pending).to(loss.dtype)
        self._pending, self._q_cache, self._win_asks = [], None, None
        return loss

    def load(self) -> dict:
        return {"chunks": list(self._counts)} if self._counts else {}

    # ---- replicated-query merges are identities here: every read is whole on its chunk's owner ------------

    def merge_partials(self, out, lse):
        """Reads are whole on the chunk's owner: nothing to merge."""
        return out, lse

    def all_sum(self, x):
        """A read statistic of keys that were all read here: nothing to add."""
        return x

    # ---- retrieval --------------------------------------------------------------------

    def _queries(self, q_pool, candidates: int):
        """Pooled queries of every chunk whose candidates I hold ({rank: [B, H, n_qb, d]}, with gradient), and
        the holders of each rank's candidates (``_holders``).

        Rank r's pooled queries go only to the ranks holding frames older than its chunk's candidate limit
        (and to r itself, free): the scores and coarse partials then come back from those ranks alone.
        The layer's coarse branch asks again right after select_blocks: the same call on every rank, so every
        rank reuses this exchange. Every rank's candidates (min of its window's lo and hi, see ``window_kv``)
        come with the window's ranges, which the layer gathered just before; a layer without a window read
        (none today) gathers them here.
        """
        hit = self._q_cache
        if hit is not None and hit[0] is q_pool and hit[1] == candidates:
            return hit[2:]
        if self._win_asks is not None:
            olds = [min(lo, hi) for lo, hi in self._win_asks]
            if olds[self.rank] != candidates:
                raise RuntimeError(f"select_blocks: {candidates} candidate frames, but this layer's window_kv "
                                   f"implies {olds[self.rank]}; the window and SGM disagree on the chunk's start")
        else:
            olds = self._all_gather_nograd(torch.tensor([candidates]), "sp_queries").view(-1).tolist()
        holders = self._holders(olds)
        me, n = self.rank, q_pool.numel()
        got = self._a2a(q_pool.reshape(-1).repeat(len(holders[me])), [n if p in holders[me] else 0 for p in range(self.size)],
                        [n if me in holders[r] else 0 for r in range(self.size)], "sp_queries")
        readers = [r for r in range(self.size) if me in holders[r]]                       # chunks I score, rank order
        qs = dict(zip(readers, got.view(len(readers), *q_pool.shape).unbind(0)))
        self._q_cache, self._win_asks = (q_pool, candidates, qs, olds, holders), None
        return qs, olds, holders

    def _holders(self, olds: list[int]) -> list[list[int]]:
        """For each rank r, the ranks holding frames older than olds[r] (its chunk's candidates), plus r itself."""
        own = self.ranges()
        return [[p for p, (lo, hi) in enumerate(own) if p == r or (hi > lo and lo < olds[r])] for r in range(self.size)]

    def _to_owners(self, per_reader: dict, holders, name):
        """Each reader's tensor (same shape for all) to the chunk's owner; returns what the holders of mine sent,
        in rank order [n_holders, ...] (with gradient)."""
        me = self.rank
        ref = next(iter(per_reader.values()))
        n = ref.numel()
        flat = torch.cat([per_reader[r].reshape(-1) for r in sorted(per_reader)])
        got = self._a2a(flat, [n if r in per_reader else 0 for r in range(self.size)],
                        [n if p in holders[me] else 0 for p in range(self.size)], name)
        return got.view(len(holders[me]), *ref.shape)

    def select_blocks(self, q_pool, bank, candidates: int, k: int):
        """Global top-k for this rank's chunk: the local top-k of each holder of its candidates, by all-to-all."""
        n_b = bank.blocks_per_frame if bank is not None else 1
        lo = self.ranges()[self.rank][0] if self.total else 0
        if self.total * n_b >= 2 ** 24:                    # indices travel as fp32 next to the scores
            raise ValueError(f"{self.total * n_b} bank blocks: block indices above 2^24 are not exact in fp32")
        qs, olds, holders = self._queries(q_pool, candidates)
        pairs = {}
        for r, q_r in qs.items():                          # rank r's chunk against my candidates
            s = block_scores(q_r, pooled_candidates(bank, olds[r]))                     # [B, H, n_qb, n_r]
            l_idx, l_valid = topk_blocks(s, k)                                          # [B, H, n_qb, k]
            l_sel = s.gather(-1, l_idx) if s.shape[-1] else s.new_zeros(l_idx.shape)
            l_sel = torch.where(l_valid, l_sel, torch.full_like(l_sel, -math.inf)).to(wide_dtype(s.dtype))
            g_idx = torch.where(l_valid, l_idx + lo * n_b, torch.zeros_like(l_idx)).to(l_sel.dtype)
            pairs[r] = torch.cat([l_sel, g_idx], dim=-1)                                 # [B, H, n_qb, 2k]
        got = self._to_owners(pairs, holders, "sp_scores")                               # [n_holders, B, H, n_qb, 2k]
        cand = torch.cat([g[..., :k] for g in got.unbind(0)], dim=-1).to(q_pool.dtype)  # [B, H, n_qb, n_h*k], rank order
        cidx = torch.cat([g[..., k:] for g in got.detach().unbind(0)], dim=-1).long()
        pos, valid = topk_blocks(cand, k)                                               # the same rule as one process
        idx = torch.where(valid, cidx.gather(-1, pos), torch.zeros_like(pos))
        return idx, valid, cand.gather(-1, pos), None

    def coarse_read(self, q_pool, bank, candidates: int, backend: str, scores=None):
        """The partials of this chunk's pooled queries over each holder's candidates, merged here. scores is always
        None here: this rank's select_blocks never holds every candidate's."""
        qs, olds, holders = self._queries(q_pool, candidates)
        work = wide_dtype(q_pool.dtype)
        parts = {}
        for r, q_r in qs.items():
            o, lse = coarse_partial(q_r, bank, olds[r], backend)                         # [B, H, n_qb, d], [B, H, n_qb]
            parts[r] = torch.cat([o.to(work), lse.to(work).unsqueeze(-1)], -1)
        got = self._to_owners(parts, holders, "sp_coarse")                               # [n_holders, B, H, n_qb, d+1]
        out, lse = merge_lse([(g[..., :-1], g[..., -1]) for g in got.unbind(0)])
        return out.to(q_pool.dtype), lse

    # ---- fetching K/V -----------------------------------------------------------------

    def read_blocks(self, qg, bank, idx, valid, bias, block_size: int, attend_fn):
        """read=ship: each query group goes to the ranks holding its selected blocks, with their local indices and
        retrieval biases; each holder attends it to those blocks and returns (out, lse), merged here.

        qg [B, H, G, n, d], idx/valid/bias [B, H, G, k] -> (out [B, H, G, n, dv], lse [B, H, G, n]). Per (query
        group, holder) it moves n query tokens out and n outputs back, whatever k and the block size: cheaper
        than fetching when the group's blocks on a holder outweigh its queries (few, large query groups reading
        many blocks: the paper's k = 80 blocks of 260 tokens per 260-token query block).
        4 all-to-alls: row counts, row metadata (no gradient), queries + biases and (out, lse) (with gradient).
        """
        if self.read != "ship" or bank is None:
            return None
        B, H, G, n, d = qg.shape
        k, Bs, n_b = idx.shape[-1], block_size, bank.blocks_per_frame
        dv = bank.v.shape[-1]
        starts = torch.tensor([lo for lo, _ in self.ranges()], device=idx.device) * n_b
        holder = torch.searchsorted(starts, idx.contiguous(), right=True) - 1             # [B, H, G, k]
        on = [valid & (holder == p) for p in range(self.size)]                          # [B, H, G, k] each
        rows = [o.any(-1).nonzero() for o in on]                                        # [m_p, 3]: (b, h, g)
        # requests: per row, its (sample, head) and its blocks' indices local to the holder (-1: not there)
        meta, pay = [], []
        for p, r in enumerate(rows):
            b, h, g = r.unbind(-1)
            li = torch.where(on[p][b, h, g], idx[b, h, g] - starts[p], torch.full_like(idx[b, h, g], -1))
            meta.append(torch.cat([(b * H + h).unsqueeze(-1), li], -1))                   # [m_p, 1+k]
            bias_r = bias[b, h, g] if bias is not None else qg.new_zeros(len(b), k)
            pay.append(torch.cat([qg[b, h, g].reshape(len(b), n * d), bias_r.to(qg.dtype)], -1))  # [m_p, n*d+k]
        sent = torch.tensor([len(r) for r in rows])
        recv = self._exchange_nograd(sent, "sp_ship").tolist()                          # rows each rank sends me
        sent = sent.tolist()
        m_meta = self._a2a_nograd(torch.cat(meta).reshape(-1), [m * (1 + k) for m in sent],
                                  [m * (1 + k) for m in recv], "sp_ship").view(-1, 1 + k)
        m_pay = self._a2a(torch.cat(pay).reshape(-1), [m * (n * d + k) for m in sent],
                          [m * (n * d + k) for m in recv], "sp_ship").view(-1, n * d + k)
        # serve: the rows' queries over their blocks in my shard
        b_in, h_in = (m_meta[:, 0] // H).unsqueeze(-1), (m_meta[:, 0] % H).unsqueeze(-1)   # [m, 1]
        li = m_meta[:, 1:]
        ok = li >= 0                                                                      # [m, k]
        li = torch.where(ok, li, torch.zeros_like(li))                                    # local to my shard
        kb, vb = (x.flatten(1, 2) for x in _local_blocks(bank, b_in, h_in, li, Bs))     # [m, k*Bs, dk], [m, k*Bs, dv]
        tok_bias = m_pay[:, n * d:].repeat_interleave(Bs, dim=-1) if bias is not None else None
        if len(m_meta):
            out, lse = attend_fn(m_pay[:, :n * d].view(-1, n, d), kb, vb, tok_bias, ok.repeat_interleave(Bs, dim=-1))
        else:                                              # nobody reads my blocks (the kernels refuse empty batches)
            out, lse = m_pay.new_zeros(0, n, dv), m_pay.new_zeros(0, n)
        work = wide_dtype(qg.dtype)
        back = torch.cat([out.to(work), lse.to(work).unsqueeze(-1)], -1)                 # [m, n, dv+1]
        got = self._a2a(back.reshape(-1), [m * n * (dv + 1) for m in recv], [m * n * (dv + 1) for m in sent],
                        "sp_ship").view(-1, n, dv + 1)                                   # my rows, by holder
        # merge: one partial per holder, empty (lse -inf) where a group reads nothing there
        parts, off = [], 0
        for r in rows:
            m = len(r)
            empty = got.new_zeros(B, H, G, n, dv + 1)
            empty[..., -1] = -math.inf
            full = empty.index_put((r[:, 0], r[:, 1], r[:, 2]), got[off:off + m])
            parts.append((full[..., :dv], full[..., -1]))
            off += m
        out, lse = merge_lse(parts)
        return out.to(qg.dtype), lse

    def fetch_blocks(self, bank, idx, valid, block_size: int):
        """The selected blocks' tokens, from the ranks holding them: (k, v [B, H, G, k*Bs, d], mask [B, H, G, k*Bs])."""
        if bank is None:                                   # no bank on any rank (every chunk starts at 0)
            return None
        B, H, G, k = idx.shape
        n_b, Bs = bank.blocks_per_frame, block_size
        dk, dv = bank.k.shape[-1], bank.v.shape[-1]
        n_all = self.total * n_b                           # blocks of the whole bank
        # one request per distinct (sample, head, block): query blocks often pick the same ones
        bh = torch.arange(B * H, device=idx.device).view(B, H, 1, 1)
        key = (bh * n_all + idx)[valid]                                                  # [n_valid]
        uniq, inv = torch.unique(key, return_inverse=True)
        starts = torch.tensor([lo for lo, _ in self.ranges()], device=idx.device) * n_b
        owner = torch.searchsorted(starts, uniq % n_all, right=True) - 1
        order = torch.argsort(owner, stable=True)                                        # requests grouped by owner
        where = torch.empty_like(order)
        where[order] = torch.arange(len(order), device=order.device)
        want = torch.bincount(owner, minlength=self.size)                                # [cp] blocks I ask of each
        asked = self._exchange_nograd(want, "sp_requests")                               # [cp] blocks each asks of me
        want, asked = want.tolist(), asked.tolist()
        req = self._a2a_nograd(uniq[order], want, asked, "sp_requests")                  # keys asked of me
        # serve: whole blocks of my shard
        b, h, blk = req // n_all // H, req // n_all % H, req % n_all - bank.frame_offset * n_b  # [n_req] each
        pay = torch.cat(_local_blocks(bank, b, h, blk, Bs), dim=-1)                      # [n_req, Bs, dk+dv]
        got = self._a2a(pay.reshape(-1), [n * Bs * (dk + dv) for n in asked], [n * Bs * (dk + dv) for n in want],
                        "sp_kv").view(-1, Bs, dk + dv)                                   # [n_uniq, Bs, dk+dv], by owner
        # one gather per K and V straight into [B, H, G, k*Bs, d]; an invalid slot reads a zero row (masked anyway)
        tab = torch.cat([got, got.new_zeros(1, Bs, dk + dv)])                           # [n_uniq + 1, Bs, dk+dv]
        row = torch.full_like(idx, len(got)).index_put((valid,), where[inv])            # [B, H, G, k] rows of tab
        kb = tab[..., :dk][row].view(B, H, G, k * Bs, dk)
        vb = tab[..., dk:][row].view(B, H, G, k * Bs, dv)
        return kb, vb, valid.repeat_interleave(Bs, dim=-1)

    def fetch_frames(self, bank, lo: int, hi: int):
        """Frames [lo, hi) whole on this rank, each from the rank holding it."""
        return self._fetch_range(bank, lo, hi, "sp_frames")

    def window_kv(self, bank, lo: int, hi: int):
        """The ALM window [lo, hi) of this rank's chunk, sent by the rank(s) holding it to this rank only."""
        return self._fetch_range(bank, lo, hi, "sp_window")

    def _fetch_range(self, bank, lo: int, hi: int, name: str):
        if bank is None:
            return None
        B, H, _, Nf, dk = bank.k.shape
        dv = bank.v.shape[-1]
        asks = self._all_gather_nograd(torch.tensor([lo, hi]), name).tolist()            # [cp, 2]: every rank's range
        if name == "sp_window":                            # select_blocks' candidates, min(lo, hi), come with them
            self._win_asks = asks
        asks = [(a, max(a, b)) for a, b in asks]
        hi = max(hi, lo)
        own = self.ranges()
        me_lo, me_hi = own[self.rank]
        send, parts = [], []
        for r_lo, r_hi in asks:                            # my frames in each rank's range
            a, b = max(r_lo, me_lo), min(r_hi, me_hi)
            k_, v_ = bank.frames(a, b) if b > a else bank.frames(me_lo, me_lo)
            parts.append(torch.cat([k_, v_], dim=-1).reshape(-1))                        # [B*H*n*N_f*(dk+dv)]
            send.append(parts[-1].numel())
        per_frame = B * H * Nf * (dk + dv)
        n_from = [max(0, min(hi, p_hi) - max(lo, p_lo)) for p_lo, p_hi in own]           # frames from each rank
        got = self._a2a(torch.cat(parts), send, [n * per_frame for n in n_from], name)
        if hi <= lo:
            return None
        # rank order is time order, so the received segments are the frames [lo, hi) in order; each
        # segment is [B, H, n_p, N_f, e] on its own: stitch them along the frame axis
        segs, off = [], 0
        for n in n_from:
            segs.append(got[off:off + n * per_frame].view(B, H, n, Nf, dk + dv))
            off += n * per_frame
        kv = torch.cat(segs, dim=2)                                                      # [B, H, hi-lo, N_f, dk+dv]
        return kv[..., :dk], kv[..., dk:]

    # ---- plumbing ---------------------------------------------------------------------

    def _a2a(self, x, send, recv, name):
        """Autograd all-to-all of a flat tensor, counted (bytes sent + received, own segment excluded)."""
        self._count_a2a(name, x, send, recv)
        out = _AllToAll.apply(x, send, recv, self.group, self._anchor())
        if out.requires_grad:
            self._pending.append(out)
        return out

    def _a2a_nograd(self, x, send, recv, name):
        self._count_a2a(name, x, send, recv)
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group)
        return out

    def _exchange(self, x, name):
        """x [cp, ...]: slice r goes to rank r; returns [cp, ...], slice p from rank p (with gradient)."""
        n = x[0].numel()
        return self._a2a(x.reshape(-1), [n] * self.size, [n] * self.size, name).view(x.shape)

    def _exchange_nograd(self, x, name):
        n = x[0].numel() if x.dim() > 1 else 1
        return self._a2a_nograd(x.reshape(-1), [n] * self.size, [n] * self.size, name).view(x.shape)

    def _all_gather(self, x, name):
        out = super()._all_gather(x, name)
        if out.requires_grad:
            self._pending.append(out)
        return out

    def _count_a2a(self, name, x, send, recv):
        e = x.element_size()
        self.bytes[name] += e * (sum(send) - send[self.rank] + sum(recv) - recv[self.rank])
