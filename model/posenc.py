"""Positions inside attention: PRoPE camera encoding, 2-D spatial RoPE and temporal RoPE, GTA style.

Each head's channels are split into groups (DESIGN §3.4, the paper's recipe):

  camera    PRoPE ("Cameras as Relative Positional Encoding"): the frame's projective
            camera P̃ = [[K̂, 0], [0, 1]] · T_wc (4x4; K̂ the intrinsics normalised by the
            frame size, T_wc world-to-camera) acts on each 4-channel sub-vector
  spatial   2-D axial RoPE over the token's (row, column) in the latent token grid, normalised to (-1, 1)
  temporal  1-D RoPE over the frame's global index in the clip
  plain     channels left untransformed (what does not divide into the groups)

With D the block-diagonal transform of a token, queries become D_qᵀ q, keys and
values D_k⁻¹ k / D_k⁻¹ v, and the attention output D_q o'. Then q'·k' = qᵀ D_q D_k⁻¹ k
sees only the *relative* camera transform P̃_q P̃_k⁻¹ (invariant to a rigid motion of
the whole trajectory), the relative grid offset and the relative frame index; a
revisited view (P̃_q = P̃_k) matches its old tokens by construction. Values and
outputs take the camera and spatial transforms but not the temporal one (GTA /
the paper). Every transform is per token and fixed, so bank K/V are stored already
transformed: pooled block keys, streaming appends and context parallelism see
ordinary tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CAMERAS = ("prope", "plucker", "none")
POSITIONS = ("rope", "sincos")


#################################################################################
#                                 Channel Groups                                #
#################################################################################

@dataclass(frozen=True)
class ChannelSplit:
    """Sizes of the camera / spatial / temporal channel groups of one head (the rest stays plain)."""

    camera: int
    spatial: int
    temporal: int

    @classmethod
    def for_head(cls, head_dim: int) -> "ChannelSplit":
        """Three about equal groups (the paper: 24/24/24 of 72): camera and spatial in multiples of 4, temporal even."""
        unit = 4 * round(head_dim / 12)
        cam = min(unit, 4 * (head_dim // 4))
        sp = min(unit, 4 * ((head_dim - cam) // 4))
        t = 2 * ((head_dim - cam - sp) // 2)
        return cls(cam, sp, t)


#################################################################################
#                               Per-token Transforms                            #
#################################################################################

def prope_matrices(K: torch.Tensor, c2w: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """P̃ [..., 4, 4] of cameras K [..., 3, 3] (pixels of an ``hw`` frame) and c2w [..., 4, 4] (OpenCV axes).

    K is normalised so that focal lengths are in frame widths/heights and a centred principal
    point sits at 0: the matrices then stay O(1) whatever the resolution.
    """
    h, w = hw
    Kn = torch.zeros(*K.shape[:-2], 4, 4, dtype=K.dtype, device=K.device)
    Kn[..., 0, 0], Kn[..., 0, 1], Kn[..., 0, 2] = K[..., 0, 0] / w, K[..., 0, 1] / w, K[..., 0, 2] / w - 0.5
    Kn[..., 1, 1], Kn[..., 1, 2] = K[..., 1, 1] / h, K[..., 1, 2] / h - 0.5
    Kn[..., 2, 2] = Kn[..., 3, 3] = 1.0
    return Kn @ torch.linalg.inv(c2w)                                              # [..., 4, 4]


def rope_angles(pos: torch.Tensor, n_freq: int, base: float) -> torch.Tensor:
    """Rotation angles [..., n_freq] of integer positions [...] (RoPE frequencies base^(-i/n_freq))."""
    freqs = base ** (-torch.arange(n_freq, dtype=torch.float64, device=pos.device) / max(n_freq, 1))
    return pos.to(torch.float64).unsqueeze(-1) * freqs


def grid_angles(coord: torch.Tensor, size: int, n_freq: int, span: float) -> torch.Tensor:
    """Rotation angles [..., n_freq] of token coordinates [...] on an axis of ``size`` tokens.

    Coordinates are normalised to (-1, 1), so the lowest frequency (π/2) turns the whole axis by less
    than π: two tokens never alias, however few channels a head has (integer positions at 1 rad per
    token, the text-RoPE default, alias 6 tokens apart when a head has one frequency per axis). The
    others grow geometrically by ``span`` over the frequencies, down to fine sub-token detail.
    """
    x = (coord.to(torch.float64) + 0.5) / size * 2 - 1
    freqs = (math.pi / 2) * span ** (torch.arange(n_freq, dtype=torch.float64, device=coord.device) / max(n_freq, 1))
    return x.unsqueeze(-1) * freqs


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x [..., 2n] by angles with cos/sin broadcastable to [..., n]."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)                                   # [..., n] each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class TokenPositions:
    """The transforms of one stream's tokens: T frames of N_f tokens each (block-major, as the model keeps them).

    cam: P̃ per frame [B, T, 4, 4] or None (no PRoPE); grid: (row, col) per token [N_f, 2] or None (no
    spatial RoPE) on a grid of grid_hw tokens; frame_index: [T] or None (no temporal RoPE).
    """

    def __init__(self, split: ChannelSplit, frame_tokens: int, cam: torch.Tensor | None = None,
                 grid: torch.Tensor | None = None, frame_index: torch.Tensor | None = None,
                 grid_hw: tuple[int, int] | None = None, spatial_span: float = 64.0,
                 temporal_base: float = 10000.0):
        self.split, self.Nf = split, frame_tokens
        self.cam = self.cam_inv = None
        if cam is not None and split.camera:
            self.cam, self.cam_inv = cam, torch.linalg.inv(cam.double()).to(cam.dtype)   # [B, T, 4, 4]
        self.sp = self.t = None
        if grid is not None and split.spatial:
            n = split.spatial // 4                                                       # frequencies per axis
            gh, gw = grid_hw or (int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1)
            ang = torch.cat([grid_angles(grid[:, 0], gh, n, spatial_span),
                             grid_angles(grid[:, 1], gw, n, spatial_span)], -1)
            self.sp = (ang.cos(), ang.sin())                                             # [N_f, spatial/2] each
        if frame_index is not None and split.temporal:
            ang = rope_angles(frame_index, split.temporal // 2, temporal_base)           # [T, temporal/2]
            self.t = (ang.cos(), ang.sin())

    @property
    def active(self) -> bool:
        return self.cam is not None or self.sp is not None or self.t is not None

    # ---- the four uses -------------------------------------------------------------

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """D_qᵀ q: camera P̃ᵀ, rotations by -θ. q: [B, H, T*N_f, d]."""
        return self._apply(q, self.cam.transpose(-1, -2) if self.cam is not None else None, -1, True)

    def key(self, k: torch.Tensor) -> torch.Tensor:
        """D_k⁻¹ k: camera P̃⁻¹, rotations by -θ."""
        return self._apply(k, self.cam_inv, -1, True)

    def value(self, v: torch.Tensor) -> torch.Tensor:
        """D_k⁻¹ v on the camera and spatial channels only (temporal channels pass through)."""
        return self._apply(v, self.cam_inv, -1, False)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """D_q o: camera P̃, rotations by +θ, on the camera and spatial channels only."""
        return self._apply(o, self.cam, 1, False)

    def _apply(self, x: torch.Tensor, mat: torch.Tensor | None, sign: int, temporal: bool) -> torch.Tensor:
        if not self.active:
            return x
        s = self.split
        B, H, N, d = x.shape
        T = N // self.Nf
        xf = x.view(B, H, T, self.Nf, d)
        c, sp, t = xf.split([s.camera, s.spatial, s.temporal], dim=-1)[:3]
        rest = xf[..., s.camera + s.spatial + s.temporal:]
        if mat is not None:                                                              # [B, T, 4, 4]
            c = torch.einsum("btij,bhtnkj->bhtnki", mat.to(x.dtype), c.unflatten(-1, (-1, 4))).flatten(-2)
        if self.sp is not None:
            cos, sin = (a.to(x.dtype) for a in self.sp)                                  # [N_f, spatial/2]
            sp = _rotate(sp, cos, sign * sin)
        if self.t is not None and temporal:
            cos, sin = (a.to(x.dtype)[:, None, :] for a in self.t)                       # [T, 1, temporal/2]
            t = _rotate(t, cos, sign * sin)
        return torch.cat([c, sp, t, rest], dim=-1).view(B, H, N, d)
