"""``decmem generate`` end to end: weights folder + clip file in, decodable videos and per-frame timings out."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from decmem.cli.main import main
from decmem.data_pipeline.clip import save_clip
from decmem.data_pipeline.synthetic import synthetic_clip
from decmem.data_pipeline.video import read_mp4
from decmem.model.attention import AttentionArgs
from decmem.model.dit import ModelArgs, VideoDiT
from decmem.training.weights import save_weights


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    model = VideoDiT(ModelArgs(size="debug", chunk_frames=2, attention=AttentionArgs(block_size=16, window=3)))
    save_weights(model, str(tmp_path / "w"))
    save_clip(str(tmp_path / "clip.npz"), synthetic_clip(20, (16, 16), seed=2))
    return tmp_path


@pytest.mark.parametrize("strategy", ["decmem", "dense", "window", "fov_frames"])
def test_generate_writes_videos_and_timings(setup, strategy):
    out = setup / f"out-{strategy}"
    rc = main(["generate", "--weights", str(setup / "w"), "--clip", str(setup / "clip.npz"), "--init-frames", "5",
               "--frames", "7", "--out", str(out), "--steps", "2", "--strategy", strategy])
    assert rc == 0
    roll, comp = read_mp4(str(out / "rollout.mp4")), read_mp4(str(out / "compare.mp4"))
    assert roll.shape == (12, 16, 16, 3)
    assert comp.shape == (12, 16, 16 * 2 + 2, 3)
    # the left half of compare.mp4 is the ground truth (up to H.264 loss)
    gt = synthetic_clip(20, (16, 16), seed=2)["frames"][:12]
    assert np.abs(comp[:, :, :16].astype(int) - gt.astype(int)).mean() < 12
    info = json.loads((out / "frames.json").read_text())
    frames, summary = info["frames"], info["summary"]
    assert [f["kind"] for f in frames] == ["init"] * 5 + ["generated"] * 7
    assert all(f["seconds"] > 0 for f in frames if f["kind"] == "generated")
    assert frames[0]["psnr"] == 100.0                       # init frames pass through the pixels codec exactly
    assert summary["strategy"] == strategy and summary["bank_frames_final"] == 12
    assert len(summary["attended_tokens_per_query"]) == 4   # chunks of 2, 2, 2, 1


def test_generate_rejects_a_too_short_clip(setup, capsys):
    rc = main(["generate", "--weights", str(setup / "w"), "--clip", str(setup / "clip.npz"), "--init-frames", "5",
               "--frames", "20", "--out", str(setup / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(r"clip.npz: 20 frames give 20 latent frames .* needs 25 camera poses", err)


def test_generate_with_a_missing_clip_answers_in_one_line(setup, capsys):
    rc = main(["generate", "--weights", str(setup / "w"), "--clip", str(setup / "missing.npz"), "--init-frames", "5",
               "--frames", "4", "--out", str(setup / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "missing.npz" in err


def test_generate_through_a_time_compressing_autoencoder(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(tmp_path / "ae")
    model = VideoDiT(ModelArgs(size="debug", chunk_frames=2, latent_channels=4,
                               attention=AttentionArgs(block_size=4, window=2)))
    save_weights(model, str(tmp_path / "w"), codec=f"autoencoder:{tmp_path / 'ae'}")
    save_clip(str(tmp_path / "clip.npz"), synthetic_clip(21, (32, 32), seed=1))     # 1 + 4*5 frames -> 6 latents
    out = tmp_path / "out"
    assert main(["generate", "--weights", str(tmp_path / "w"), "--clip", str(tmp_path / "clip.npz"),
                 "--init-frames", "2", "--frames", "3", "--out", str(out), "--steps", "1"]) == 0
    info = json.loads((out / "frames.json").read_text())
    # 5 latents decode to 1 + 4*4 = 17 frames; latent 2 (the first generated) decodes to frames 5..8
    assert len(info["frames"]) == 17 and read_mp4(str(out / "rollout.mp4")).shape[:3] == (17, 32, 32)
    assert [f["kind"] for f in info["frames"]].index("generated") == 5
    assert [f["latent"] for f in info["frames"] if f["kind"] == "generated"] == [2] * 4 + [3] * 4 + [4] * 4


def test_rollout_keeps_dispersion_per_frame_from_each_chunks_last_step():
    from decmem.model.diffusion import DiffusionArgs
    from decmem.model.rollout import rollout

    torch.manual_seed(0)
    model = VideoDiT(ModelArgs(size="debug", chunk_frames=2, attention=AttentionArgs(block_size=16, window=3,
                                                                                     strategy="dense"))).eval()
    for p in model.parameters():                       # untrained, but attention not uniform and v not zero
        torch.nn.init.normal_(p, std=0.3)
    calls = []
    forward = model.forward

    def spy(*a, **kw):
        calls.append(bool(a[8] if len(a) > 8 else kw.get("return_stats", False)))
        if calls[-1]:
            time.sleep(0.3)                                    # a costly diagnostic: not part of a chunk's time
        return forward(*a, **kw)

    model.forward = spy
    K = torch.tensor([[8.0, 0, 8], [0, 8, 8], [0, 0, 1]]).expand(1, 10, 3, 3)
    c2w = torch.eye(4).expand(1, 10, 4, 4).clone()
    c2w[0, :, 0, 3] = torch.linspace(0, 1, 10)
    init = torch.randn(1, 5, 3, 16, 16)
    r = rollout(model, DiffusionArgs(sample_steps=3), init, K, c2w, 5, generator=torch.Generator().manual_seed(0),
                keep_stats=True)
    # chunks of 2, 2, 1: three steps each, then one forward at the last step's input for the read statistics,
    # left out of the chunk's seconds (each chunk here takes milliseconds, the statistics 0.3 s)
    assert calls == [False, False, False, True] * 3
    assert len(r.chunk_seconds) == 3 and max(r.chunk_seconds) < 0.3, r.chunk_seconds
    low, high = np.array(r.dispersion_low), np.array(r.dispersion_high)
    assert len(low) == len(high) == len(r.seconds_per_latent()) == 5
    assert ((low >= 0) & (low <= 1) & (high >= 0) & (high <= 1) & (low + high <= 1 + 1e-6)).all()
    assert np.ptp(low) > 0 and np.ptp(high) > 0                # per frame, not one value per rollout
    calls.clear()
    plain = rollout(model, DiffusionArgs(sample_steps=3), init, K, c2w, 5, generator=torch.Generator().manual_seed(0))
    assert not any(calls) and plain.dispersion_low == [] and plain.dispersion_high == []
    torch.testing.assert_close(plain.latents, r.latents)       # the statistics change nothing generated


def test_generate_with_action_guidance(setup, capsys):
    """--action-cfg S runs the null-action pass (a different rollout) and is refused without actions, in one line."""
    torch.manual_seed(0)
    model = VideoDiT(ModelArgs(size="debug", chunk_frames=2, action_dim=3, attention=AttentionArgs(block_size=16,
                                                                                                   window=3)))
    with torch.no_grad():                                      # leave the zero-init regime: actions change the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_weights(model, str(setup / "wa"))
    clip = synthetic_clip(20, (16, 16), seed=2)
    clip["actions"] = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    save_clip(str(setup / "act.npz"), clip)
    psnr = {}
    for s in ("1", "7.5"):
        out = setup / f"cfg{s}"
        assert main(["generate", "--weights", str(setup / "wa"), "--clip", str(setup / "act.npz"), "--init-frames",
                     "5", "--frames", "4", "--out", str(out), "--steps", "2", "--action-cfg", s]) == 0
        psnr[s] = json.loads((out / "frames.json").read_text())["summary"]["psnr_generated_mean"]
    assert abs(psnr["1"] - psnr["7.5"]) > 1e-3
    capsys.readouterr()                                        # the progress bars of the runs above
    rc = main(["generate", "--weights", str(setup / "w"), "--clip", str(setup / "clip.npz"), "--init-frames", "5",
               "--frames", "4", "--out", str(setup / "o"), "--action-cfg", "7.5"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "guidance needs actions" in err and "action_dim=0" in err
