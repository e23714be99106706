"""Video DiT with DecMem memory: patch embedding, camera/time/action conditioning, two streams.

Memory stream: clean frames (diffusion time 0) -> every layer's K/V and pooled
block keys -> MemoryBank. Query stream: a noisy chunk of C frames reads the
bank in every layer and predicts the rectified-flow velocity.
Tokens are block-major inside each frame (model/blocks.py) from embedding to
unpatchify, so attention never permutes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn as nn

from decmem.model.attention import AttentionArgs, DecMemAttention
from decmem.model.backbone import BACKBONES, WanBackboneArgs, derived_shape, resolve_wan_config
from decmem.model.bank import MemoryBank
from decmem.model.blocks import BlockLayout
from decmem.model.camera import plucker_rays
from decmem.model.memory import MemoryContext
from decmem.model.posenc import CAMERAS, POSITIONS, ChannelSplit, TokenPositions, prope_matrices
from decmem.model.retrieval import select_fov_frames

SIZES = {
    "debug": dict(dim=64, depth=2, n_heads=4),     # a step in well under a second on CPU
    "demo": dict(dim=128, depth=4, n_heads=4),     # trains usefully in minutes on 2 CPU cores
    "S": dict(dim=384, depth=12, n_heads=6),       # DiT-S width and depth
    "B": dict(dim=1024, depth=16, n_heads=16),     # about WorldMem's (Oasis-style) DiT backbone
}


#################################################################################
#                                   Arguments                                   #
#################################################################################

@dataclass
class ModelArgs:
    """The network: a named size (dim/depth/n_heads 0 = take the size's) and its conditioning."""

    backbone: str = "dit"          # dit: this project's DiT; wan: a pretrained Wan2.1 transformer (model.wan.*)
    size: str = "debug"
    dim: int = 0
    depth: int = 0
    n_heads: int = 0
    mlp_ratio: float = 4.0
    patch_size: int = 2
    latent_channels: int = 3       # channels of a latent frame (3 for the pixels codec)
    chunk_frames: int = 4          # C: latent frames denoised together
    action_dim: int = 0            # per-frame action vector size, 0 = no action conditioning
    camera: str = "prope"          # prope: relative camera encoding inside attention; plucker: added ray tokens; none
    position: str = "rope"         # rope: 2-D spatial + temporal RoPE inside attention; sincos: added embeddings
    frame_pos: bool = True         # sincos only: sinusoidal embedding of the frame's index in the clip
    attention: AttentionArgs = field(default_factory=AttentionArgs)
    # backbone=wan: dim, depth, n_heads, patch_size and latent_channels are set from its config (size is unused)
    wan: WanBackboneArgs = field(default_factory=WanBackboneArgs)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.backbone == "wan":
            try:
                self.wan.transformer = resolve_wan_config(self.wan)
            except ValueError as e:                 # located at model.wan (ConfigError adds file and line)
                raise ValueError(f"wan: {e}") from None
            for key, val in derived_shape(self.wan.transformer).items():
                setattr(self, key, val)
        if self.size not in SIZES:
            raise ValueError(f"size: expected one of {list(SIZES)}, got {self.size!r}")
        for key, val in SIZES[self.size].items():
            if getattr(self, key) == 0:
                setattr(self, key, val)
        for key in ("dim", "depth", "n_heads", "patch_size", "latent_channels", "chunk_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim: expected a multiple of n_heads={self.n_heads}, got {self.dim}")
        if self.camera not in CAMERAS:
            raise ValueError(f"camera: expected one of {CAMERAS}, got {self.camera!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position: expected one of {POSITIONS}, got {self.position!r}")
        if self.action_dim < 0:
            raise ValueError(f"action_dim: expected >= 0, got {self.action_dim}")


#################################################################################
#                         Embedding Layers for Conditions                       #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[...] -> [..., dim] sin/cos features (DiT / ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs                                         # [..., half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


@lru_cache(maxsize=32)
def _pos_2d(gh: int, gw: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin/cos position embedding of a gh x gw token grid, raster order: [gh*gw, dim]."""
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([sinusoidal(yy.reshape(-1), dim // 2), sinusoidal(xx.reshape(-1), dim - dim // 2)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Diffusion time τ in [0, 1] -> a vector, via sinusoidal features and an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, tau):                                                         # [B, T]
        return self.mlp(sinusoidal(tau * 1000.0, self.freq_dim).to(self.mlp[0].weight.dtype))  # [B, T, D]


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """adaLN-zero transformer block whose attention writes (memory stream) or reads (query stream) the bank."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.dim
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = DecMemAttention(D, args.n_heads, args.attention)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * args.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def _run(self, x, c, Nf, attn_fn):
        B, N, D = x.shape
        T = N // Nf
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=-1)  # 6 x [B, T, 1, D]
        h = modulate(self.norm1(x).view(B, T, Nf, D), sa, ca).view(B, N, D)
        a, extra = attn_fn(h)
        x = x + (ga * a.view(B, T, Nf, D)).view(B, N, D)
        h = modulate(self.norm2(x).view(B, T, Nf, D), sm, cm).view(B, N, D)
        x = x + (gm * self.mlp(h).view(B, T, Nf, D)).view(B, N, D)
        return x, extra

    def encode_memory(self, x, c, Nf, past=None, ctx=None, pos=None):
        return self._run(x, c, Nf, lambda h: self.attn.encode_memory(h, Nf, past=past, ctx=ctx, pos=pos))

    def forward(self, x, c, Nf, bank, chunk_start, fov=None, ctx=None, return_stats=False, pos=None, alm_keep=None):
        return self._run(x, c, Nf, lambda h: self.attn(h, bank, chunk_start, Nf, fov, ctx, return_stats, pos, alm_keep))


class FinalLayer(nn.Module):
    """adaLN-modulated projection of tokens back to latent patches."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, p = args.dim, args.patch_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, p * p * args.latent_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c, Nf):
        B, N, D = x.shape
        shift, scale = self.adaLN_modulation(c).unsqueeze(2).chunk(2, dim=-1)        # 2 x [B, T, 1, D]
        x = modulate(self.norm_final(x).view(B, N // Nf, Nf, D), shift, scale)
        return self.linear(x)                                                         # [B, T, N_f, p*p*C]


class VideoDiT(nn.Module):
    """Camera-conditioned video diffusion transformer with a DecMem memory bank."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        D, p = args.dim, args.patch_size
        self.x_embedder = nn.Conv2d(args.latent_channels, D, p, stride=p)
        self.camera_embedder = nn.Conv2d(6, D, p, stride=p) if args.camera == "plucker" else None
        self.split = ChannelSplit.for_head(D // args.n_heads)
        self.action_embedder = nn.Linear(args.action_dim, D) if args.action_dim else None
        self.t_embedder = TimestepEmbedder(D)
        self.blocks = nn.ModuleList([DiTBlock(args) for _ in range(args.depth)])
        self.final_layer = FinalLayer(args)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data                   # patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # new conditioning starts as a no-op: camera and action paths are zero
        for m in (self.camera_embedder, self.action_embedder):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:                         # adaLN-zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            block.attn.reset_parameters()                 # qkv/proj xavier, SGM/ALM gates biased to ALM
            block.attn.init_position_prior(self.split, self.args.camera == "prope", self.args.position == "rope")
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ----------------------------------------------------------------------------
    # Tokens
    # ----------------------------------------------------------------------------

    def layout(self, h: int, w: int) -> BlockLayout:
        p = self.args.patch_size
        if h % p or w % p:
            raise ValueError(f"latent frames of {h}x{w} are not divisible by patch_size={p}")
        return BlockLayout(h // p, w // p, self.args.attention.block_size)

    def embed(self, latents, K, c2w, frame_index):
        """latents [B, T, C, h, w], K [B, T, 3, 3] (latent pixels), c2w [B, T, 4, 4], frame_index [T] -> [B, T*N_f, D]."""
        B, T, C, h, w = latents.shape
        if C != self.args.latent_channels:
            raise ValueError(f"latent frames have {C} channels, the model expects latent_channels={self.args.latent_channels}")
        lay = self.layout(h, w)
        D, Nf = self.args.dim, lay.tokens
        x = self.x_embedder(latents.reshape(B * T, C, h, w))                           # [B*T, D, gh, gw]
        if self.camera_embedder is not None:
            rays = plucker_rays(K.double(), c2w.double(), (h, w)).to(latents.dtype)     # [B, T, 6, h, w]
            x = x + self.camera_embedder(rays.reshape(B * T, 6, h, w))
        x = x.flatten(2).transpose(1, 2)                                                # [B*T, N_f, D] raster
        sincos = self.args.position == "sincos"
        if sincos:
            x = x + _pos_2d(lay.h, lay.w, D).to(x.device, x.dtype)
        x = x[:, lay.raster_to_block.to(x.device)].view(B, T, Nf, D)                    # block-major
        if sincos and self.args.frame_pos:
            x = x + sinusoidal(frame_index.to(x.device), D).to(x.dtype)[None, :, None, :]
        return x.reshape(B, T * Nf, D)

    def positions(self, K, c2w, frame_index, hw) -> TokenPositions | None:
        """The transforms attention applies to these frames' tokens (None when nothing enters inside attention).

        K [B, T, 3, 3] (latent pixels), c2w [B, T, 4, 4], frame_index [T] global, hw the latent frame size.
        """
        a = self.args
        if a.camera != "prope" and a.position != "rope":
            return None
        lay = self.layout(*hw)
        cam = prope_matrices(K.double(), c2w.double(), hw).to(K.dtype) if a.camera == "prope" else None
        grid = frame_idx = None
        if a.position == "rope":
            r = lay.raster_to_block.to(K.device)                                        # block-major -> raster
            grid = torch.stack([r // lay.w, r % lay.w], dim=-1)                         # [N_f, 2] (row, col)
            frame_idx = frame_index.to(K.device)
        return TokenPositions(self.split, lay.tokens, cam, grid, frame_idx, (lay.h, lay.w))

    def unpatchify(self, y, h, w):
        """[B, T, N_f, p*p*C] block-major -> [B, T, C, h, w]."""
        B, T = y.shape[:2]
        p, C = self.args.patch_size, self.args.latent_channels
        lay = self.layout(h, w)
        y = y[:, :, lay.block_to_raster.to(y.device)]                                  # raster order
        y = y.view(B, T, lay.h, lay.w, p, p, C)
        return torch.einsum("bthwpqc->btchpwq", y).reshape(B, T, C, h, w)

    def condition(self, tau, actions=None):
        """Per-frame conditioning vector: diffusion time (+ actions) -> [B, T, D]."""
        c = self.t_embedder(tau)
        if self.action_embedder is not None:
            if actions is None:
                raise ValueError(f"the model was built with action_dim={self.args.action_dim}: pass actions [B, T, A]")
            c = c + self.action_embedder(actions.to(c.dtype))
        return c

    # ----------------------------------------------------------------------------
    # Two streams
    # ----------------------------------------------------------------------------

    def encode_memory(self, latents, K, c2w, frame_offset: int = 0, actions=None, past: MemoryBank | None = None,
                      ctx: MemoryContext | None = None, tau: torch.Tensor | None = None) -> MemoryBank:
        """Memory stream over frames [frame_offset, frame_offset + T) -> their MemoryBank.

        past: the bank holding the frames just before (streaming generation): its
        last W-1 frames' K/V of each layer serve as the local window's keys.
        tau: [B, T] noise level of each frame (training with DiffusionArgs.memory_noise); None: clean (τ = 0).
        """
        B, T = latents.shape[:2]
        h, w = latents.shape[-2:]
        Nf = self.layout(h, w).tokens
        W = self.args.attention.window
        frames = frame_offset + torch.arange(T)
        x = self.embed(latents, K, c2w, frames)
        pos = self.positions(K, c2w, frames, (h, w))
        c = self.condition(latents.new_zeros(B, T) if tau is None else tau.to(latents.dtype), actions)   # [B, T, D]
        layers = []
        for i, block in enumerate(self.blocks):
            prev = past.last_kv(i, W - 1) if past is not None else None
            x, layer = block.encode_memory(x, c, Nf, past=prev, ctx=ctx, pos=pos)
            layer.frame_offset = frame_offset
            layers.append(layer)
        return MemoryBank(layers, K, c2w, frame_offset)

    def forward(self, x_t, tau, K, c2w, chunk_start: int, bank: MemoryBank | None, actions=None,
                ctx: MemoryContext | None = None,
                return_stats: bool = False, alm_keep: torch.Tensor | None = None):
        """Query stream: noisy chunk x_t [B, C, C_lat, h, w] at time tau ([B] or [B, C]) -> velocity, stats.

        alm_keep [B] bool (training only): False drops that sample's ALM window in every layer.
        """
        B, C, _, h, w = x_t.shape
        Nf = self.layout(h, w).tokens
        frames = chunk_start + torch.arange(C)
        x = self.embed(x_t, K, c2w, frames)
        pos = self.positions(K, c2w, frames, (h, w))
        tau = tau.view(B, 1).expand(B, C) if tau.dim() == 1 else tau
        c = self.condition(tau, actions)
        fov = self.select_fov(bank, K, c2w, chunk_start, (h, w), ctx)
        per_layer = []
        for i, block in enumerate(self.blocks):
            layer = bank.layer(i) if bank is not None and (bank.frames or ctx is not None) else None
            x, stats = block(x, c, Nf, layer, chunk_start, fov, ctx, return_stats, pos, alm_keep)
            per_layer.append(stats)
        out = self.unpatchify(self.final_layer(x, c, Nf), h, w)
        return out, _merge_stats(per_layer, C)

    def select_fov(self, bank, K, c2w, chunk_start, hw, ctx=None):
        a = self.args.attention
        if a.strategy != "fov_frames" or bank is None:
            return None
        bank_K, bank_c2w = bank.K, bank.c2w
        if ctx is not None:                      # cp: every rank needs every bank frame's camera
            bank_K, bank_c2w = ctx.bank_cameras(bank_K, bank_c2w)
        eligible = min(bank_K.shape[1], chunk_start - (a.window - 1))
        return select_fov_frames(bank_K.double(), bank_c2w.double(), K.double(), c2w.double(), hw, a.fov_frames,
                                 eligible, chunk_start, a.fov_age_penalty)


def _merge_stats(per_layer: list[dict], frames: int) -> dict:
    """Layer-averaged scalars, dispersion per chunk frame [B, C] (mean over layers, heads and the frame's
    tokens), plus the per-layer selections (for retrieval heatmaps)."""
    out = {"layers": per_layer, "attended_tokens": per_layer[0]["attended_tokens"] if per_layer else 0}
    for key in ("gate_sgm", "gate_alm", "gate_coarse", "entropy", "entropy_sgm"):
        vals = [s[key] for s in per_layer if key in s]
        if vals:
            out[key] = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vals]).mean()
    for key in ("dispersion_low", "dispersion_high"):
        vals = [s[key] for s in per_layer if key in s]                       # each [B, H, N]
        if vals:
            per_token = torch.stack(vals).float().mean(dim=(0, 2))           # [B, N]
            out[key] = per_token.view(per_token.shape[0], frames, -1).mean(-1)   # [B, C]
    return out
