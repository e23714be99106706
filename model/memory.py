"""Per-layer memory-bank tensors, the memory-context protocol and its single-process implementation.

The attention layer never talks to other processes. It is handed a context
object satisfying ``MemoryContext`` and calls its methods; this file's
``LocalMemory`` is the one-process answer to each of them. The context-parallel
versions own a contiguous range of bank frames and answer the same calls with
collectives: ``training/context_parallel.CPMemory`` (query stream replicated) and
``training/sequence_parallel.SPMemory`` (query stream sharded: each rank runs its
own target chunks and fetches what they read). tests/test_context_parallel.py
checks that all implement every method of the protocol with its signature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from decmem.model.kernels import attend
from decmem.model.retrieval import topk_blocks

#################################################################################
#                                 Bank Tensors                                  #
#################################################################################

@dataclass
class BankLayer:
    """One layer's memory: K/V of every locally held bank frame and one pooled key and value per block."""

    k: torch.Tensor          # [B, H, T_local, N_f, d], tokens block-major within a frame
    v: torch.Tensor          # [B, H, T_local, N_f, d]
    k_pool: torch.Tensor     # [B, H, T_local, n_b, d], mean key of each block
    v_pool: torch.Tensor     # [B, H, T_local, n_b, d], mean value of each block (the coarse branch reads it)
    frame_offset: int = 0    # global frame index of local frame 0 (non-zero on a cp shard)

    @property
    def local_frames(self) -> int:
        return self.k.shape[2]

    @property
    def frame_tokens(self) -> int:
        return self.k.shape[3]

    @property
    def blocks_per_frame(self) -> int:
        return self.k_pool.shape[3]

    def frames(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of local frames with global index in [lo, hi): [B, H, n, N_f, d] each."""
        a = min(max(lo - self.frame_offset, 0), self.local_frames)
        b = min(max(hi - self.frame_offset, 0), self.local_frames)
        return self.k[:, :, a:b], self.v[:, :, a:b]


def flat_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, n, e] -> [B, H, T*n, e] without copying when T is a slice of a larger buffer."""
    B, H, T, n, e = x.shape
    try:
        return x.view(B, H, T * n, e)
    except RuntimeError:  # a layout view cannot express: copy
        return x.reshape(B, H, T * n, e)


def pooled_candidates(bank: BankLayer | None, candidates: int, values: bool = False):
    """Pooled keys [B, H, n, d] of the local blocks in frames older than ``candidates`` (None without a bank);
    with ``values``, (keys, values).

    Candidates are a prefix of the local frames, so this slices and never masks.
    """
    if bank is None:
        return (None, None) if values else None
    n_old = min(max(candidates - bank.frame_offset, 0), bank.local_frames)
    kp = flat_frames(bank.k_pool[:, :, :n_old])
    return (kp, flat_frames(bank.v_pool[:, :, :n_old])) if values else kp


def block_scores(q_pool: torch.Tensor, kp: torch.Tensor | None) -> torch.Tensor:
    """Retrieval scores q̄_j · K̄_b / sqrt(d): q_pool [B, H, n_qb, d], kp [B, H, n, d] -> [B, H, n_qb, n]."""
    if kp is None:
        return q_pool.new_zeros(*q_pool.shape[:-1], 0)
    return (q_pool / math.sqrt(q_pool.shape[-1])) @ kp.transpose(-1, -2)


def coarse_partial(q_pool: torch.Tensor, bank: BankLayer | None, candidates: int, backend: str):
    """Pooled queries over the pooled K/V of the local candidate blocks -> partial (out [B, H, n_qb, d], lse)."""
    kp, vp = pooled_candidates(bank, candidates, values=True)
    empty = q_pool[..., :0, :]
    return attend(q_pool, kp if kp is not None else empty, vp if vp is not None else empty, backend=backend)


def coarse_from_scores(scores: torch.Tensor, bank: BankLayer, candidates: int):
    """``coarse_partial`` from the retrieval scores of the same candidates (its logits, q̄·K̄/sqrt(d)): softmax(scores)
    @ pooled values, without a second pass over the pooled keys and the fused kernel's padded copies of them.
    scores [B, H, n_qb, n >= 1] -> (out [B, H, n_qb, d], lse [B, H, n_qb]), accumulated in fp32 at least."""
    _, vp = pooled_candidates(bank, candidates, values=True)                          # [B, H, n, d]
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    out = torch.softmax(s, dim=-1) @ vp.to(s.dtype)                                    # [B, H, n_qb, d]
    return out.to(vp.dtype), torch.logsumexp(s, dim=-1)


#################################################################################
#                               Memory Context                                  #
#################################################################################

class MemoryContext(Protocol):
    """What the model asks of the bank's placement: the calls of attention, the memory stream and the loss."""

    def global_frames(self, bank: BankLayer | None) -> int:
        """Total bank frames across the group."""

    def shard(self, n_frames: int) -> tuple[int, int]:
        """The bank frames [lo, hi) of [0, n_frames) this process encodes."""

    def select_blocks(self, q_pool: torch.Tensor, bank: BankLayer | None, candidates: int, k: int):
        """Global top-k of the candidate blocks for pooled queries [B, H, n_qb, d]
        -> (idx, valid, selected scores with gradient, all scores or None)."""

    def coarse_read(self, q_pool: torch.Tensor, bank: BankLayer | None, candidates: int, backend: str,
                    scores: torch.Tensor | None = None):
        """Pooled queries over every candidate block's pooled K/V, whole: (out [B, H, n_qb, d], lse [B, H, n_qb]).
        scores: what ``select_blocks`` returned as all scores (the coarse logits, when every candidate is here)."""

    def read_blocks(self, qg: torch.Tensor, bank: BankLayer | None, idx: torch.Tensor, valid: torch.Tensor,
                    bias: torch.Tensor | None, block_size: int, attend_fn):
        """Query groups qg [B, H, G, n, d] read their selected blocks where those are held: (out, lse) whole here,
        or None (fetch or read in place). attend_fn(q, k, v, key_bias, key_mask) -> (out, lse) is the layer's kernel."""

    def fetch_blocks(self, bank: BankLayer | None, idx: torch.Tensor, valid: torch.Tensor, block_size: int):
        """Selected blocks' tokens brought to this rank (k, v [..., k*B, d], mask [..., k*B]), or None: read in place."""

    def fetch_frames(self, bank: BankLayer | None, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V of global frames [lo, hi) brought to this rank, or None: read the local frames in place."""

    def merge_partials(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine partial attentions (out [..., d], lse [...]) over disjoint bank shards."""

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a read statistic over the ranks that each read a share of the keys, no gradient."""

    def window_kv(self, bank: BankLayer | None, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V of global bank frames [lo, hi), whole on every rank that reads them: [B, H, n, N_f, d] each."""

    def query_slots(self, n_chunks: int) -> list[int | None]:
        """The target chunks (indices) this rank runs, in order; None: a slot it joins without a chunk of its own."""

    def chunk_loss(self, losses: list[torch.Tensor], idle: list[torch.Tensor], n_chunks: int) -> torch.Tensor:
        """The step's loss from this rank's chunk losses (and idle slots' losses, weight 0)."""

    def load(self) -> dict:
        """This step's work per rank of the group (query chunks), for logging imbalance."""

    def memory_halo(self, k: torch.Tensor, v: torch.Tensor, n: int):
        """K/V of the n frames before this shard's first frame, at this layer, or None."""

    def bank_cameras(self, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cameras of every bank frame of the group."""

    def bytes_moved(self) -> dict[str, int]:
        """Bytes this rank moved per collective since the last ``reset_bytes``."""

    def reset_bytes(self) -> None:
        """Start counting moved bytes afresh (once per step)."""


#################################################################################
#                            Single-process Context                             #
#################################################################################

class LocalMemory:
    """The memory-parallel context of a single process: the whole bank is local."""

    def global_frames(self, bank: BankLayer | None) -> int:
        """Total bank frames across the group."""
        return 0 if bank is None else bank.frame_offset + bank.local_frames

    def select_blocks(self, q_pool: torch.Tensor, bank: BankLayer | None, candidates: int, k: int):
        """Global top-k of the candidate blocks (frames [0, candidates)) for pooled queries q_pool [..., n_qb, d].

        Returns (idx [..., k] global block indices, valid [..., k], selected scores
        [..., k] with gradient, all scores [..., n] or None where they are not all
        held locally).
        """
        scores = block_scores(q_pool, pooled_candidates(bank, candidates))          # [..., n_qb, n]
        idx, valid = topk_blocks(scores, k)
        sel = scores.gather(-1, idx) if scores.shape[-1] else scores.new_zeros(idx.shape)
        return idx, valid, sel, scores

    def coarse_read(self, q_pool: torch.Tensor, bank: BankLayer | None, candidates: int, backend: str,
                    scores: torch.Tensor | None = None):
        """Pooled queries over every candidate block's pooled K/V (all local here). With the candidates' scores,
        those are the logits: no second bank-wide pass (at 7168 blocks per head, half of generation's O(bank)
        growth)."""
        if scores is not None and scores.shape[-1]:
            return coarse_from_scores(scores, bank, candidates)
        return coarse_partial(q_pool, bank, candidates, backend)

    def read_blocks(self, qg, bank, idx, valid, bias, block_size: int, attend_fn):
        """Every block is local: read in place."""
        return None

    def fetch_blocks(self, bank: BankLayer | None, idx: torch.Tensor, valid: torch.Tensor, block_size: int):
        """Every block is local: read in place."""
        return None

    def fetch_frames(self, bank: BankLayer | None, lo: int, hi: int):
        """Every frame is local: read in place."""
        return None

    def merge_partials(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine partial attentions over disjoint bank shards (identity on one process)."""
        return out, lse

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a statistic over the group's ranks, no gradient (the value itself on one process)."""
        return x

    def window_kv(self, bank: BankLayer | None, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V of global bank frames [lo, hi), replicated on every rank: [B, H, n, N_f, d] each."""
        if bank is None or hi <= lo:
            return None
        return bank.frames(lo, hi)

    def shard(self, n_frames: int) -> tuple[int, int]:
        """The bank frames [lo, hi) of [0, n_frames) this process encodes (all of them here)."""
        return 0, n_frames

    def memory_halo(self, k: torch.Tensor, v: torch.Tensor, n: int):
        """K/V of the n frames before this shard's first frame, at this layer (none on one process)."""
        return None

    def bank_cameras(self, K: torch.Tensor, c2w: torch.Tensor):
        """Cameras of every bank frame (the local ones are all of them here)."""
        return K, c2w

    def query_slots(self, n_chunks: int) -> list[int | None]:
        """Every chunk runs here."""
        return list(range(n_chunks))

    def chunk_loss(self, losses: list[torch.Tensor], idle: list[torch.Tensor], n_chunks: int) -> torch.Tensor:
        """Mean over the chunks (no idle slot on one process)."""
        return torch.stack(losses).mean()

    def load(self) -> dict:
        """Nothing to balance on one process."""
        return {}

    def bytes_moved(self) -> dict[str, int]:
        """Nothing moves on one process."""
        return {}

    def reset_bytes(self) -> None:
        """Nothing to reset on one process."""


LOCAL: MemoryContext = LocalMemory()
