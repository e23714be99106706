"""Camera conditioning: poses relative to the clip's reference frame, and per-pixel Plücker rays.

Conventions (DESIGN §2.1): K in pixels of the stored resolution, c2w camera-to-
world in OpenCV axes (x right, y down, z forward).
"""
from __future__ import annotations

import torch


def relative_poses(c2w: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Express poses in the frame of ``ref`` (default: each clip's first frame).

    c2w: [B, T, 4, 4]; ref: [B, 4, 4] -> [B, T, 4, 4] = ref^-1 @ c2w. A rigid
    motion applied to the whole trajectory cancels out.
    """
    if ref is None:
        ref = c2w[:, 0]
    return torch.linalg.inv(ref).unsqueeze(1) @ c2w


def scale_intrinsics(K: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Intrinsics for an image resized from ``from_hw`` to ``to_hw`` (pixel-centre convention)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    S = torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=K.dtype, device=K.device)
    return S @ K


def plucker_rays(K: torch.Tensor, c2w: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Per-pixel Plücker coordinates (moment o x d, unit direction d) at pixel centres.

    K: [..., 3, 3] in pixels of an ``hw`` image; c2w: [..., 4, 4] -> [..., 6, h, w].
    """
    h, w = hw
    dev, dt = K.device, K.dtype
    v, u = torch.meshgrid(torch.arange(h, device=dev, dtype=dt) + 0.5,
                          torch.arange(w, device=dev, dtype=dt) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)                         # [h, w, 3]
    cam = torch.einsum("...ij,hwj->...hwi", torch.linalg.inv(K), pix)              # [..., h, w, 3]
    d = torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], cam)
    d = d / d.norm(dim=-1, keepdim=True)                                           # unit world directions
    o = c2w[..., None, None, :3, 3].expand_as(d)                                   # camera centre
    m = torch.linalg.cross(o, d, dim=-1)                                           # moment
    return torch.cat([m, d], dim=-1).movedim(-1, -3)                               # [..., 6, h, w]


def clip_cameras(K: torch.Tensor, c2w: torch.Tensor, image_hw: tuple[int, int], latent_hw: tuple[int, int]):
    """A clip's cameras as the model sees them: K in latent pixels, poses relative and scale-normalised.

    K [B, T, 3, 3] (image pixels), c2w [B, T, 4, 4] -> (K_latent, c2w_rel, scale [B]). The
    scale is the largest camera distance from the first frame over the clip (1 if the
    camera never moves), so translations are O(1) whatever units the source uses.
    """
    rel = relative_poses(c2w.double())
    scale = rel[..., :3, 3].norm(dim=-1).amax(dim=1)                                # [B]
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
    rel[..., :3, 3] = rel[..., :3, 3] / scale[:, None, None]
    return scale_intrinsics(K.double(), image_hw, latent_hw).to(K.dtype), rel.to(c2w.dtype), scale
