"""PRoPE + spatial/temporal RoPE inside attention (model/posenc.py) against explicit matrices and invariances."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decmem.model.attention import AttentionArgs
from decmem.model.diffusion import DiffusionArgs, rectified_flow_loss
from decmem.model.dit import ModelArgs, VideoDiT
from decmem.model.posenc import ChannelSplit, TokenPositions, prope_matrices

F64 = torch.float64


def random_cameras(T, hw=(8, 8), seed=0):
    """Intrinsics in pixels and camera-to-world poses with real rotations and translations: [1, T, ...]."""
    rng = np.random.default_rng(seed)
    h, w = hw
    K = np.zeros((T, 3, 3))
    K[:, 0, 0], K[:, 1, 1] = rng.uniform(0.7, 1.3, T) * w, rng.uniform(0.7, 1.3, T) * h
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = w / 2 + rng.normal(0, 0.5, T), h / 2 + rng.normal(0, 0.5, T), 1
    c2w = np.tile(np.eye(4), (T, 1, 1))
    for t in range(T):
        a = rng.normal(size=3)
        A = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        c2w[t, :3, :3] = _expm(A)
        c2w[t, :3, 3] = rng.normal(0, 0.5, 3)
    return torch.tensor(K)[None], torch.tensor(c2w)[None]


def _expm(A, terms=30):
    out, term = np.eye(3), np.eye(3)
    for n in range(1, terms):
        term = term @ A / n
        out = out + term
    return out


def explicit_prope(K, c2w, hw):
    """P̃ = [[K̂, 0], [0, 1]] · w2c written out in numpy, K̂ in frame units with a centred principal point at 0."""
    h, w = hw
    Kn = np.eye(4)
    Kn[0, 0], Kn[0, 1], Kn[0, 2] = K[0, 0] / w, K[0, 1] / w, K[0, 2] / w - 0.5
    Kn[1, 1], Kn[1, 2] = K[1, 1] / h, K[1, 2] / h - 0.5
    return Kn @ np.linalg.inv(c2w)


def test_channel_split_follows_the_paper_and_fits_every_head():
    assert ChannelSplit.for_head(72) == ChannelSplit(24, 24, 24)              # the paper's 72-channel heads
    for d in (8, 16, 32, 64, 128):
        s = ChannelSplit.for_head(d)
        assert s.camera % 4 == 0 and s.spatial % 4 == 0 and s.temporal % 2 == 0
        assert s.camera + s.spatial + s.temporal <= d and s.camera > 0 and s.spatial > 0


def test_query_key_product_sees_the_explicit_relative_camera_transform():
    """Camera channels: (D_1ᵀ q)·(D_2⁻¹ k) == qᵀ (P̃₁ P̃₂⁻¹ per 4-block) k, with P̃ built independently."""
    hw, d, Nf = (8, 8), 16, 4
    split = ChannelSplit.for_head(d)
    K, c2w = random_cameras(2, hw)
    pos = TokenPositions(split, Nf, cam=prope_matrices(K, c2w, hw))           # camera only: no grid, no time
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2 * Nf, d, generator=g, dtype=F64)
    k = torch.randn(1, 1, 2 * Nf, d, generator=g, dtype=F64)
    qp, kp = pos.query(q), pos.key(k)
    P = [explicit_prope(K[0, t].numpy(), c2w[0, t].numpy(), hw) for t in range(2)]
    M = np.eye(d)
    for i in range(split.camera // 4):
        M[4 * i:4 * i + 4, 4 * i:4 * i + 4] = P[0] @ np.linalg.inv(P[1])
    q1, k2 = q[0, 0, :Nf].numpy(), k[0, 0, Nf:].numpy()                       # queries of frame 0, keys of frame 1
    got = (qp[0, 0, :Nf] @ kp[0, 0, Nf:].T).numpy()
    np.testing.assert_allclose(got, q1 @ M @ k2.T, rtol=1e-10, atol=1e-10)
    # and the same frame on both sides cancels exactly: plain dot products
    np.testing.assert_allclose((qp[0, 0, :Nf] @ kp[0, 0, :Nf].T).numpy(), q1 @ k[0, 0, :Nf].numpy().T,
                               rtol=1e-10, atol=1e-10)


def test_rope_dot_products_depend_only_on_relative_offsets():
    d, Nf = 32, 16
    split = ChannelSplit.for_head(d)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(Nf, 2)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3 * Nf, d, generator=g, dtype=F64)
    k = torch.randn(1, 2, 3 * Nf, d, generator=g, dtype=F64)

    def logits(grid_shift, t_shift):
        pos = TokenPositions(split, Nf, grid=grid + grid_shift, frame_index=torch.arange(3) + t_shift, grid_hw=(4, 4))
        return pos.query(q) @ pos.key(k).transpose(-1, -2)

    base = logits(torch.tensor([0, 0]), 0)
    torch.testing.assert_close(logits(torch.tensor([5, -3]), 17), base, atol=1e-11, rtol=1e-11)
    # a change of relative position does change them (the encoding is not a no-op)
    pos = TokenPositions(split, Nf, grid=grid.flip(0), frame_index=torch.arange(3), grid_hw=(4, 4))
    assert (pos.query(q) @ pos.key(k).transpose(-1, -2) - base).abs().max() > 1e-2


def test_values_and_outputs_are_transformed_consistently():
    """GTA: a query reading only keys of its own camera and grid cell gets the plain values back."""
    hw, d, Nf = (8, 8), 16, 4
    split = ChannelSplit.for_head(d)
    K, c2w = random_cameras(1, hw, seed=3)
    grid = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    pos = TokenPositions(split, Nf, cam=prope_matrices(K, c2w, hw), grid=grid, frame_index=torch.tensor([4]))
    v = torch.randn(1, 1, Nf, d, dtype=F64)
    # each token reads exactly itself (a one-hot attention matrix): o = D_q D_q⁻¹ v = v
    torch.testing.assert_close(pos.output(pos.value(v)), v, atol=1e-12, rtol=1e-12)
    assert (pos.value(v) - v)[..., : split.camera + split.spatial].abs().max() > 1e-3
    torch.testing.assert_close(pos.value(v)[..., split.camera + split.spatial:],
                               v[..., split.camera + split.spatial:])     # temporal channels: untouched on v


def _prope_model(strategy="decmem", seed=0, **att):
    torch.manual_seed(seed)
    a = AttentionArgs(strategy=strategy, block_size=4, top_k=3, window=3, **att)
    m = VideoDiT(ModelArgs(size="debug", chunk_frames=2, camera="prope", position="rope", attention=a)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("strategy", ["decmem", "dense"])
def test_rigid_motion_of_the_whole_trajectory_leaves_the_model_unchanged(strategy):
    m = _prope_model(strategy, merge="residual", coarse=True)
    T = 9
    K, c2w = random_cameras(T, (8, 8), seed=5)
    lat = torch.randn(1, T, 3, 8, 8, dtype=F64)
    G = torch.eye(4, dtype=F64)
    G[:3, :3] = torch.tensor(_expm(np.array([[0, -0.4, 1.1], [0.4, 0, -0.7], [-1.1, 0.7, 0]])))
    G[:3, 3] = torch.tensor([3.0, -2.0, 5.0])

    def loss(c):
        return rectified_flow_loss(m, lat, K, c, [5, 7], DiffusionArgs(), generator=torch.Generator().manual_seed(0))[0]

    base = loss(c2w)
    torch.testing.assert_close(loss(G @ c2w), base, atol=1e-10, rtol=1e-10)
    other = c2w.clone()
    other[0, 2] = G @ other[0, 2]                                               # one frame moved alone: it changes
    assert abs(loss(other) - base) > 1e-6


def test_position_prior_scores_same_view_same_cell_highest():
    """At init the q/k biases add exactly position_prior logits for the same view and cell, less for any other."""
    from decmem.model.attention import DecMemAttention

    hw, D, H, prior = (8, 8), 64, 2, 12.0
    d = D // H
    att = DecMemAttention(D, H, AttentionArgs(block_size=4, position_prior=prior))
    att.init_position_prior(ChannelSplit.for_head(d), camera=True, spatial=True)
    with torch.no_grad():
        att.qkv.weight.zero_()                                         # only the biases: the prior itself
    T, Nf = 4, 16
    K, c2w = random_cameras(T, hw, seed=7)
    c2w[0, 1] = c2w[0, 0]                                               # frame 1 revisits frame 0's view
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(Nf, 2)
    pos = TokenPositions(ChannelSplit.for_head(d), Nf, prope_matrices(K.float(), c2w.float(), hw), grid,
                         torch.arange(T), (4, 4))
    with torch.no_grad():
        q, k, _ = att._heads(torch.randn(1, T * Nf, D), pos)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(d))[0]                # [H, T*Nf, T*Nf]
    same = torch.eye(Nf, dtype=torch.bool)
    for h in range(H):
        for a, b in ((0, 0), (0, 1), (2, 2)):                          # same view (own frame, or the revisit)
            blk = logits[h, a * Nf:(a + 1) * Nf, b * Nf:(b + 1) * Nf]
            torch.testing.assert_close(blk[same], torch.full((Nf,), prior), atol=1e-4, rtol=1e-5)
            assert float(blk[~same].max()) < prior - 0.1                # another cell of the same view: less
        other = logits[h, :Nf, 2 * Nf:3 * Nf]                            # another view (random rotation)
        assert float(other[same].max()) < prior - 0.1
