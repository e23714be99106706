"""Video DiT, memory bank, camera conditioning, codecs, weights and rollout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decmem.model.attention import AttentionArgs
from decmem.model.bank import MemoryBank
from decmem.model.camera import plucker_rays, relative_poses
from decmem.model.diffusion import DiffusionArgs, euler_sample, rectified_flow_loss, timesteps
from decmem.model.dit import ModelArgs, VideoDiT
from decmem.model.rollout import rollout, self_history

F64 = torch.float64


def tiny(strategy="decmem", dtype=F64, seed=0, **kw):
    torch.manual_seed(seed)
    att = AttentionArgs(strategy=strategy, block_size=4, top_k=3, window=3)
    m = VideoDiT(ModelArgs(size="debug", chunk_frames=2, attention=att, **kw)).to(dtype).eval()
    with torch.no_grad():  # leave the zero-init regime so every path carries signal
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def cameras(B, T, hw=(8, 8), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[hw[1] * 0.9, 0, hw[1] / 2], [0, hw[1] * 0.9, hw[0] / 2], [0, 0, 1.0]], dtype=dtype)
    K = K.expand(B, T, 3, 3).clone()
    c2w = torch.eye(4, dtype=dtype).repeat(B, T, 1, 1)
    for b in range(B):
        for t in range(T):
            a = 0.3 * t + b
            c2w[b, t, :3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=dtype)
            c2w[b, t, :3, 3] = torch.randn(3, generator=g, dtype=dtype) * 0.2
    return K, c2w


# ------------------------------------------------------------------------------------
# Window dropout (training)
# ------------------------------------------------------------------------------------

def test_window_dropout_is_drawn_per_sample_and_only_drops_the_window():
    m = tiny()
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(2, 12, 3, 8, 8, generator=g, dtype=F64)
    K, c2w = cameras(2, 12)
    starts = [4, 6, 8, 10]

    def loss(p, idx=(0, 1)):
        gens = [torch.Generator().manual_seed(100 + i) for i in idx]
        i = list(idx)
        return rectified_flow_loss(m, lat[i], K[i], c2w[i], starts, DiffusionArgs(window_dropout=p), generator=gens)[0]

    # each sample draws its own keep/drop from its own generator: its loss does not depend on the batch
    torch.testing.assert_close(loss(0.5), (loss(0.5, (0,)) + loss(0.5, (1,))) / 2, atol=1e-6, rtol=0)   # fp32 loss
    # p -> 0 and p -> 1 consume the same draws (noise and τ are identical), so any difference is the dropped window
    keep_all, drop_all = loss(1e-9), loss(1 - 1e-9)
    assert abs(keep_all.item() - drop_all.item()) > 2e-5                # ~100x the fp32 rounding of the loss
    assert loss(0.5).item() not in (keep_all.item(), drop_all.item())   # some chunks kept, some dropped
    with pytest.raises(ValueError, match="window_dropout"):
        DiffusionArgs(window_dropout=1.0)


def test_self_history_is_the_models_own_rollout_read_by_the_bank_only():
    """DiffusionArgs.self_history: frames [start, end) come from the model's own 2-step rollout (Euler by hand here),
    the memory stream encodes them, and the targets stay the clip's frames."""
    m = tiny()
    lat = torch.randn(1, 10, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    K, c2w = cameras(1, 10)
    args = DiffusionArgs(self_history_steps=2)

    def gens():
        return [torch.Generator().manual_seed(9)]

    hist = self_history(m, args, lat, K, c2w, 4, 8, generator=gens())
    g = gens()[0]
    with torch.no_grad():
        bank = m.encode_memory(lat[:, :4], K[:, :4], c2w[:, :4])
        frames = [lat[:, :4]]
        for t in (4, 6):
            x = torch.randn((1, 2, 3, 8, 8), generator=g, dtype=F64)
            for a, b in ((1.0, 0.5), (0.5, 0.0)):                       # 2 Euler steps from τ = 1
                v, _ = m(x, torch.full((1,), a, dtype=F64), K[:, t:t + 2], c2w[:, t:t + 2], t, bank)
                x = x + (b - a) * v
            bank.append(m.encode_memory(x, K[:, t:t + 2], c2w[:, t:t + 2], t, past=bank))
            frames.append(x)
    torch.testing.assert_close(hist, torch.cat(frames, 1), atol=1e-12, rtol=0)
    assert (hist[:, 4:] - lat[:, 4:8]).abs().max() > 0.1                  # generated, not copied

    # the loss: bank encoded from the history, every chunk's target from the clip, draws as without history
    starts = [4, 6, 8]
    loss = rectified_flow_loss(m, lat, K, c2w, starts, args, generator=gens(), history=hist)[0]
    g = gens()[0]
    ref = []
    with torch.no_grad():
        bank = m.encode_memory(hist[:, :8], K[:, :8], c2w[:, :8])
        draws = [(torch.randn((1, 2, 3, 8, 8), generator=g, dtype=F64),
                  torch.sigmoid(torch.randn((1,), generator=g)).to(F64)) for _ in starts]
        for t0, (eps, tau) in zip(starts, draws):
            x0 = lat[:, t0:t0 + 2]
            pred, _ = m((1 - tau) * x0 + tau * eps, tau, K[:, t0:t0 + 2], c2w[:, t0:t0 + 2], t0, bank)
            ref.append((pred - (eps - x0)).pow(2).mean())
    torch.testing.assert_close(loss.double(), torch.stack(ref).mean(), atol=1e-7, rtol=0)     # fp32 loss
    plain = rectified_flow_loss(m, lat, K, c2w, starts, args, generator=gens())[0]
    assert abs(plain.item() - loss.item()) > 1e-4                           # the history is what changed it
    for bad in (dict(self_history=1.5), dict(self_history_steps=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiffusionArgs(**bad)


def test_memory_noise_encodes_noised_frames_at_their_noise_level():
    m = tiny()
    g = torch.Generator().manual_seed(6)
    lat = torch.randn(2, 10, 3, 8, 8, generator=g, dtype=F64)
    K, c2w = cameras(2, 10)
    clean = m.encode_memory(lat, K, c2w)
    zero = m.encode_memory(lat, K, c2w, tau=torch.zeros(2, 10, dtype=F64))
    torch.testing.assert_close(zero.layer(0).k, clean.layer(0).k, atol=0, rtol=0)      # τ = 0 is the clean stream
    noisy = m.encode_memory(lat, K, c2w, tau=torch.full((2, 10), 0.3, dtype=F64))
    assert (noisy.layer(0).k - clean.layer(0).k).abs().max() > 1e-3                    # the level is seen

    def loss(p, idx=(0, 1)):
        gens = [torch.Generator().manual_seed(200 + i) for i in idx]
        i = list(idx)
        return rectified_flow_loss(m, lat[i], K[i], c2w[i], [6, 8], DiffusionArgs(memory_noise=p), generator=gens)[0]

    # per-sample draws: a sample's loss does not depend on its batch; noise levels -> 0 and 0.9 use the same draws
    torch.testing.assert_close(loss(0.5), (loss(0.5, (0,)) + loss(0.5, (1,))) / 2, atol=1e-6, rtol=0)
    assert abs(loss(1e-9).item() - loss(0.9).item()) > 2e-5
    with pytest.raises(ValueError, match="memory_noise"):
        DiffusionArgs(memory_noise=1.0)


# ------------------------------------------------------------------------------------
# Action dropout (training) and action classifier-free guidance (sampling)
# ------------------------------------------------------------------------------------

def test_action_dropout_nulls_target_chunk_actions_per_sample_and_keeps_the_banks():
    m = tiny(action_dim=3)
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(2, 12, 3, 8, 8, generator=g, dtype=F64)
    acts = torch.randn(2, 12, 3, generator=g, dtype=F64)
    K, c2w = cameras(2, 12)
    starts, seen = [4, 6, 8, 10], []

    def record(_mod, inputs):
        seen.append(inputs[0].detach().clone())

    def loss(p, idx=(0, 1), null_targets=False):
        gens = [torch.Generator().manual_seed(300 + i) for i in idx]
        i = list(idx)
        hook = (lambda _m, inp: (torch.zeros_like(inp[0]),) if inp[0].shape[1] == 2 else None) if null_targets else record
        h = m.action_embedder.register_forward_pre_hook(hook)
        try:
            return rectified_flow_loss(m, lat[i], K[i], c2w[i], starts, DiffusionArgs(action_dropout=p), acts[i],
                                       generator=gens)[0]
        finally:
            h.remove()

    # p = 1: every target chunk's actions are the null action; the bank's frames keep theirs. Reference: the same
    # draws (p -> 0 consumes them too) with the chunk-stream inputs of the action embedder zeroed by a hook
    seen.clear()
    torch.testing.assert_close(loss(1.0), loss(1e-9, null_targets=True), atol=0, rtol=0)
    bank_in, chunk_in = seen[0], seen[1:]
    assert bank_in.shape[1] == 10 and torch.equal(bank_in, acts[:, :10])
    assert len(chunk_in) == 4 and all(not c.any() for c in chunk_in)
    assert abs(loss(1.0).item() - loss(1e-9).item()) > 2e-5                  # the actions mattered
    seen.clear()
    loss(1e-9)                                                               # kept: each chunk gets its own actions
    assert all(torch.equal(c, acts[:, t0:t0 + 2]) for c, t0 in zip(seen[1:], starts))
    # p = 0.5: drawn per (chunk, sample) from the sample's generator, so a sample's loss does not depend on its batch
    seen.clear()
    torch.testing.assert_close(loss(0.5), (loss(0.5, (0,)) + loss(0.5, (1,))) / 2, atol=1e-6, rtol=0)
    dropped = [(not c[b].any()) for c in seen[1:5] for b in range(2)]
    assert 0 < sum(dropped) < len(dropped)
    with pytest.raises(ValueError, match="action_dropout"):
        DiffusionArgs(action_dropout=1.5)
    with pytest.raises(ValueError, match="action_cfg"):
        DiffusionArgs(action_cfg=-1.0)


@pytest.mark.parametrize("scale", [1.0, 0.0, 7.5])
def test_action_cfg_extrapolates_from_the_null_action_prediction(scale):
    m = tiny(action_dim=3)
    g = torch.Generator().manual_seed(8)
    lat = torch.randn(1, 8, 3, 8, 8, generator=g, dtype=F64)
    acts = torch.randn(1, 8, 3, generator=g, dtype=F64)
    K, c2w = cameras(1, 8)
    bank = m.encode_memory(lat[:, :6], K[:, :6], c2w[:, :6], 0, acts[:, :6])
    args = DiffusionArgs(sample_steps=3, action_cfg=scale)
    calls = []
    h = m.register_forward_pre_hook(lambda _m, inp: calls.append(1))
    got, _ = euler_sample(m, (1, 2, 3, 8, 8), K[:, 6:], c2w[:, 6:], 6, bank, args, acts[:, 6:],
                          torch.Generator().manual_seed(1), dtype=F64)
    h.remove()
    assert len(calls) == (3 if scale == 1.0 else 6)                      # guidance costs a second forward per step
    # reference: the same Euler steps written out, v = v_null + s (v_act - v_null)
    x = torch.randn((1, 2, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=F64)
    ts = timesteps(args)
    with torch.no_grad():
        for i in range(3):
            tau = ts[i].expand(1).to(F64)
            v_act = m(x, tau, K[:, 6:], c2w[:, 6:], 6, bank, acts[:, 6:])[0]
            v_null = m(x, tau, K[:, 6:], c2w[:, 6:], 6, bank, torch.zeros_like(acts[:, 6:]))[0]
            x = x + (ts[i + 1] - ts[i]).to(F64) * (v_null + scale * (v_act - v_null))
    torch.testing.assert_close(got, x, atol=1e-12, rtol=0)
    assert (v_act - v_null).abs().max() > 1e-3                           # the actions change the prediction


# ------------------------------------------------------------------------------------
# Memory bank: parallel pass == streaming encode
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("camera,position", [("plucker", "sincos"), ("prope", "rope")])
def test_parallel_bank_equals_streaming_bank(camera, position):
    m = tiny(camera=camera, position=position)
    B, T = 2, 11
    lat = torch.randn(B, T, 3, 8, 8, dtype=F64)
    K, c2w = cameras(B, T)
    full = m.encode_memory(lat, K, c2w)
    bank = m.encode_memory(lat[:, :3], K[:, :3], c2w[:, :3])
    t = 3
    for n in (2, 1, 3, 2):  # chunks of uneven size, as the last chunk of a rollout
        bank.append(m.encode_memory(lat[:, t:t + n], K[:, t:t + n], c2w[:, t:t + n], t, past=bank))
        t += n
    assert bank.frames == full.frames == T
    for i in range(len(full)):
        a, b = full.layer(i), bank.layer(i)
        for x, y in ((a.k, b.k), (a.v, b.v), (a.k_pool, b.k_pool), (a.v_pool, b.v_pool)):
            torch.testing.assert_close(y, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bank.c2w, full.c2w)


def test_bank_save_load_resumes_rollout_identically(tmp_path):
    m = tiny(dtype=torch.float32)
    B, N = 1, 4
    lat = torch.randn(B, N, 3, 8, 8)
    K, c2w = cameras(B, 16, dtype=torch.float32)
    args = DiffusionArgs(sample_steps=3)
    straight = rollout(m, args, lat, K, c2w, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    first = rollout(m, args, lat, K, c2w, 4, generator=g)
    first.bank.save(str(tmp_path / "bank.safetensors"))
    bank = MemoryBank.load(str(tmp_path / "bank.safetensors"))
    second = rollout(m, args, first.latents, K, c2w, 4, generator=g, bank=bank)
    assert torch.equal(second.latents[:, -4:], straight.latents[:, -4:])
    with pytest.raises(ValueError, match="not a DecMem memory bank"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        MemoryBank.load(str(tmp_path / "other.safetensors"))


# ------------------------------------------------------------------------------------
# Attended tokens per chunk, counted at the kernel
# ------------------------------------------------------------------------------------

def _keys_per_query(m, bank_frames, monkeypatch):
    import decmem.model.attention as att
    import decmem.model.memory as mem

    seen = []
    real = att.attend

    def spy(q, k, v, *a, **kw):
        seen.append(k.shape[-2])
        return real(q, k, v, *a, **kw)

    real_coarse = mem.coarse_from_scores

    def spy_coarse(scores, *a, **kw):                                 # one process: the coarse branch reads its
        seen.append(scores.shape[-1])                                 # logits from the retrieval scores
        return real_coarse(scores, *a, **kw)

    monkeypatch.setattr(att, "attend", spy)
    monkeypatch.setattr(mem, "attend", spy)                           # a context's coarse read would call this one
    monkeypatch.setattr(mem, "coarse_from_scores", spy_coarse)
    lat = torch.randn(1, bank_frames + 2, 3, 8, 8, dtype=F64)
    K, c2w = cameras(1, bank_frames + 2)
    bank = m.encode_memory(lat[:, :bank_frames], K[:, :bank_frames], c2w[:, :bank_frames])
    seen.clear()
    _, stats = m(lat[:, bank_frames:], torch.full((1,), 0.5, dtype=F64), K[:, bank_frames:], c2w[:, bank_frames:],
                 bank_frames, bank)
    monkeypatch.setattr(att, "attend", real)
    monkeypatch.setattr(mem, "attend", real)
    monkeypatch.setattr(mem, "coarse_from_scores", real_coarse)
    per_layer = sum(seen) // m.args.depth  # each call's keys are read by each of its queries once
    pooled = stats["layers"][0]["attended_pooled"]                    # the coarse branch: one key per old block
    assert per_layer == stats["attended_tokens"] + pooled
    return per_layer - pooled, pooled


@pytest.mark.parametrize("strategy", ["decmem", "window", "dense"])
def test_attended_tokens_vs_bank_size(strategy, monkeypatch):
    m = tiny(strategy)
    counts, pooled = map(list, zip(*[_keys_per_query(m, n, monkeypatch) for n in (8, 16, 32)]))
    Nf = 16  # 8x8 latents, patch 2
    W, n_b = 3, 4                                                        # tiny(): window 3, blocks of 4 tokens
    assert pooled == ([(n - (W - 1)) * n_b for n in (8, 16, 32)] if strategy == "decmem" else [0, 0, 0])
    if strategy == "dense":
        assert counts == [n * Nf + 2 * Nf for n in (8, 16, 32)]          # linear in bank frames
    else:
        assert counts[0] == counts[1] == counts[2]                        # independent of bank size
        assert counts[0] == (3 * 4 if strategy == "decmem" else 0) + 2 * Nf + 2 * Nf


# ------------------------------------------------------------------------------------
# Cameras
# ------------------------------------------------------------------------------------

def test_plucker_rays_match_independent_computation():
    K = np.array([[40.0, 0, 17], [0, 44.0, 13], [0, 0, 1]])
    a = 0.7
    R = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    t = np.array([0.3, -1.2, 2.0])
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = R, t
    rays = plucker_rays(torch.tensor(K), torch.tensor(c2w), (24, 32)).numpy()      # [6, 24, 32]
    for (v, u) in [(0, 0), (5, 17), (23, 31)]:
        d = R @ np.linalg.solve(K, np.array([u + 0.5, v + 0.5, 1.0]))
        d /= np.linalg.norm(d)
        np.testing.assert_allclose(rays[3:, v, u], d, atol=1e-12)
        np.testing.assert_allclose(rays[:3, v, u], np.cross(t, d), atol=1e-12)


def test_rigid_motion_of_trajectory_leaves_relative_conditioning_unchanged():
    K, c2w = cameras(1, 6)
    shift = torch.eye(4, dtype=F64)
    shift[:3, 3] = torch.tensor([5.0, -3.0, 10.0])                            # pure translation
    a = 1.1
    spin = torch.eye(4, dtype=F64)
    spin[:3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=F64)
    rel = relative_poses(c2w)
    for M in (shift, spin @ shift):
        moved = relative_poses(M @ c2w)
        torch.testing.assert_close(moved, rel, atol=1e-12, rtol=0)
        torch.testing.assert_close(plucker_rays(K, moved, (8, 8)), plucker_rays(K, rel, (8, 8)), atol=1e-12, rtol=0)
    # absolute rays do change under translation: the relative frame is what removes it
    assert not torch.allclose(plucker_rays(K, shift @ c2w, (8, 8)), plucker_rays(K, c2w, (8, 8)))


def test_untrained_model_ignores_camera_and_actions():
    torch.manual_seed(0)
    m = VideoDiT(ModelArgs(size="debug", chunk_frames=2, action_dim=5, camera="plucker",
                           attention=AttentionArgs(block_size=4, window=2))).double()
    with torch.no_grad():  # open the residual branches (adaLN-zero) but keep the conditioning paths as initialised
        for name, p in m.named_parameters():
            if "camera_embedder" not in name and "action_embedder" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 2, 3, 8, 8, dtype=F64)
    K, c2w = cameras(1, 2)
    K2, c2w2 = cameras(1, 2, seed=3)
    tau = torch.full((1,), 0.3, dtype=F64)
    a1, a2 = torch.randn(1, 2, 5, dtype=F64), torch.randn(1, 2, 5, dtype=F64)
    o1, _ = m(x, tau, K, c2w, 0, None, a1)
    o2, _ = m(x, tau, K2, c2w2 @ c2w2, 0, None, a2)
    assert torch.equal(o1, o2)
    with torch.no_grad():
        m.camera_embedder.weight.normal_()
    assert not torch.equal(m(x, tau, K2, c2w2, 0, None, a2)[0], o1)


# ------------------------------------------------------------------------------------
# Codecs
# ------------------------------------------------------------------------------------

def test_pixel_codec_round_trip_is_exact():
    from decmem.model.codec import make_codec

    frames = np.random.default_rng(0).integers(0, 256, (5, 6, 10, 3), dtype=np.uint8)
    c = make_codec("pixels")
    z = c.encode(frames)
    assert z.shape == (5, 3, 6, 10) and z.min() >= -1 and z.max() <= 1
    assert np.array_equal(c.decode(z), frames)


@pytest.fixture(scope="module")
def tiny_autoencoders(tmp_path_factory):
    from diffusers import AutoencoderKL, AutoencoderKLWan

    d = tmp_path_factory.mktemp("ae")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.1] * 4, latents_std=[2.0] * 4).save_pretrained(d / "wan")
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  scaling_factor=0.5).save_pretrained(d / "kl")
    return d


@pytest.mark.parametrize("kind,frames,latents,hw", [("wan", 9, 3, 8), ("kl", 9, 9, 16)])
def test_autoencoder_codec_shapes_and_determinism(tiny_autoencoders, kind, frames, latents, hw):
    from decmem.model.codec import make_codec

    c = make_codec(f"autoencoder:{tiny_autoencoders / kind}")
    x = np.random.default_rng(1).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)
    z = c.encode(x)
    assert z.shape == (latents, 4, hw, hw) and c.latent_frames(frames) == latents
    assert torch.equal(z, c.encode(x))
    y = c.decode(z)
    assert y.shape == x.shape and y.dtype == np.uint8
    if kind == "wan":
        assert c.frame_index(2) == 8
        with pytest.raises(ValueError, match=r"1 \+ 4·n frames; got 8 \(use 5\)"):
            c.encode(x[:8])


# ------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------

def test_weights_round_trip_and_mismatch_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from decmem.training.weights import load_weights, save_weights

    m = tiny(dtype=torch.float32)
    save_weights(m, str(tmp_path / "w"), DiffusionArgs(sample_steps=7))
    m2, cfg = load_weights(str(tmp_path / "w"))
    assert cfg.diffusion.sample_steps == 7 and cfg.model.attention.top_k == 3
    x = torch.randn(1, 2, 3, 8, 8)
    K, c2w = cameras(1, 2, dtype=torch.float32)
    tau = torch.full((1,), 0.5)
    assert torch.equal(m(x, tau, K, c2w, 0, None)[0], m2(x, tau, K, c2w, 0, None)[0])

    sd = load_file(str(tmp_path / "w" / "model.safetensors"))
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    sd["final_layer.linear.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "w" / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_weights(str(tmp_path / "w"))
    assert "unexpected keys (1): blocks.0.extra.weight" in str(e.value)
    assert "final_layer.linear.weight: file (3, 3) vs model (12, 64)" in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing config.yaml"):
        load_weights(str(tmp_path))
