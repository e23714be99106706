"""Which parts of one view another view sees, from depth maps and poses: the ground truth of ``decmem eval``.

Cameras follow the canonical clip (DESIGN §2.1): K in pixels with pixel centres at +0.5, c2w camera-to-world
in OpenCV axes, depth the z-depth along the optical axis. A pixel of view *s* is visible in view *d* when its
back-projected 3-D point lands inside *d*'s image, in front of *d*, and at the depth *d*'s own depth map holds
there (within a relative tolerance): so walls between the two cameras occlude, which poses alone cannot tell.

Retrieval blocks against a view, two ways: :func:`block_overlap` (how much of each bank block the query frame sees
anywhere: the frame rule) and :func:`block_relevance` (where in the bank frame each query block's own surface is:
the block rule, the default of ``decmem eval``).
"""
from __future__ import annotations

import numpy as np

#################################################################################
#                                  Visibility                                   #
#################################################################################


def _pixel_grid(H: int, W: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer (ys, xs) of every ``stride``-th pixel, each [n]."""
    ys, xs = np.meshgrid(np.arange(0, H, stride), np.arange(0, W, stride), indexing="ij")
    return ys.reshape(-1), xs.reshape(-1)


def _landing(depth_s: np.ndarray, K_s: np.ndarray, c2w_s: np.ndarray, depth_d: np.ndarray, K_d: np.ndarray,
             c2w_d: np.ndarray, rel_tol: float, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vis, vi, ui), each [n] over every ``stride``-th source pixel (raster order): whether view *d* sees its
    surface point, and the integer pixel (row, column) of *d* it lands in (clipped into the image where not vis).
    Arguments as in :func:`visible_in`."""
    H, W = depth_s.shape
    ys, xs = _pixel_grid(H, W, stride)
    z = depth_s[ys, xs].astype(np.float64)                                        # [n]
    ok = np.isfinite(z) & (z > 0)
    K_s, K_d = np.asarray(K_s, np.float64), np.asarray(K_d, np.float64)
    c2w_s, c2w_d = np.asarray(c2w_s, np.float64), np.asarray(c2w_d, np.float64)
    cam = np.stack([(xs + 0.5 - K_s[0, 2]) / K_s[0, 0] * z,
                    (ys + 0.5 - K_s[1, 2]) / K_s[1, 1] * z, z], axis=-1)           # [n, 3] source camera frame
    world = cam @ c2w_s[:3, :3].T + c2w_s[:3, 3]                                  # [n, 3]
    w2c_d = np.linalg.inv(c2w_d)
    p = world @ w2c_d[:3, :3].T + w2c_d[:3, 3]                                    # [n, 3] in view d's frame
    zd = p[:, 2]
    front = ok & (zd > 1e-6)
    zs = np.where(front, zd, 1.0)
    u = K_d[0, 0] * p[:, 0] / zs + K_d[0, 2]                                      # [n] pixel coords in d
    v = K_d[1, 1] * p[:, 1] / zs + K_d[1, 2]
    Hd, Wd = depth_d.shape
    inside = front & (u >= 0) & (u < Wd) & (v >= 0) & (v < Hd)
    ui = np.clip(np.floor(u).astype(np.int64), 0, Wd - 1)
    vi = np.clip(np.floor(v).astype(np.int64), 0, Hd - 1)
    dd = depth_d[vi, ui].astype(np.float64)                                       # [n] what d sees there
    # the point is the surface d sees (not hidden behind it) when the depths agree
    agree = np.isfinite(dd) & (np.abs(zd - dd) <= rel_tol * np.maximum(np.abs(zd), np.abs(dd)))
    return inside & agree, vi, ui


def visible_in(depth_s: np.ndarray, K_s: np.ndarray, c2w_s: np.ndarray, depth_d: np.ndarray, K_d: np.ndarray,
               c2w_d: np.ndarray, rel_tol: float = 0.1, stride: int = 1) -> np.ndarray:
    """bool [H_s // stride, W_s // stride] (rounded up): source pixels whose surface point view *d* also sees.

    depth_s [H_s, W_s], K_s [3, 3], c2w_s [4, 4]: the source view; depth_d, K_d, c2w_d: the other view.
    Pixels with a non-finite or non-positive depth are never visible.
    """
    H, W = depth_s.shape
    vis, _, _ = _landing(depth_s, K_s, c2w_s, depth_d, K_d, c2w_d, rel_tol, stride)
    return vis.reshape(len(range(0, H, stride)), len(range(0, W, stride)))


def coverage(clip: dict, targets, sources, min_gap: int = 0, rel_tol: float = 0.1, stride: int = 1) -> np.ndarray:
    """float [len(targets)]: fraction of each target frame's pixels visible in at least one source frame that
    is ``min_gap`` or more frames older (frame indices into ``clip``'s depth / K / c2w)."""
    depth, K, c2w = clip["depth"], clip["K"], clip["c2w"]
    out = np.zeros(len(targets), dtype=np.float64)
    for i, t in enumerate(targets):
        seen = None
        for s in sources:
            if t - s < min_gap:
                continue
            vis = visible_in(depth[t], K[t], c2w[t], depth[s], K[s], c2w[s], rel_tol, stride)
            seen = vis if seen is None else seen | vis
        valid = np.isfinite(depth[t][::stride, ::stride]) & (depth[t][::stride, ::stride] > 0)
        if seen is not None and valid.any():
            out[i] = float((seen & valid).sum() / valid.sum())
    return out


#################################################################################
#                            Bank blocks vs a view                              #
#################################################################################


def pixel_blocks(H: int, W: int, token_h: int, token_w: int, tile: tuple[int, int]) -> np.ndarray:
    """int [H, W]: the retrieval block (``model.blocks.BlockLayout`` order: tiles of ``tile`` = (bh, bw) tokens in
    raster order over the tile grid) each pixel of a frame falls in; ``[::stride, ::stride]`` for a strided grid."""
    bh, bw = tile
    ys, xs = _pixel_grid(H, W, 1)
    ty, tx = ys * token_h // H, xs * token_w // W                                 # the token each pixel belongs to
    b = (ty // bh) * (token_w // bw) + tx // bw
    return b.reshape(H, W)


def block_overlap(clip: dict, bank_frame: int, target_frame: int, blocks: np.ndarray, n_blocks: int,
                  rel_tol: float = 0.1, stride: int = 1) -> np.ndarray:
    """float [n_blocks]: fraction of each block of ``bank_frame`` (pixels by ``blocks``, from :func:`pixel_blocks`)
    that ``target_frame`` sees. Blocks with no valid depth get 0."""
    depth, K, c2w = clip["depth"], clip["K"], clip["c2w"]
    f, t = bank_frame, target_frame
    vis = visible_in(depth[f], K[f], c2w[f], depth[t], K[t], c2w[t], rel_tol, stride).reshape(-1)
    d = depth[f][::stride, ::stride].reshape(-1)
    valid = np.isfinite(d) & (d > 0)
    b = blocks.reshape(-1)
    hits = np.bincount(b[vis & valid], minlength=n_blocks).astype(np.float64)
    total = np.bincount(b[valid], minlength=n_blocks).astype(np.float64)
    return np.where(total > 0, hits / np.maximum(total, 1), 0.0)


def block_relevance(clip: dict, bank_frame: int, target_frame: int, blocks: np.ndarray, n_blocks: int,
                    rel_tol: float = 0.1, stride: int = 1) -> np.ndarray:
    """float [n_blocks, n_blocks]: [q, b] the fraction of query block q of ``target_frame`` (its pixels with valid
    depth) whose surface point ``bank_frame`` shows in its block b.

    ``blocks``: :func:`pixel_blocks` at stride 1 (every pixel; the landing pixels of the bank frame are any of
    them), the query pixels are every ``stride``-th one. Rows of query blocks with no valid depth are 0; a row
    sums to the share of the block the bank frame sees at all.
    """
    depth, K, c2w = clip["depth"], clip["K"], clip["c2w"]
    f, t = bank_frame, target_frame
    vis, vi, ui = _landing(depth[t], K[t], c2w[t], depth[f], K[f], c2w[f], rel_tol, stride)
    d = depth[t][::stride, ::stride].reshape(-1)
    q = blocks[::stride, ::stride].reshape(-1)
    total = np.bincount(q[np.isfinite(d) & (d > 0)], minlength=n_blocks).astype(np.float64)
    # one (query block, bank block) pair per visible pixel, counted in a flat n_blocks x n_blocks histogram
    pairs = q[vis] * n_blocks + blocks[vi[vis], ui[vis]]
    hits = np.bincount(pairs, minlength=n_blocks * n_blocks).reshape(n_blocks, n_blocks).astype(np.float64)
    return hits / np.maximum(total, 1)[:, None]
