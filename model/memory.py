"""Per-layer memory-bank tensors, the memory-context protocol and its single-process implementation.

The attention layer never talks to other processes. It is handed a context
object satisfying ``MemoryContext`` and calls its methods; this file's
``LocalMemory`` is the one-process answer to each of them. The context-parallel
version (``training/context_parallel.CPMemory``) owns a contiguous range of bank
frames and answers the same calls with collectives. tests/test_context_parallel.py
checks that both implement every method of the protocol with its signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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


#################################################################################
#                               Memory Context                                  #
#################################################################################

class MemoryContext(Protocol):
    """What the model asks of the bank's placement: the calls of attention, the memory stream and the loss."""

    def global_frames(self, bank: BankLayer | None) -> int:
        """Total bank frames across the group."""

    def shard(self, n_frames: int) -> tuple[int, int]:
        """The bank frames [lo, hi) of [0, n_frames) this process encodes."""

    def select_blocks(self, local_scores: torch.Tensor, bank: BankLayer | None, candidates: int, k: int):
        """Global top-k of the candidate blocks -> (idx, valid, selected scores with gradient, all scores or None)."""

    def merge_partials(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine partial attentions (out [..., d], lse [...]) over disjoint bank shards."""

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a statistic over the group's ranks, no gradient."""

    def window_kv(self, bank: BankLayer | None, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V of global bank frames [lo, hi), whole on every rank: [B, H, n, N_f, d] each."""

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

    def select_blocks(self, local_scores: torch.Tensor, bank: BankLayer | None, candidates: int, k: int):
        """Global top-k of the candidate blocks (frames [0, candidates)) from the local blocks' scores.

        local_scores: [..., n] for the local frames older than ``candidates``, in
        block order (on one process: all of them). Returns (idx [..., k] global
        block indices, valid [..., k], selected scores [..., k] with gradient,
        all scores [..., n] or None where they are not all held locally).
        """
        idx, valid = topk_blocks(local_scores, k)
        sel = local_scores.gather(-1, idx) if local_scores.shape[-1] else local_scores.new_zeros(idx.shape)
        return idx, valid, sel, local_scores

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

    def bytes_moved(self) -> dict[str, int]:
        """Nothing moves on one process."""
        return {}

    def reset_bytes(self) -> None:
        """Nothing to reset on one process."""


LOCAL: MemoryContext = LocalMemory()
