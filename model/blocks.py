"""Spatial token blocks: how a frame's tokens are tiled into SGM retrieval blocks.

The whole model keeps a frame's tokens in *block-major* order: token
``b * B + i`` is the ``i``-th token (raster order inside the tile) of block
``b`` (raster order over tiles). With that order a block is a contiguous slice
of ``B`` tokens, so pooling and gathering blocks are reshapes, not scatters.
Patchify / unpatchify apply ``raster_to_block`` / ``block_to_raster`` once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

#################################################################################
#                                 Block Layout                                  #
#################################################################################

@dataclass(frozen=True)
class BlockLayout:
    """Tiling of an ``h x w`` token grid into spatially contiguous tiles of ``block_size`` tokens."""

    h: int
    w: int
    block_size: int

    def __post_init__(self):
        if self.h <= 0 or self.w <= 0 or self.block_size <= 0:
            raise ValueError(f"BlockLayout needs positive sizes, got h={self.h} w={self.w} block_size={self.block_size}")
        if self.tile is None:
            raise ValueError(
                f"block_size={self.block_size} does not tile a {self.h}x{self.w} token grid: need a tile "
                f"bh x bw = {self.block_size} with bh dividing {self.h} and bw dividing {self.w}; "
                f"valid block sizes here: {valid_block_sizes(self.h, self.w)}"
            )

    @cached_property
    def tile(self) -> tuple[int, int] | None:
        """The most square (bh, bw) with bh*bw = block_size that divides the grid, or None."""
        best = None
        for bh in range(1, self.block_size + 1):
            if self.block_size % bh:
                continue
            bw = self.block_size // bh
            if self.h % bh or self.w % bw:
                continue
            if best is None or abs(math.log(bh / bw)) < abs(math.log(best[0] / best[1])):
                best = (bh, bw)
        return best

    @property
    def tokens(self) -> int:
        return self.h * self.w

    @property
    def blocks_per_frame(self) -> int:
        return self.tokens // self.block_size

    @cached_property
    def raster_to_block(self) -> torch.Tensor:
        """Index tensor ``perm`` such that ``x_block = x_raster[..., perm, :]``."""
        bh, bw = self.tile
        grid = torch.arange(self.tokens).view(self.h // bh, bh, self.w // bw, bw)  # [nh, bh, nw, bw]
        return grid.permute(0, 2, 1, 3).reshape(-1)                                # [N_f], tiles then in-tile raster

    @cached_property
    def block_to_raster(self) -> torch.Tensor:
        """Inverse permutation: ``x_raster = x_block[..., inv, :]``."""
        return torch.argsort(self.raster_to_block)

    def block_rows_cols(self) -> torch.Tensor:
        """[n_b, 2] (row, col) of each block's tile in the grid of tiles (for heatmaps)."""
        bh, bw = self.tile
        nw = self.w // bw
        b = torch.arange(self.blocks_per_frame)
        return torch.stack([b // nw, b % nw], dim=-1)


def valid_block_sizes(h: int, w: int) -> list[int]:
    """Block sizes that tile an h x w grid (products of a divisor of h and a divisor of w)."""
    dh = [d for d in range(1, h + 1) if h % d == 0]
    dw = [d for d in range(1, w + 1) if w % d == 0]
    return sorted({a * b for a in dh for b in dw})


def pool_blocks(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block's keys: [..., N, d] (block-major tokens) -> [..., N // block_size, d]."""
    *lead, n, d = k.shape
    if n % block_size:
        raise ValueError(f"{n} tokens are not a whole number of blocks of {block_size}")
    return k.reshape(*lead, n // block_size, block_size, d).mean(dim=-2)
