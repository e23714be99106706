"""DecMem on a pretrained Wan transformer: loading equivalence, bank reads against masked Wan, refusals.

Tiny random Wan models are built from a WanTransformer3DModel config and saved with save_pretrained; the
references are diffusers' own modules, run on the same weights (no DecMem code in the reference path).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from decmem.model.attention import AttentionArgs  # noqa: E402
from decmem.model.wan import DecMemWan, WanArgs, load_wan  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
HW = (8, 8)          # latent frame -> a 4 x 4 token grid, 16 tokens, 4 blocks of 2 x 2
NF = 16
WEIGHTS = "diffusion_pytorch_model.safetensors"


def save_wan(root, seed=0, **save_kw):
    """A random tiny Wan saved like the -Diffusers repos: ROOT/transformer/{config.json, *.safetensors}."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**CONFIG).eval()
    with torch.no_grad():  # scale_shift tables are randn; make every bias non-trivial too
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True, **save_kw)
    return ref


def cameras(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[7.0, 0, 4], [0, 7.0, 4], [0, 0, 1]]).expand(B, T, 3, 3).clone()
    c2w = torch.eye(4).repeat(B, T, 1, 1)
    for b in range(B):
        for t in range(T):
            a = 0.4 * t + b
            c2w[b, t, :3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
            c2w[b, t, :3, 3] = torch.randn(3, generator=g) * 0.3
    return K, c2w


def inputs(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(B, T, 4, *HW, generator=g)
    text = torch.randn(B, 5, CONFIG["text_dim"], generator=g)
    actions = torch.randn(B, T, 3, generator=g)
    return lat, text, actions


def att(**kw):
    base = dict(strategy="dense", block_size=4, top_k=3, window=3, gate_act="tanh")
    base.update(kw)
    return AttentionArgs(**base)


def wan_run(ref, lat, timestep, text, mask=None):
    """diffusers' forward on latents [B, T, C, h, w] -> [B, T, C, h, w]; mask [N, N] bool on every self-attention."""
    procs = None
    if mask is not None:
        procs = [blk.attn1.processor for blk in ref.blocks]
        for blk in ref.blocks:
            blk.attn1.set_processor(_Masked(mask))
    try:
        with torch.no_grad():
            out = ref(lat.transpose(1, 2), timestep, text, return_dict=False)[0]
    finally:
        if procs is not None:
            for blk, p in zip(ref.blocks, procs):
                blk.attn1.set_processor(p)
    return out.transpose(1, 2)


class _Masked:
    """WanAttnProcessor with a fixed boolean attention mask (True = may attend)."""

    def __init__(self, mask):
        self.mask, self.inner = mask, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert attention_mask is None
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask[None, None], rotary_emb)


def design_mask(T_bank, C, W):
    """The design, written out: bank frame i sees frames [i-W+1, i]; the chunk sees the whole bank and itself."""
    T = T_bank + C
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T_bank):
        allowed[i, max(0, i - W + 1):i + 1] = True
    allowed[T_bank:, :] = True
    return allowed.repeat_interleave(NF, 0).repeat_interleave(NF, 1)          # raster tokens, frame-major


# ------------------------------------------------------------------------------------
# Loading equivalence and bank reads
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True])
def test_loaded_chunk_equals_diffusers_wan(tmp_path, sharded):
    ref = save_wan(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    if sharded:
        assert os.path.exists(tmp_path / "transformer" / (WEIGHTS + ".index.json"))
    model = load_wan(str(tmp_path), WanArgs(chunk_frames=2, action_dim=3, attention=att(strategy="decmem"))).eval()
    ours = {k for k in model.state_dict() if k not in model.new_keys()}
    assert ours == set(ref.state_dict()), "the pretrained part must carry exactly Wan's parameter names"
    lat, text, actions = inputs(2, 2)
    K, c2w = cameras(2, 2)
    tau = torch.tensor([0.625, 0.25])
    with torch.no_grad():
        out, _ = model(lat, tau, K, c2w, 0, None, actions=actions, context=text)
        later, _ = model(lat, tau, K, c2w, 37, None, actions=actions, context=text)
    expect = wan_run(ref, lat, tau * 1000, text)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    # the chunk's global frame index enters RoPE, which only sees differences: same output at any t0
    torch.testing.assert_close(later, expect, atol=1e-4, rtol=1e-4)
    # the whole folder layout or the transformer folder itself
    again = load_wan(str(tmp_path / "transformer"), WanArgs(chunk_frames=2, action_dim=3, attention=att()))
    for k in ours:
        torch.testing.assert_close(again.state_dict()[k], model.state_dict()[k], atol=0, rtol=0)


def test_dense_bank_read_equals_masked_wan(tmp_path):
    """Memory stream + query stream (dense) == diffusers' Wan on bank + chunk frames under the design's mask,
    per-token timesteps 0 for bank frames and tau for the chunk, RoPE frame index = global frame index."""
    ref = save_wan(tmp_path)
    W, Tb, C = 3, 5, 2
    model = load_wan(str(tmp_path), WanArgs(chunk_frames=C, action_dim=3, attention=att(window=W))).eval()
    lat, text, actions = inputs(2, Tb + C, seed=3)
    K, c2w = cameras(2, Tb + C, seed=3)
    tau = torch.tensor([0.5, 0.875])
    with torch.no_grad():
        bank = model.encode_memory(lat[:, :Tb], K[:, :Tb], c2w[:, :Tb], actions=actions[:, :Tb], context=text)
        out, _ = model(lat[:, Tb:], tau, K[:, Tb:], c2w[:, Tb:], Tb, bank, actions=actions[:, Tb:], context=text)
    frame_t = torch.cat([torch.zeros(2, Tb), (tau * 1000)[:, None].expand(2, C)], dim=1)    # [B, T]
    timestep = frame_t.repeat_interleave(NF, dim=1)                                         # [B, T*N_f] per token
    expect = wan_run(ref, lat, timestep, text, design_mask(Tb, C, W))[:, Tb:]
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    # and the mask matters: without it the chunk (and the bank) would read differently
    free = wan_run(ref, lat, timestep, text)[:, Tb:]
    assert (free - expect).abs().max() > 1e-3


def test_streamed_bank_equals_one_pass(tmp_path):
    save_wan(tmp_path)
    model = load_wan(str(tmp_path), WanArgs(chunk_frames=2, attention=att(window=3))).eval()
    lat, text, _ = inputs(1, 6, seed=4)
    K, c2w = cameras(1, 6, seed=4)
    with torch.no_grad():
        whole = model.encode_memory(lat, K, c2w, context=text)
        bank = model.encode_memory(lat[:, :4], K[:, :4], c2w[:, :4], context=text)
        bank.append(model.encode_memory(lat[:, 4:], K[:, 4:], c2w[:, 4:], frame_offset=4, past=bank, context=text))
    for i in range(len(whole)):
        torch.testing.assert_close(bank.layer(i).k, whole.layer(i).k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bank.layer(i).v, whole.layer(i).v, atol=1e-5, rtol=1e-5)


def test_decmem_with_every_block_equals_dense_and_cameras_reach_attention(tmp_path):
    save_wan(tmp_path)
    lat, text, actions = inputs(2, 9, seed=5)
    K, c2w = cameras(2, 9, seed=5)
    tau = torch.tensor([0.3, 0.9])
    outs = {}
    for name, a in [("dense", att(window=3)),
                    ("decmem", att(strategy="decmem", window=3, top_k=10_000, merge="joint", retrieval_bias=False,
                                   coarse=False))]:
        model = load_wan(str(tmp_path), WanArgs(chunk_frames=2, action_dim=3, attention=a)).eval()
        with torch.no_grad():   # leave the init: camera channels and action path now change the output
            for k, p in model.named_parameters():
                if k in model.new_keys():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))) * 0.3)
            bank = model.encode_memory(lat[:, :7], K[:, :7], c2w[:, :7], actions=actions[:, :7], context=text)
            outs[name], stats = model(lat[:, 7:], tau, K[:, 7:], c2w[:, 7:], 7, bank, actions=actions[:, 7:],
                                      context=text)
            if name == "dense":
                moved = c2w[:, :7].clone()
                moved[:, :, :3, 3] += 0.5
                bank2 = model.encode_memory(lat[:, :7], K[:, :7], moved, actions=actions[:, :7], context=text)
                other, _ = model(lat[:, 7:], tau, K[:, 7:], c2w[:, 7:], 7, bank2, actions=actions[:, 7:], context=text)
                assert (other - outs[name]).abs().max() > 1e-4, "bank cameras do not reach the chunk"
    torch.testing.assert_close(outs["decmem"], outs["dense"], atol=1e-5, rtol=1e-5)


def test_default_decmem_runs_and_step_zero_is_pretrained(tmp_path):
    """The default recipe (residual merge, coarse branch, retrieval bias, tanh gates, PRoPE channels) over a
    bank: finite, and the zero-initialised new paths (camera queries, gates) get a gradient at step 0."""
    save_wan(tmp_path)
    model = load_wan(str(tmp_path), WanArgs(chunk_frames=2, attention=att(strategy="decmem", window=2, top_k=2)))
    lat, text, _ = inputs(1, 8, seed=6)
    K, c2w = cameras(1, 8, seed=6)
    bank = model.encode_memory(lat[:, :6], K[:, :6], c2w[:, :6])          # default text context
    out, stats = model(lat[:, 6:], torch.tensor([0.5]), K[:, 6:], c2w[:, 6:], 6, bank, return_stats=True)
    assert torch.isfinite(out).all() and out.shape == lat[:, 6:].shape
    out.square().mean().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert grads["blocks.0.attn1.cam_q.weight"].abs().sum() > 0, "zero-initialised camera queries get no gradient"
    assert grads["blocks.0.attn1.gate.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------

def test_refuses_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_wan(str(tmp_path / "nope"))
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_wan(str(tmp_path / "empty"))


def test_refuses_missing_shard(tmp_path):
    save_wan(tmp_path, max_shard_size="20KB")
    folder = tmp_path / "transformer"
    shards = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(folder / shards[-1])
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        load_wan(str(tmp_path))


def test_refuses_missing_key_and_shape_mismatch(tmp_path):
    save_wan(tmp_path)
    path = tmp_path / "transformer" / WEIGHTS
    state = load_file(str(path))
    key = "blocks.1.attn1.norm_k.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(path))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1\.norm_k\.weight.*missing"):
        load_wan(str(tmp_path))
    bad = dict(state)
    bad["blocks.0.attn1.to_q.weight"] = torch.zeros(32, 31)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_q\.weight.*\[32, 31\].*\[32, 32\]"):
        load_wan(str(tmp_path))
    save_file({**state, "blocks.0.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"unexpected.*blocks\.0\.extra\.weight"):
        load_wan(str(tmp_path))


def test_refuses_unsupported_config(tmp_path):
    save_wan(tmp_path)
    cfg_path = tmp_path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["patch_size"] = [2, 2, 2]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="patch_size"):
        load_wan(str(tmp_path))


def test_random_init_from_config_and_text_context_file(tmp_path):
    """The real-shape cost runs build from a config alone; a prompt embedding file replaces the zero context."""
    m = DecMemWan(CONFIG, WanArgs(chunk_frames=2, attention=att()))
    assert m.text_context.shape == (1, 1, CONFIG["text_dim"]) and not m.text_context.any()
    f = tmp_path / "prompt.safetensors"
    save_file({"context": torch.randn(7, CONFIG["text_dim"])}, str(f))
    m2 = DecMemWan(CONFIG, WanArgs(chunk_frames=2, text_context=str(f), attention=att()))
    assert m2.text_context.shape == (1, 7, CONFIG["text_dim"])
    save_file({"context": torch.randn(7, 5)}, str(f))
    with pytest.raises(ValueError, match=r"prompt\.safetensors.*context.*text_dim"):
        DecMemWan(CONFIG, WanArgs(chunk_frames=2, text_context=str(f), attention=att()))


def test_paper_scale_shapes_on_meta():
    """Wan2.1-T2V-1.3B's config: every pretrained tensor has diffusers' name and shape; 480x832 video ->
    60x104 latents -> 1560 tokens per frame in 6 blocks of 260 (the issue's paper config)."""
    cfg = dict(CONFIG, num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024)
    with torch.device("meta"):
        ref = WanTransformer3DModel(**cfg)
        m = DecMemWan(cfg, WanArgs(attention=att(strategy="decmem", block_size=260, top_k=80, window=8)))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items() if k not in m.new_keys()}
    assert ours == want
    assert 1.40e9 < sum(math.prod(s) for s in want.values()) < 1.45e9
    lay = m.layout(60, 104)
    assert (lay.tokens, lay.tokens // 260) == (1560, 6)
