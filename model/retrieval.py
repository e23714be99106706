"""Which bank blocks a query reads: deterministic top-k (SGM) and field-of-view frames (WorldMem baseline).

Both are pure functions of replicated inputs (all-gathered scores, poses), so
every context-parallel rank that calls them gets the identical selection.
"""
from __future__ import annotations

import math

import torch

#################################################################################
#                                  SGM top-k                                    #
#################################################################################

def topk_blocks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k block indices per row, ties broken by lower block index.

    scores: [..., n] with -inf for ineligible blocks. Returns idx [..., k] (long,
    ascending within a row) and valid [..., k] (False for padding slots and for
    ineligible blocks, which only fill slots when fewer than k are eligible).
    ``torch.topk`` alone leaves tie order unspecified, which would let two cp
    ranks pick different blocks; rows whose k-th value is tied with a block
    outside the pick (seen as a (k+1)-th value equal to the k-th) are redone: every block strictly above the k-th value
    is kept, and the tied ones are taken in index order. (Ties at -inf need no
    care: those slots are invalid whatever index they hold.)
    """
    *lead, n = scores.shape
    idx = torch.zeros(*lead, k, dtype=torch.long, device=scores.device)
    valid = torch.zeros(*lead, k, dtype=torch.bool, device=scores.device)
    kk = min(k, n)
    if kk == 0:
        return idx, valid
    s = scores.detach()
    k1 = min(kk + 1, n)
    vals, sel = s.topk(k1, dim=-1)                                               # [..., k1], descending
    kth = vals[..., kk - 1:kk]
    # the pick is ambiguous only if the best value left out equals the k-th one
    ambiguous = (vals[..., kk] == kth[..., 0]) & torch.isfinite(kth[..., 0]) if k1 > kk else None
    sel = sel[..., :kk]
    if ambiguous is not None and bool(ambiguous.any()):
        rows = ambiguous.nonzero(as_tuple=True)
        sel[rows] = _tie_break(s[rows], kth[rows], kk)
    sel = sel.sort(dim=-1).values                                                # ascending block index
    idx[..., :kk] = sel
    valid[..., :kk] = torch.isfinite(s.gather(-1, sel))
    return idx, valid


def _tie_break(s: torch.Tensor, kth: torch.Tensor, kk: int) -> torch.Tensor:
    """Rows [r, n]: every block above the k-th value, then tied ones in index order -> [r, kk]."""
    above = s > kth
    tied = s == kth
    need = kk - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=-1) <= need))                      # exactly kk per row
    positions = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    return torch.where(chosen, positions, torch.full_like(positions, s.shape[-1])).topk(kk, dim=-1, largest=False).values


def selected_log_weights(sel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log softmax over the valid selected scores [..., k] (0 on invalid slots), gradient-safe when none is valid."""
    sel = torch.where(valid, sel, torch.full_like(sel, -math.inf))
    m = sel.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = torch.exp(sel - m).sum(dim=-1, keepdim=True)
    z = torch.where(z > 0, z, torch.ones_like(z))
    return torch.where(valid, sel - m - torch.log(z), torch.zeros_like(sel))


#################################################################################
#                        Field-of-view frames (WorldMem)                        #
#################################################################################

def target_points(K: torch.Tensor, c2w: torch.Tensor, image_hw: tuple[int, int], grid: int = 8,
                  depths: tuple[float, ...] = (1.0, 2.0, 4.0)) -> torch.Tensor:
    """World points seen by target cameras: a pixel grid back-projected at fixed depths.

    K: [B, C, 3, 3], c2w: [B, C, 4, 4] (OpenCV axes) -> [B, C * grid^2 * len(depths), 3].
    Without depth maps the visible surface is unknown, so each ray is sampled at
    a few depths in scene units (translation is normalised per clip).
    """
    H, W = image_hw
    dev, dt = K.device, K.dtype
    u = (torch.arange(grid, device=dev, dtype=dt) + 0.5) * (W / grid)
    v = (torch.arange(grid, device=dev, dtype=dt) + 0.5) * (H / grid)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pix = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1).reshape(-1, 3)      # [P, 3]
    rays = torch.einsum("bcij,pj->bcpi", torch.linalg.inv(K), pix)               # [B, C, P, 3] camera dirs (z=1)
    d = torch.tensor(depths, device=dev, dtype=dt)
    pts_cam = rays.unsqueeze(-2) * d.view(1, 1, 1, -1, 1)                        # [B, C, P, D, 3]
    R, t = c2w[..., :3, :3], c2w[..., :3, 3]
    pts = torch.einsum("bcij,bcpdj->bcpdi", R, pts_cam) + t[:, :, None, None, :]
    return pts.reshape(K.shape[0], -1, 3)


def visibility(points: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, image_hw: tuple[int, int],
               near: float = 1e-3) -> torch.Tensor:
    """Whether each point projects inside each camera's image, in front of it.

    points: [B, P, 3]; K: [B, T, 3, 3]; c2w: [B, T, 4, 4] -> [B, T, P] bool.
    """
    H, W = image_hw
    w2c = torch.linalg.inv(c2w)
    cam = torch.einsum("btij,bpj->btpi", w2c[..., :3, :3], points) + w2c[:, :, None, :3, 3]  # [B, T, P, 3]
    z = cam[..., 2]
    uvw = torch.einsum("btij,btpj->btpi", K, cam)
    zs = torch.where(z > near, z, torch.ones_like(z))
    u, v = uvw[..., 0] / zs, uvw[..., 1] / zs
    return (z > near) & (u >= 0) & (u < W) & (v >= 0) & (v < H)


def select_fov_frames(K_bank, c2w_bank, K_tgt, c2w_tgt, image_hw, k: int, eligible_frames: int,
                      chunk_start: int, age_penalty: float = 0.0, grid: int = 8,
                      depths: tuple[float, ...] = (1.0, 2.0, 4.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy field-of-view coverage: k bank frames covering most target-visible points, minus age.

    K_bank/c2w_bank: [B, T, 3, 3] / [B, T, 4, 4] for bank frames 0..T-1;
    K_tgt/c2w_tgt: [B, C, ...] for the chunk's cameras. Only frames < eligible_frames
    are candidates. Each step picks argmax(new coverage fraction - age_penalty * age),
    age = chunk_start - t in frames; ties go to the lower frame index.
    Returns frames [B, k] (long) and valid [B, k].
    """
    B, T = K_bank.shape[:2]
    frames = torch.zeros(B, k, dtype=torch.long, device=K_bank.device)
    valid = torch.zeros(B, k, dtype=torch.bool, device=K_bank.device)
    n_cand = min(eligible_frames, T)
    if n_cand <= 0 or k <= 0:
        return frames, valid
    pts = target_points(K_tgt, c2w_tgt, image_hw, grid, depths)                   # [B, P, 3]
    vis = visibility(pts, K_bank[:, :n_cand], c2w_bank[:, :n_cand], image_hw)      # [B, n_cand, P]
    P = vis.shape[-1]
    age = (chunk_start - torch.arange(n_cand, device=vis.device)).to(pts.dtype)  # [n_cand]
    covered = torch.zeros(B, P, dtype=torch.bool, device=vis.device)
    taken = torch.zeros(B, n_cand, dtype=torch.bool, device=vis.device)
    for i in range(min(k, n_cand)):
        gain = (vis & ~covered.unsqueeze(1)).sum(-1).to(pts.dtype) / P - age_penalty * age  # [B, n_cand]
        gain = gain.masked_fill(taken, -math.inf)
        best = gain.argmax(dim=-1)                                                # first max = lower index
        frames[:, i] = best
        valid[:, i] = True
        taken[torch.arange(B), best] = True
        covered |= vis[torch.arange(B), best]
    return frames, valid
