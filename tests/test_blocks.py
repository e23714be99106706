"""Block tiling: blocks are spatially contiguous tiles; a size that does not tile is a clear error."""
import pytest
import torch

from decmem.model.blocks import BlockLayout, pool_blocks


@pytest.mark.parametrize("h,w,B", [(4, 4, 4), (8, 6, 6), (16, 16, 16), (4, 8, 8), (3, 5, 15), (6, 4, 1)])
def test_blocks_are_contiguous_tiles(h, w, B):
    lay = BlockLayout(h, w, B)
    bh, bw = lay.tile
    rc = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)  # raster (row, col)
    blocks = rc[lay.raster_to_block].view(lay.blocks_per_frame, B, 2)
    for b, (tr, tc) in enumerate(lay.block_rows_cols().tolist()):
        rows, cols = blocks[b, :, 0], blocks[b, :, 1]
        assert set(rows.tolist()) == set(range(tr * bh, tr * bh + bh))
        assert set(cols.tolist()) == set(range(tc * bw, tc * bw + bw))
    x = torch.randn(2, h * w, 3)
    assert torch.equal(x[:, lay.raster_to_block][:, lay.block_to_raster], x)


def test_non_tiling_block_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"block_size=7 does not tile a 4x4 token grid.*valid block sizes here: \[1, 2, 4, 8, 16\]"):
        BlockLayout(4, 4, 7)


def test_pool_blocks_means_contiguous_tokens():
    k = torch.arange(24.0).view(1, 6, 4)
    assert torch.equal(pool_blocks(k, 3), torch.stack([k[0, :3].mean(0), k[0, 3:].mean(0)])[None])
