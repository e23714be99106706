"""DecMem on a pretrained Wan2.1 transformer (diffusers' WanTransformer3DModel), loaded from a local folder.

Every Wan module is reused as Wan uses it: patch embedding (Conv3d), time and text embedders, per block the
q/k/v/out projections, the q/k RMS norms across heads, the cross-attention, the FFN, the norms and the
scale-shift tables, and the 3-D RoPE (temporal index of a frame = its *global* latent frame index, so a bank
frame keeps its place in time however far back it is). Only the self-attention changes: it becomes DecMem
attention (model/attention.py: memory stream writes the bank, query stream reads it) over Wan's own q/k/v.

Conditioning (DESIGN §3.4), per frame:
  time     the chunk at τ (Wan timestep τ·1000), bank frames at 0, as per-frame adaLN inputs (Wan's per-token
           timestep path, one value per frame).
  text     one fixed context for every clip: ``WanArgs.text_context`` = a safetensors file holding ``context``
           [L, text_dim] (e.g. umT5 embeddings of the dataset's prompt, computed once elsewhere), or by default
           one all-zero token. Why: a camera/action world model has no per-clip prompt; a fixed context turns
           each cross-attention into a learned per-layer bias, keeps a text encoder out of training and
           generation, and downloads nothing. Zeros are what Wan's pipeline pads every prompt embedding with
           (to 512 tokens), so the default is "a prompt with no tokens". ``context=`` overrides it per call.
  camera   ``prope`` (default, as VideoDiT): per head ``camera_dim`` extra channels on q, k and v carry PRoPE,
           GTA style (queries P̃ᵀ, keys/values P̃⁻¹, outputs P̃); their query projection and output projection
           start at zero, so logits and outputs equal the pretrained model's at step 0 while keys/values are
           random and both zero layers get a gradient. ``plucker``: ray tokens through a zero-initialised
           patch embedding, added to the patch tokens. ``none``. The position prior of VideoDiT is not applied
           (it would change the pretrained logits).
  actions  ``Linear(action_dim, D)``, zero-initialised, added to every patch token of its frame (paper Eq. 2).

Tokens are block-major inside each frame (model/blocks.py), as in VideoDiT; Wan's RoPE takes each token's
(row, col), so the order changes nothing but makes retrieval blocks spatial tiles. Nothing is downloaded:
``load_wan`` reads ``DIR/transformer/`` (the -Diffusers layout) or DIR itself and refuses a missing folder,
config, shard or key and a shape mismatch with one line naming the file, key and shapes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanTimeTextImageEmbedding

from decmem.model.attention import AttentionArgs, DecMemAttention
from decmem.model.bank import MemoryBank
from decmem.model.blocks import BlockLayout
from decmem.model.camera import plucker_rays
from decmem.model.dit import _merge_stats
from decmem.model.memory import MemoryContext
from decmem.model.posenc import ChannelSplit, TokenPositions, prope_matrices
from decmem.model.retrieval import select_fov_frames

WAN_CAMERAS = ("prope", "plucker", "none")
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
IGNORED_KEYS = ("norm_added_q",)                   # diffusers' own _keys_to_ignore_on_load_unexpected
NEW_KEYS = ("attn1.gate.", "attn1.cam_", "camera_embedder.", "action_embedder.")   # not in a Wan checkpoint
ROPE_THETA = 10000.0                               # WanRotaryPosEmbed's default


#################################################################################
#                                   Arguments                                   #
#################################################################################

@dataclass
class WanArgs:
    """DecMem-Wan: what is added to the pretrained transformer (its shape comes from config.json)."""

    pretrained: str = ""           # local diffusers folder: DIR/transformer/ or the transformer folder itself
    chunk_frames: int = 4          # C: latent frames denoised together
    action_dim: int = 0            # per-frame action vector size, 0 = no action conditioning
    camera: str = "prope"          # prope: zero-init PRoPE channels in attention; plucker: zero-init ray tokens; none
    camera_dim: int = 0            # prope: extra channels per head (multiple of 4; 0 = ChannelSplit.for_head rule)
    text_context: str = ""         # safetensors file with "context" [L, text_dim]; "" = one zero token
    # tanh gates: the SGM / coarse residues start exactly closed, so step 0 is the pretrained model (sigmoid
    # gates, VideoDiT's default, would add σ(-gate_bias) of the SGM read from the first step)
    attention: AttentionArgs = field(default_factory=lambda: AttentionArgs(gate_act="tanh"))

    def __post_init__(self):
        if self.camera not in WAN_CAMERAS:
            raise ValueError(f"camera: expected one of {WAN_CAMERAS}, got {self.camera!r}")
        if self.chunk_frames < 1 or self.action_dim < 0 or self.camera_dim < 0 or self.camera_dim % 4:
            raise ValueError(f"chunk_frames >= 1, action_dim >= 0, camera_dim a multiple of 4 >= 0: got "
                             f"{self.chunk_frames}, {self.action_dim}, {self.camera_dim}")


def check_config(cfg: dict, where: str = "config") -> dict:
    """The Wan transformer configs this model supports (T2V: no image branch, frame patch 1) -> filled config."""
    c = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
             rope_max_seq_len=1024, pos_embed_seq_len=None)
    c.update({k: v for k, v in cfg.items() if not k.startswith("_")})
    c["patch_size"] = tuple(c["patch_size"])
    c["out_channels"] = c["out_channels"] or c["in_channels"]
    name = cfg.get("_class_name", "WanTransformer3DModel")
    problems = [
        (name == "WanTransformer3DModel", "_class_name", "'WanTransformer3DModel'", name),
        (len(c["patch_size"]) == 3 and c["patch_size"][0] == 1, "patch_size", "(1, p, p): one latent frame per "
         "token frame", list(c["patch_size"])),
        (c["image_dim"] is None and c["added_kv_proj_dim"] is None and c["pos_embed_seq_len"] is None,
         "image_dim/added_kv_proj_dim/pos_embed_seq_len", "null (text-to-video Wan; the image branch is not built)",
         (c["image_dim"], c["added_kv_proj_dim"], c["pos_embed_seq_len"])),
        (c["qk_norm"] == "rms_norm_across_heads", "qk_norm", "'rms_norm_across_heads'", c["qk_norm"]),
        (c["out_channels"] == c["in_channels"], "out_channels", f"= in_channels ({c['in_channels']})",
         c["out_channels"]),
        (c["attention_head_dim"] % 2 == 0, "attention_head_dim", "even", c["attention_head_dim"]),
    ]
    for ok, key, expected, got in problems:
        if not ok:
            raise ValueError(f"{where}: {key}: expected {expected}, got {got!r}")
    return c


#################################################################################
#                         Positions: Wan RoPE + PRoPE                           #
#################################################################################

def wan_rope_angles(head_dim: int, frame_index: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Wan's 3-D RoPE angles [T, N_f, head_dim/2] (float64) of frames [T] (global) x tokens (row, col) [N_f, 2].

    Channel pairs split like WanRotaryPosEmbed: h and w get 2*(d//6) channels each, time the rest, in the
    order (t, h, w); pair i of an axis with n channels turns by pos * theta^(-2i/n).
    """
    hw_dim = 2 * (head_dim // 6)
    parts = []
    for dim, pos in ((head_dim - 2 * hw_dim, frame_index[:, None].expand(-1, grid.shape[0])),
                     (hw_dim, grid[None, :, 0].expand(frame_index.shape[0], -1)),
                     (hw_dim, grid[None, :, 1].expand(frame_index.shape[0], -1))):
        freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=grid.device) / dim))
        parts.append(pos.to(torch.float64).unsqueeze(-1) * freqs)                   # [T, N_f, dim/2]
    return torch.cat(parts, dim=-1)


class WanPositions:
    """One stream's in-attention transforms: Wan RoPE on q/k (head channels), PRoPE on the camera channels."""

    def __init__(self, angles: torch.Tensor, cam: TokenPositions | None):
        ang = angles.flatten(0, 1)                                                  # [T*N_f, d/2], float64
        self.cos, self.sin = ang.cos().float(), ang.sin().float()                   # fp32, as diffusers keeps them
        self.cam = cam

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate channel pairs (2i, 2i+1) of x [B, H, T*N_f, d] exactly as WanAttnProcessor does."""
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)                                # [B, H, N, d/2] each
        cos, sin = self.cos.to(x.device), self.sin.to(x.device)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


#################################################################################
#                                Attention Layer                                #
#################################################################################

class WanDecMemAttention(DecMemAttention):
    """DecMem attention over Wan's self-attention weights (to_q/k/v/out, norm_q/k: WanAttention's names)."""

    def __init__(self, dim: int, n_heads: int, args: AttentionArgs, eps: float, camera_dim: int):
        self.eps, self.camera_dim = eps, camera_dim
        super().__init__(dim, n_heads, args)
        # q carries d + c channels but logits must stay q·k/sqrt(d) (Wan's scale): attend divides by sqrt(d + c)
        self.q_scale = math.sqrt((self.head_dim + camera_dim) / self.head_dim)

    def build_projections(self):
        D, c = self.dim, self.camera_dim * self.n_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(D, eps=self.eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(D, eps=self.eps, elementwise_affine=True)
        self.cam_q = self.cam_k = self.cam_v = self.cam_out = None
        if c:
            self.cam_q, self.cam_k, self.cam_v = nn.Linear(D, c), nn.Linear(D, c), nn.Linear(D, c)
            self.cam_out = nn.Linear(c, D)

    def reset_projections(self):
        """Wan's projections keep what is loaded; the camera channels start as a no-op that can learn."""
        if self.cam_q is None:
            return
        for m in (self.cam_q, self.cam_out):                   # zero logits and zero output at step 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        for m in (self.cam_k, self.cam_v):                     # random, so both zero layers get a gradient
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def _split(self, t, B, N, e):
        return t.view(B, N, self.n_heads, e).transpose(1, 2)                          # [B, H, N, e]

    def _heads(self, x, pos: WanPositions | None = None):
        B, N, _ = x.shape
        d = self.head_dim
        q = self._split(self.norm_q(self.to_q(x)), B, N, d)                           # [B, H, N, d]
        k = self._split(self.norm_k(self.to_k(x)), B, N, d)
        v = self._split(self.to_v(x), B, N, d)
        if pos is not None:
            q, k = pos.rope(q), pos.rope(k)
        if self.cam_q is None:
            return q, k, v
        c = self.camera_dim
        qc, kc, vc = (self._split(m(x), B, N, c) for m in (self.cam_q, self.cam_k, self.cam_v))   # [B, H, N, c]
        if pos is not None and pos.cam is not None:
            qc, kc, vc = pos.cam.query(qc), pos.cam.key(kc), pos.cam.value(vc)
        q = torch.cat([q, qc], dim=-1) * self.q_scale                                  # [B, H, N, d + c]
        return q, torch.cat([k, kc], dim=-1), torch.cat([v, vc], dim=-1)

    def _out(self, o, pos: WanPositions | None = None):
        B, H, N, _ = o.shape
        d = self.head_dim
        out = self.to_out[0](o[..., :d].transpose(1, 2).reshape(B, N, H * d))          # [B, N, D]
        if self.cam_out is not None:
            oc = o[..., d:]
            if pos is not None and pos.cam is not None:
                oc = pos.cam.output(oc)
            out = out + self.cam_out(oc.transpose(1, 2).reshape(B, N, H * self.camera_dim))
        return self.to_out[1](out)


#################################################################################
#                                 Wan Block                                     #
#################################################################################

class WanDecMemBlock(nn.Module):
    """WanTransformerBlock (same parameter names) whose self-attention writes or reads the memory bank."""

    def __init__(self, cfg: dict, args: WanArgs, camera_dim: int):
        super().__init__()
        H, d, eps = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["eps"]
        D = H * d
        self.norm1 = FP32LayerNorm(D, eps, elementwise_affine=False)
        self.attn1 = WanDecMemAttention(D, H, args.attention, eps, camera_dim)
        self.attn2 = WanAttention(dim=D, heads=H, dim_head=d, eps=eps, cross_attention_dim_head=d,
                                  processor=WanAttnProcessor())
        self.norm2 = FP32LayerNorm(D, eps, elementwise_affine=True) if cfg["cross_attn_norm"] else nn.Identity()
        self.ffn = FeedForward(D, inner_dim=cfg["ffn_dim"], activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(D, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, D) / D**0.5)

    def _run(self, x, e, text, Nf, attn_fn):
        """WanTransformerBlock.forward with per-frame modulation. x [B, T*N_f, D], e [B, T, 6, D], text [B, L, D]."""
        B, N, D = x.shape
        T = N // Nf
        mod = (self.scale_shift_table.unsqueeze(0) + e.float()).unsqueeze(2)          # [B, T, 1, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(3)                    # 6 x [B, T, 1, D]

        def frames(t):
            return t.view(B, T, Nf, D)

        h = (frames(self.norm1(x.float())) * (1 + scale) + shift).view(B, N, D).type_as(x)
        a, extra = attn_fn(h)
        x = (frames(x.float()) + frames(a) * gate).view(B, N, D).type_as(x)
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, text, None, None)
        h = (frames(self.norm3(x.float())) * (1 + c_scale) + c_shift).view(B, N, D).type_as(x)
        x = (frames(x.float()) + frames(self.ffn(h).float()) * c_gate).view(B, N, D).type_as(x)
        return x, extra

    def encode_memory(self, x, e, text, Nf, past=None, ctx=None, pos=None):
        return self._run(x, e, text, Nf, lambda h: self.attn1.encode_memory(h, Nf, past=past, ctx=ctx, pos=pos))

    def forward(self, x, e, text, Nf, bank, chunk_start, fov=None, ctx=None, return_stats=False, pos=None,
                alm_keep=None):
        return self._run(x, e, text, Nf,
                         lambda h: self.attn1(h, bank, chunk_start, Nf, fov, ctx, return_stats, pos, alm_keep))


#################################################################################
#                                 DecMem-Wan                                    #
#################################################################################

class DecMemWan(nn.Module):
    """Wan2.1 T2V transformer with DecMem memory; same two streams and signatures as VideoDiT."""

    def __init__(self, config: dict, args: WanArgs):
        super().__init__()
        cfg = check_config(config)
        self.config, self.args = cfg, args
        H, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
        D = H * d
        self.dim, self.latent_channels, self.patch = D, cfg["in_channels"], cfg["patch_size"][1:]
        cam_dim = 0
        if args.camera == "prope":
            cam_dim = args.camera_dim or ChannelSplit.for_head(d).camera
        self.camera_dim = cam_dim
        # the pretrained part, in WanTransformer3DModel's order and names (its rope module has no weights)
        self.patch_embedding = nn.Conv3d(cfg["in_channels"], D, kernel_size=cfg["patch_size"],
                                         stride=cfg["patch_size"])
        self.condition_embedder = WanTimeTextImageEmbedding(dim=D, time_freq_dim=cfg["freq_dim"], time_proj_dim=6 * D,
                                                            text_embed_dim=cfg["text_dim"])
        self.blocks = nn.ModuleList([WanDecMemBlock(cfg, args, cam_dim) for _ in range(cfg["num_layers"])])
        self.norm_out = FP32LayerNorm(D, cfg["eps"], elementwise_affine=False)
        self.proj_out = nn.Linear(D, cfg["out_channels"] * math.prod(cfg["patch_size"]))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, D) / D**0.5)
        # new conditioning, a no-op at step 0 (camera channels: WanDecMemAttention.reset_projections)
        ph, pw = self.patch
        self.camera_embedder = nn.Conv2d(6, D, (ph, pw), stride=(ph, pw)) if args.camera == "plucker" else None
        self.action_embedder = nn.Linear(args.action_dim, D) if args.action_dim else None
        for m in (self.camera_embedder, self.action_embedder):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.register_buffer("text_context", read_text_context(args.text_context, cfg["text_dim"]), persistent=False)

    def new_keys(self) -> set[str]:
        """State-dict keys a Wan checkpoint does not hold (they keep their initial, no-op values on load)."""
        return {k for k in self.state_dict() if any(tag in k for tag in NEW_KEYS)}

    # ----------------------------------------------------------------------------
    # Tokens
    # ----------------------------------------------------------------------------

    def layout(self, h: int, w: int) -> BlockLayout:
        ph, pw = self.patch
        if h % ph or w % pw:
            raise ValueError(f"latent frames of {h}x{w} are not divisible by the patch {ph}x{pw}")
        return BlockLayout(h // ph, w // pw, self.args.attention.block_size)

    def embed(self, latents, K, c2w, actions=None):
        """latents [B, T, C, h, w] -> [B, T*N_f, D] block-major (Wan's patch embedding + new conditioning)."""
        B, T, C, h, w = latents.shape
        if C != self.latent_channels:
            raise ValueError(f"latent frames have {C} channels, the Wan config expects in_channels={self.latent_channels}")
        lay = self.layout(h, w)
        x = self.patch_embedding(latents.transpose(1, 2))                               # [B, D, T, gh, gw]
        x = x.flatten(3).permute(0, 2, 3, 1)                                            # [B, T, N_f, D] raster
        if self.camera_embedder is not None:
            rays = plucker_rays(K.double(), c2w.double(), (h, w)).to(latents.dtype)     # [B, T, 6, h, w]
            r = self.camera_embedder(rays.reshape(B * T, 6, h, w))                      # [B*T, D, gh, gw]
            x = x + r.flatten(2).transpose(1, 2).view(B, T, -1, self.dim)
        if self.action_embedder is not None:
            if actions is None:
                raise ValueError(f"the model was built with action_dim={self.args.action_dim}: pass actions [B, T, A]")
            x = x + self.action_embedder(actions.to(x.dtype)).unsqueeze(2)             # [B, T, 1, D]
        x = x[:, :, lay.raster_to_block.to(x.device)]                                   # block-major
        return x.reshape(B, T * lay.tokens, self.dim)

    def positions(self, K, c2w, frame_index, hw) -> WanPositions:
        """Wan RoPE of these frames (frame_index [T] global) + PRoPE of their cameras (K, c2w [B, T, ...])."""
        lay = self.layout(*hw)
        r = lay.raster_to_block.to(K.device)
        grid = torch.stack([r // lay.w, r % lay.w], dim=-1)                             # [N_f, 2] (row, col)
        angles = wan_rope_angles(self.config["attention_head_dim"], frame_index.to(K.device), grid)
        cam = None
        if self.camera_dim:
            P = prope_matrices(K.double(), c2w.double(), hw).to(K.dtype)                 # [B, T, 4, 4]
            cam = TokenPositions(ChannelSplit(self.camera_dim, 0, 0), lay.tokens, P)
        return WanPositions(angles, cam)

    def unpatchify(self, y, h, w):
        """[B, T, N_f, ph*pw*C] block-major -> [B, T, C, h, w] (Wan's (pt, ph, pw, C) channel order, pt = 1)."""
        B, T = y.shape[:2]
        (ph, pw), C = self.patch, self.latent_channels
        lay = self.layout(h, w)
        y = y[:, :, lay.block_to_raster.to(y.device)].view(B, T, lay.h, lay.w, ph, pw, C)
        return torch.einsum("bthwpqc->btchpwq", y).reshape(B, T, C, h, w)

    def condition(self, tau, context=None):
        """Per-frame time tau [B, T] in [0, 1] -> (temb [B, T, D], modulation [B, T, 6, D], text [B, L, D])."""
        B, T = tau.shape
        text = self.text_context.expand(B, -1, -1) if context is None else context
        # the text sets diffusers' embedding dtype (temb.type_as(text)): the weights' dtype, which under bf16
        # training is not the (fp32, non-persistent) context buffer's
        dtype = self.condition_embedder.time_proj.weight.dtype
        temb, proj, text, _ = self.condition_embedder((tau * 1000.0).flatten(), text.to(dtype), timestep_seq_len=T)
        return temb, proj.unflatten(2, (6, -1)), text

    def _final(self, x, temb, Nf, h, w):
        B, N, D = x.shape
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)   # [B, T, D] each
        y = self.norm_out(x.float()).view(B, N // Nf, Nf, D) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
        return self.unpatchify(self.proj_out(y.type_as(x)), h, w)

    # ----------------------------------------------------------------------------
    # Two streams (VideoDiT's signatures, plus context = text embeddings [B, L, text_dim] or the default)
    # ----------------------------------------------------------------------------

    def encode_memory(self, latents, K, c2w, frame_offset: int = 0, actions=None, past: MemoryBank | None = None,
                      ctx: MemoryContext | None = None, tau: torch.Tensor | None = None,
                      context: torch.Tensor | None = None) -> MemoryBank:
        """Memory stream over frames [frame_offset, frame_offset + T) at Wan timestep 0 (or tau [B, T])."""
        B, T = latents.shape[:2]
        h, w = latents.shape[-2:]
        Nf = self.layout(h, w).tokens
        W = self.args.attention.window
        frames = frame_offset + torch.arange(T)
        x = self.embed(latents, K, c2w, actions)
        pos = self.positions(K, c2w, frames, (h, w))
        _, e, text = self.condition(latents.new_zeros(B, T) if tau is None else tau.to(latents.dtype), context)
        layers = []
        for i, block in enumerate(self.blocks):
            prev = past.last_kv(i, W - 1) if past is not None else None
            x, layer = block.encode_memory(x, e, text, Nf, past=prev, ctx=ctx, pos=pos)
            layer.frame_offset = frame_offset
            layers.append(layer)
        return MemoryBank(layers, K, c2w, frame_offset)

    def forward(self, x_t, tau, K, c2w, chunk_start: int, bank: MemoryBank | None, actions=None,
                ctx: MemoryContext | None = None, return_stats: bool = False, alm_keep: torch.Tensor | None = None,
                context: torch.Tensor | None = None):
        """Query stream: noisy chunk x_t [B, C, C_lat, h, w] at tau ([B] or [B, C]) -> (velocity, stats)."""
        B, C, _, h, w = x_t.shape
        Nf = self.layout(h, w).tokens
        frames = chunk_start + torch.arange(C)
        x = self.embed(x_t, K, c2w, actions)
        pos = self.positions(K, c2w, frames, (h, w))
        tau = tau.view(B, 1).expand(B, C) if tau.dim() == 1 else tau
        temb, e, text = self.condition(tau.to(x_t.dtype), context)
        fov = self.select_fov(bank, K, c2w, chunk_start, (h, w), ctx)
        per_layer = []
        for i, block in enumerate(self.blocks):
            layer = bank.layer(i) if bank is not None and (bank.frames or ctx is not None) else None
            x, stats = block(x, e, text, Nf, layer, chunk_start, fov, ctx, return_stats, pos, alm_keep)
            per_layer.append(stats)
        return self._final(x, temb, Nf, h, w), _merge_stats(per_layer, C)

    def select_fov(self, bank, K, c2w, chunk_start, hw, ctx=None):
        a = self.args.attention
        if a.strategy != "fov_frames" or bank is None:
            return None
        bank_K, bank_c2w = bank.K, bank.c2w
        if ctx is not None:
            bank_K, bank_c2w = ctx.bank_cameras(bank_K, bank_c2w)
        eligible = min(bank_K.shape[1], chunk_start - (a.window - 1))
        return select_fov_frames(bank_K.double(), bank_c2w.double(), K.double(), c2w.double(), hw, a.fov_frames,
                                 eligible, chunk_start, a.fov_age_penalty)


#################################################################################
#                                    Loading                                    #
#################################################################################

def read_text_context(path: str, text_dim: int) -> torch.Tensor:
    """The fixed text context [1, L, text_dim]: ``context`` of a safetensors file, or one zero token."""
    if not path:
        return torch.zeros(1, 1, text_dim)
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: text context file not found (expected safetensors with 'context' [L, {text_dim}])")
    with safe_open(path, framework="pt") as f:
        if "context" not in f.keys():
            raise ValueError(f"{path}: no tensor 'context' (holds {sorted(f.keys())}); expected [L, {text_dim}]")
        t = f.get_tensor("context").float()
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[1] != text_dim:
        raise ValueError(f"{path}: 'context' has shape {list(t.shape)}, expected [L, text_dim={text_dim}]")
    return t.unsqueeze(0)


def wan_folder(path: str) -> str:
    """The transformer folder of a local Wan download: PATH/transformer (the -Diffusers layout) or PATH."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (expected a local Wan -Diffusers download or its transformer/)")
    for folder in (os.path.join(path, "transformer"), path):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(f"{path}: neither {os.path.join(path, 'transformer', 'config.json')} nor "
                            f"{os.path.join(path, 'config.json')} exists (a WanTransformer3DModel config.json)")


def read_wan_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_config(cfg, path)


def _weight_map(folder: str) -> dict[str, str]:
    """Checkpoint key -> shard path, from the index (sharded) or the single file."""
    index, single = os.path.join(folder, INDEX), os.path.join(folder, WEIGHTS)
    if os.path.isfile(index):
        with open(index) as f:
            wmap = json.load(f).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{index}: no 'weight_map' (key -> shard file)")
        for shard in sorted(set(wmap.values())):
            if not os.path.isfile(os.path.join(folder, shard)):
                key = next(k for k, s in wmap.items() if s == shard)
                raise FileNotFoundError(f"{os.path.join(folder, shard)}: shard listed in {INDEX} is missing "
                                        f"(it holds {key} among others)")
        return {k: os.path.join(folder, s) for k, s in wmap.items()}
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} and no {INDEX} (other files: {sorted(os.listdir(folder))})")


def load_wan_weights(model: DecMemWan, folder: str) -> None:
    """Copy a Wan checkpoint into the pretrained part of ``model``; refuse missing, unexpected or misshapen keys."""
    from safetensors import safe_open

    want = {k: v for k, v in model.state_dict().items() if k not in model.new_keys()}
    wmap = {k: f for k, f in _weight_map(folder).items() if not any(tag in k for tag in IGNORED_KEYS)}
    missing = sorted(set(want) - set(wmap))
    if missing:
        raise ValueError(f"{folder}: key {missing[0]} missing from the checkpoint (expected shape "
                         f"{list(want[missing[0]].shape)}; {len(missing)} missing in all)")
    extra = sorted(set(wmap) - set(want))
    if extra:
        raise ValueError(f"{wmap[extra[0]]}: unexpected key {extra[0]} for the model its config.json describes "
                         f"({len(extra)} unexpected in all)")
    by_file: dict[str, list[str]] = {}
    for k, f in wmap.items():
        by_file.setdefault(f, []).append(k)
    with torch.no_grad():
        for path, keys in sorted(by_file.items()):
            with safe_open(path, framework="pt") as f:
                held = set(f.keys())
                for k in keys:
                    if k not in held:
                        raise ValueError(f"{path}: key {k} listed in {INDEX} is not in this shard")
                    shape = list(f.get_slice(k).get_shape())
                    if shape != list(want[k].shape):
                        raise ValueError(f"{path}: key {k} has shape {shape}, the model built from config.json "
                                         f"expects {list(want[k].shape)}")
                    want[k].copy_(f.get_tensor(k))


def load_wan(path: str, args: WanArgs | None = None) -> DecMemWan:
    """DecMem-Wan with the pretrained weights of a local folder (nothing is downloaded); new paths at init."""
    args = args or WanArgs(pretrained=path)
    folder = wan_folder(path)
    model = DecMemWan(read_wan_config(folder), args)
    load_wan_weights(model, folder)
    return model
