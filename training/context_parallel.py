"""Context parallelism over the memory bank (DESIGN §4): a sharded bank, all-gathered block scores, LSE merge.

Ranks form a dp × cp grid: rank r is (dp_rank, cp_rank) = (r // cp, r % cp). The
ranks of one cp group hold the same sample. Each encodes a contiguous shard of
the bank frames; the query stream is replicated. Per layer, ``CPMemory``
answers the attention layer's context calls:
  select_blocks   local block scores -> all-gather of each rank's top-k (score, index) -> one global
                  top-k, identical on every rank (k pairs per rank move, not every block's score)
  merge_partials  partial (out, lse) over local blocks -> fp32 log-sum-exp merge across the group
  coarse_read     the coarse branch's partial over the local candidates, merged the same way
  fetch_blocks    None: the selected blocks are read in place (fetching them is training/sequence_parallel.py's)
  window_kv       the ALM window's K/V (few frames, possibly on another rank), to every rank
  memory_halo     the W-1 frames before a shard, for the memory stream's local window
Gradients: every collective whose result is replicated has the all-reduce of
gradients as its adjoint, and each rank's loss is the full loss. The ranks'
gradients then sum to cp x the true gradient, so an average over all dp x cp
ranks (what DeepSpeed does with its data-parallel group = the world) equals
the dp-only average of a cp = 1 run.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from decmem.model.memory import block_scores, coarse_partial, pooled_candidates
from decmem.model.retrieval import topk_blocks

#################################################################################
#                                    Layout                                     #
#################################################################################

@dataclass(frozen=True)
class Layout:
    """Where one rank sits in the dp × cp grid."""

    world: int
    dp: int
    cp: int
    rank: int

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @classmethod
    def make(cls, world: int, cp: int, rank: int) -> "Layout":
        if cp < 1 or world % cp:
            raise ValueError(f"world size {world} does not factor as dp x cp with cp={cp}: "
                             f"cp must divide the number of processes (valid cp: {[c for c in range(1, world + 1) if world % c == 0]})")
        return cls(world, world // cp, cp, rank)

    def cp_groups(self) -> list[list[int]]:
        """The ranks of every cp group (they share one sample), in group order."""
        return [list(range(g * self.cp, (g + 1) * self.cp)) for g in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        """The ranks of every dp group (same cp rank, different samples), in group order."""
        return [list(range(c, self.world, self.cp)) for c in range(self.cp)]


def shard_range(n_frames: int, cp: int, cp_rank: int) -> tuple[int, int]:
    """Contiguous frames [lo, hi) of rank cp_rank: the first n % cp ranks get one frame more."""
    if n_frames < cp:
        raise ValueError(f"a bank of {n_frames} frames cannot be split across cp={cp} ranks (each needs at least one "
                         f"frame): use cp <= {max(1, n_frames)} or start target chunks later (data.min_context >= cp)")
    base, extra = divmod(n_frames, cp)
    lo = cp_rank * base + min(cp_rank, extra)
    return lo, lo + base + (1 if cp_rank < extra else 0)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """What partial outputs, scores and block indices travel and merge in: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cp_scalars(moved: dict, load: dict, micro_batches: int, depth: int) -> dict[str, float]:
    """Per-step logging: bytes per layer (per micro-batch) moved by each collective, and the ranks' imbalance.

    moved: ``bytes_moved()`` of the step (all micro-batches); load: ``load()`` (work per rank, e.g. query chunks).
    Imbalance is max over mean: 1 when every rank of the group runs as many chunks.
    """
    out = {"cp/bytes_per_step": float(sum(moved.values()))}
    for name, n in sorted(moved.items()):
        out[f"cp/bytes_per_layer/{name}"] = n / max(1, depth * micro_batches)
    chunks = load.get("chunks")
    if chunks and sum(chunks):
        out["cp/chunks_per_rank_max"] = float(max(chunks))
        out["cp/imbalance_chunks"] = max(chunks) / (sum(chunks) / len(chunks))
    return out


def build_groups(layout: Layout):
    """(cp group of this rank, dp group of this rank); every rank creates every group, in the same order."""
    cp_group = dp_group = None
    for ranks in layout.cp_groups():
        grp = dist.new_group(ranks) if layout.cp > 1 else None
        if layout.rank in ranks:
            cp_group = grp
    for ranks in layout.dp_groups():
        grp = dist.new_group(ranks) if layout.dp > 1 else None
        if layout.rank in ranks:
            dp_group = grp
    return cp_group, dp_group


#################################################################################
#                          Autograd-aware Collectives                           #
#################################################################################

class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x, replicated; adjoint: the all-reduce (sum) of the upstream gradients.

    ``anchor`` (a scalar that requires grad) makes autograd record the node on every
    rank even where x needs no gradient (a rank holding nothing relevant), so the
    backward all-reduce runs on all ranks; otherwise the others would wait forever.
    """

    @staticmethod
    def forward(ctx, x, group, anchor=None):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None, None


class _AllGather(torch.autograd.Function):
    """Equal-shaped tensors of every rank, stacked on a new dim 0 and replicated; adjoint: all-reduce, own slice."""

    @staticmethod
    def forward(ctx, x, group, rank, size, anchor=None):
        ctx.group, ctx.rank = group, rank
        out = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[ctx.rank], None, None, None, None


#################################################################################
#                               The cp Memory Context                           #
#################################################################################

class CPMemory:
    """The attention layer's memory context for one rank of a context-parallel group."""

    def __init__(self, group, cp_rank: int, cp_size: int):
        self.group, self.rank, self.size = group, cp_rank, cp_size
        self.total = 0                                     # bank frames of the current step, all ranks together
        self.bytes = defaultdict(int)                      # collective -> bytes this rank sent + received
        self.n_chunks = None                               # target chunks of the current step (query_slots)

    # ---- bank layout -------------------------------------------------------------

    def shard(self, n_frames: int) -> tuple[int, int]:
        self.total = n_frames
        return shard_range(n_frames, self.size, self.rank)

    def ranges(self) -> list[tuple[int, int]]:
        return [shard_range(self.total, self.size, r) for r in range(self.size)]

    def global_frames(self, bank) -> int:
        return self.total

    # ---- collectives the attention layer calls ------------------------------------

    def select_blocks(self, q_pool, bank, candidates: int, k: int):
        """Global top-k from each rank's local top-k: gather k (score, global index) pairs per rank, not all scores.

        The global top-k lies within the union of the local ones. Ranks hold increasing contiguous frame
        ranges and each local top-k lists blocks in ascending index, so in the gathered list position order
        is global index order, and the same tie rule (lower index first) gives the single-process answer.
        """
        n_b = bank.blocks_per_frame if bank is not None else 1
        lo = self.ranges()[self.rank][0]
        local_scores = block_scores(q_pool, pooled_candidates(bank, candidates))      # [..., n_qb, n_local]
        l_idx, l_valid = topk_blocks(local_scores, k)                                          # [..., k] local indices
        l_sel = local_scores.gather(-1, l_idx) if local_scores.shape[-1] else local_scores.new_zeros(l_idx.shape)
        l_sel = torch.where(l_valid, l_sel, torch.full_like(l_sel, -math.inf))
        g_sel = self._all_gather(l_sel, "scores")                                       # [cp, ..., k] (with grad)
        g_idx = self._all_gather_nograd(torch.where(l_valid, l_idx + lo * n_b, torch.zeros_like(l_idx)), "scores")
        cand = torch.cat(list(g_sel.unbind(0)), dim=-1)                                 # [..., cp*k], rank order
        cidx = torch.cat(list(g_idx.unbind(0)), dim=-1)
        pos, valid = topk_blocks(cand, k)                                               # same rule as one process
        idx = torch.where(valid, cidx.gather(-1, pos), torch.zeros_like(pos))
        return idx, valid, cand.gather(-1, pos), None

    def coarse_read(self, q_pool, bank, candidates: int, backend: str, scores=None):
        """The coarse branch over the local candidates, merged over every rank's (replicated queries). scores is
        always None here: this rank's select_blocks never holds every candidate's."""
        return self.merge_partials(*coarse_partial(q_pool, bank, candidates, backend))

    def read_blocks(self, qg, bank, idx, valid, bias, block_size: int, attend_fn):
        """Replicated queries read their local blocks in place (partials merged afterwards)."""
        return None

    def fetch_blocks(self, bank, idx, valid, block_size: int):
        """Replicated queries read their local blocks in place (partials merged afterwards)."""
        return None

    def fetch_frames(self, bank, lo: int, hi: int):
        """Replicated queries read their local frames in place (partials merged afterwards)."""
        return None

    def query_slots(self, n_chunks: int) -> list[int | None]:
        """Replicated query stream: every rank runs every chunk."""
        self.n_chunks = n_chunks
        return list(range(n_chunks))

    def chunk_loss(self, losses, idle, n_chunks: int):
        """Every rank's loss is the full loss (the replicated collectives' adjoints make up the rest)."""
        return torch.stack(losses).mean()

    def load(self) -> dict:
        """Every rank runs every chunk."""
        return {"chunks": [self.n_chunks] * self.size} if self.n_chunks is not None else {}

    def merge_partials(self, out, lse):
        """Log-sum-exp merge of partial attentions across the group, in fp32; (0, -inf) rows stay empty."""
        dtype = out.dtype
        work = wide_dtype(dtype)
        m = lse.detach().to(work).clone()
        m = torch.where(torch.isfinite(m), m, torch.full_like(m, -1e30))
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)                    # any constant works: not diffed
        self._count("merge_max", m)
        w = torch.exp(lse.to(work) - m)                                                  # 0 for empty partials
        num = self._all_reduce(out.to(work) * w.unsqueeze(-1), "merge")
        den = self._all_reduce(w, "merge")
        empty = den <= 0
        den_safe = torch.where(empty, torch.ones_like(den), den)
        out = (num / den_safe.unsqueeze(-1)).to(dtype)
        lse = torch.where(empty, torch.full_like(den, -math.inf), m + torch.log(den_safe))
        return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)

    def all_sum(self, x):
        """Sum of a statistic (no gradient) over the cp group."""
        x = x.detach().clone()
        self._count("stats", x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def window_kv(self, bank, lo: int, hi: int):
        """Frames [lo, hi) of the bank, assembled on every rank from whichever ranks hold them."""
        if hi <= lo or bank is None:
            return None
        n = hi - lo
        B, H, _, Nf, d = bank.k.shape
        k_loc, v_loc = bank.frames(lo, hi)                                            # this rank's part
        n_loc = k_loc.shape[2]
        off = max(lo, bank.frame_offset) - lo if n_loc else 0                           # its place in the window
        zeros = lambda m: bank.k.new_zeros(2, B, H, m, Nf, d)                          # noqa: E731
        buf = torch.cat([zeros(off), torch.stack([k_loc, v_loc]), zeros(n - off - n_loc)], dim=3)  # [2, B, H, n, Nf, d]
        # ranks hold disjoint frames and zeros elsewhere: a sum assembles the window
        full = self._all_reduce(buf, "window")
        return full[0], full[1]

    def memory_halo(self, k, v, n: int):
        """The n frames before this shard at this layer, from the tails of the previous ranks."""
        if n <= 0:
            return None
        B, H, T, Nf, d = k.shape
        take = min(n, T)
        tail = torch.stack([k[:, :, T - take:], v[:, :, T - take:]])                   # [2, B, H, take, Nf, d]
        tail = torch.cat([tail.new_zeros(2, B, H, n - take, Nf, d), tail], dim=3)       # left-pad to n frames
        tails = self._all_gather(tail, "halo")                                          # [cp, 2, B, H, n, Nf, d]
        lo = self.ranges()[self.rank][0]
        parts, need = [], min(n, lo)
        for r in range(self.rank - 1, -1, -1):
            if need == 0:
                break
            r_lo, r_hi = self.ranges()[r]
            have = min(n, r_hi - r_lo, need)
            parts.insert(0, tails[r][:, :, :, n - have:])
            need -= have
        if not parts:                # rank 0: no frames before it, but the gathered tensor must still be used,
            parts = [tails[0][:, :, :, :0]]  # or its backward all-reduce would not run here while others wait
        past = torch.cat(parts, dim=3)                                                  # [2, B, H, P, Nf, d]
        return past[0], past[1]

    def bank_cameras(self, K, c2w):
        """Every bank frame's camera: the shards' cameras all-gathered (no gradient: poses are data)."""
        n = max(hi - lo for lo, hi in self.ranges())
        buf = torch.cat([torch.cat([K.reshape(*K.shape[:2], 9), c2w.reshape(*c2w.shape[:2], 16)], -1),
                         K.new_zeros(K.shape[0], n - K.shape[1], 25)], dim=1)
        out = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(out, buf.contiguous(), group=self.group)
        full = torch.cat([out[r][:, :hi - lo] for r, (lo, hi) in enumerate(self.ranges())], dim=1)
        return full[..., :9].reshape(*full.shape[:2], 3, 3), full[..., 9:].reshape(*full.shape[:2], 4, 4)

    # ---- accounting ------------------------------------------------------------------

    def _all_reduce(self, x, name):
        self._count(name, x)
        return _AllReduceSum.apply(x, self.group, self._anchor())

    def _all_gather(self, x, name):
        self._count(name, x, gather=True)
        return _AllGather.apply(x, self.group, self.rank, self.size, self._anchor())

    def _all_gather_nograd(self, x, name):
        self._count(name, x, gather=True)
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return torch.stack(out)

    def _anchor(self):
        if not torch.is_grad_enabled():
            return None
        if getattr(self, "_anchor_t", None) is None:
            self._anchor_t = torch.zeros((), requires_grad=True)
        return self._anchor_t

    def _count(self, name, x, gather=False):
        """Bytes this rank sends + receives, ring algorithms: all-gather of S bytes 2S(cp-1)/cp, all-reduce 4S(cp-1)/cp."""
        n = x.numel() * x.element_size()
        self.bytes[name] += int((2 * n * self.size if gather else 4 * n) * (self.size - 1) / self.size)

    def bytes_moved(self) -> dict:
        return dict(self.bytes)

    def reset_bytes(self) -> None:
        self.bytes.clear()
