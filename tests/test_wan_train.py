"""DecMem-Wan (model.backbone=wan) through the real trainer: `decmem train` in real processes (DeepSpeed ZeRO-3 over
gloo, CPU) on rendered MiniWorld data, cp = 2 against cp = 1, exact resume, and `decmem generate` / `decmem eval`
from the exported weights without the pretrained folder.

The Wan is a tiny random WanTransformer3DModel built from a config and saved with save_pretrained, with 3 input
channels so that the pixels codec's frames are its latents (16x16 frames -> 8x8 tokens of patch (1, 2, 2)).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_train_runs import assert_same_weights, metrics, train_cli  # noqa: E402
from test_trainer import assert_close_weights, batch_of, run_world, samples  # noqa: E402

from decmem.cli.main import main  # noqa: E402
from decmem.data_pipeline.clip import save_clip  # noqa: E402
from decmem.data_pipeline.synthetic import synthetic_clip  # noqa: E402
from decmem.model.factory import same_network  # noqa: E402
from decmem.training.config import load_config  # noqa: E402
from decmem.training.weights import load_weights  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
              text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
STEPS = 4
RUN = ("log.every_steps=1", f"train.steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep=3", "train.ema=0")


def wan(folder: str) -> tuple[str, ...]:
    """The overrides that turn configs/debug.yaml into a DecMem-Wan run on the tiny Wan in ``folder``."""
    return ("model.backbone=wan", f"model.wan.pretrained={folder}", "model.attention.gate_act=tanh")


#################################################################################
#                                    Fixtures                                   #
#################################################################################

@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A random tiny Wan in the -Diffusers layout: ROOT/transformer/{config.json, *.safetensors}."""
    root = str(tmp_path_factory.mktemp("wan"))
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**CONFIG)
    with torch.no_grad():                          # non-trivial biases: a wrong key mapping shows in the loss
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data, wan_dir):
    """One uninterrupted Wan run of STEPS steps (1 process), checkpoints every 2 steps."""
    run_dir = str(tmp_path_factory.mktemp("wan_straight") / "run")
    r = train_cli(run_dir, data, *wan(wan_dir), *RUN, nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir


#################################################################################
#                                     Tests                                     #
#################################################################################

def test_wan_run_trains_and_exports_self_describing_weights(straight, wan_dir):
    m = metrics(straight)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in m.values())
    ckpt = os.path.join(straight, "checkpoints", f"step-{STEPS}")
    assert os.path.isfile(os.path.join(ckpt, "weights", "model.safetensors"))
    model, wcfg = load_weights(os.path.join(ckpt, "weights"))
    assert wcfg.model.backbone == "wan" and wcfg.model.wan.transformer["num_layers"] == 2
    assert type(model).__name__ == "DecMemWan"
    sd = load_file(os.path.join(ckpt, "weights", "model.safetensors"))
    assert any("attn1.cam_q" in k for k in sd) and any("attn1.gate" in k for k in sd)   # the new keys are exported
    # it trained from the pretrained tensors: close to them after 4 small steps, not equal
    pre = load_file(os.path.join(wan_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    k = "blocks.0.attn1.to_q.weight"
    diff = (sd[k] - pre[k]).abs().max().item()
    assert 0 < diff < 0.5 * pre[k].abs().max().item(), diff


def test_wan_cp2_step_equals_one_process(tmp_path, data, wan_dir):
    """One ZeRO-3 optimizer step on the same batch: (dp=1, cp=2) == one process (loss, gradient norm, weights)."""
    s = samples(data, 2)
    both = batch_of(s, [4, 8])                                        # 4 bank frames: 2 per cp rank
    base = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=1", f"data.data={data}", "data.batch_size=2",
            *wan(wan_dir)]
    one = run_world(tmp_path, "one", 1, base, [[[both]]])
    cp2 = run_world(tmp_path, "cp2", 2, base + ["train.cp=2"], [[[both], [both]]])
    assert cp2["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert_close_weights(cp2, one, "Wan cp=2 vs one process")
    # recomputing Wan's blocks in backward under ZeRO-3 (every parameter partitioned) takes the same cp=2 step
    ckpt = run_world(tmp_path, "ckpt", 2, base + ["train.cp=2", "train.activation_checkpointing=true"],
                     [[[both], [both]]])
    assert ckpt["partitioned"] == len(ckpt["weights"]), "some parameter stayed whole"
    assert ckpt["losses"][0] == pytest.approx(cp2["losses"][0], rel=1e-6)
    assert_close_weights(ckpt, cp2, "Wan ZeRO-3 + activation checkpointing vs ZeRO-3", tol=1e-6)
    pre = load_file(os.path.join(wan_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    moved = max((one["weights"][k] - pre[k]).abs().max().item() for k in pre)
    assert moved > 1e-4, "the step barely moved the weights: the comparison would be vacuous"


def test_wan_resume_is_exact(tmp_path, data, wan_dir, straight):
    """Stop after step 2, resume to step 4: the same losses and bit-identical weights as the straight run."""
    run_dir = str(tmp_path / "run")
    r = train_cli(run_dir, data, *wan(wan_dir), *RUN, f"train.stop_at={STEPS // 2}", nproc=1)
    assert r.returncode == 3, r.stderr[-4000:]
    r = train_cli(run_dir, data, *wan(wan_dir), *RUN, nproc=1)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = metrics(straight), metrics(run_dir)
    for s in range(STEPS // 2 + 1, STEPS + 1):
        assert b[s]["train/loss"] == a[s]["train/loss"], f"step {s}: {b[s]['train/loss']} != {a[s]['train/loss']}"
        assert b[s]["train/grad_norm"] == a[s]["train/grad_norm"]
    assert_same_weights(os.path.join(straight, "checkpoints", f"step-{STEPS}"),
                        os.path.join(run_dir, "checkpoints", f"step-{STEPS}"))


def test_wan_generate_and_eval_without_the_pretrained_folder(tmp_path, data, wan_dir, straight):
    """The weights folder alone rebuilds the Wan: generate and eval run with the download moved away."""
    weights = os.path.join(straight, "checkpoints", f"step-{STEPS}", "weights")
    save_clip(str(tmp_path / "clip.npz"), synthetic_clip(12, (16, 16), seed=2))
    os.rename(wan_dir, wan_dir + ".moved")
    try:
        rc = main(["generate", "--weights", weights, "--clip", str(tmp_path / "clip.npz"), "--init-frames", "5",
                   "--frames", "4", "--out", str(tmp_path / "gen"), "--steps", "2"])
        assert rc == 0
        summary = json.loads((tmp_path / "gen" / "frames.json").read_text())["summary"]
        assert summary["strategy"] == "decmem" and summary["bank_frames_final"] == 9
        rc = main(["eval", "--weights", weights, "--data", data, "--init-frames", "8", "--frames", "4", "--clips", "1",
                   "--strategies", "decmem,dense", "--steps", "1", "--min-gap", "2", "--out", str(tmp_path / "eval")])
        assert rc == 0
        res = json.loads((tmp_path / "eval" / "eval.json").read_text())
        assert len(res["clips"]) == 1 and set(res["clips"][0]["strategies"]) == {"decmem", "dense"}
    finally:
        os.rename(wan_dir + ".moved", wan_dir)


def test_wan_config_errors_name_the_key(tmp_path):
    from decmem.training.run_config import RunConfig

    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug.yaml")
    with pytest.raises(ValueError, match=r"model\.wan: pretrained: .*needs model\.wan\.pretrained"):
        load_config(RunConfig, cfg, ["model.backbone=wan"])
    with pytest.raises(ValueError, match=rf"override 'model\.wan\.pretrained=.*': model\.wan: pretrained: {tmp_path}/nope: "
                                         "no such folder"):
        load_config(RunConfig, cfg, ["model.backbone=wan", f"model.wan.pretrained={tmp_path}/nope"])
    with pytest.raises(ValueError, match=r"unknown key 'model\.backbon'"):
        load_config(RunConfig, cfg, ["model.backbon=wan"])


def test_wan_paper_dry_run_without_the_download():
    """configs/wan_paper.yaml: the 1.3B shape from the YAML alone; 1560 tokens per frame; the cp = 1, 2, 4, 8 table."""
    from decmem.training.dry_run import run_dry_run
    from decmem.training.run_config import RunConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(RunConfig, os.path.join(root, "configs", "wan_paper.yaml"))
    assert not os.path.exists(cfg.model.wan.pretrained)
    lines = []
    res = run_dry_run(cfg, 8, log=lines.append, frame_hw=(60, 104), device_memory=80 * 2**30)
    assert 1.40e9 < res["params"] < 1.6e9 and res["tokens_per_frame"] == 1560
    assert [r["cp"] for r in res["layouts"]] == [1, 2, 4, 8] and all(r["world"] == 8 for r in res["layouts"])
    assert any(line.startswith("layouts on 80 GiB GPUs") for line in lines)
    for stage in ("wan_stage1.yaml", "wan_stage2.yaml"):        # the two stages describe the same network
        c = load_config(RunConfig, os.path.join(root, "configs", stage))
        assert c.model.wan.transformer == cfg.model.wan.transformer
    s1, s2 = (load_config(RunConfig, os.path.join(root, "configs", f)) for f in ("wan_stage1.yaml", "wan_stage2.yaml"))
    assert s1.model.attention.strategy == "dense" and s2.model.attention.strategy == "decmem"
    assert same_network(s1.model, s2.model) and s2.checkpoint.init_weights.startswith(s1.run_dir)


def test_wan_stage_two_starts_from_stage_one_weights(tmp_path, data, wan_dir, straight):
    """checkpoint.init_weights carries a Wan run into one with another read strategy (stage 1 -> stage 2)."""
    init = os.path.join(straight, "checkpoints", f"step-{STEPS}", "weights")
    run_dir = str(tmp_path / "run")
    r = train_cli(run_dir, data, *wan(wan_dir), "model.attention.strategy=dense", "train.steps=1", "log.every_steps=1",
                  "optim.lr=1e-12", "checkpoint.resume=none", f"checkpoint.init_weights={init}", nproc=1)
    assert r.returncode == 0, r.stderr[-4000:]
    got = load_file(os.path.join(run_dir, "checkpoints", "step-1", "weights", "model.safetensors"))
    want = load_file(os.path.join(init, "model.safetensors"))
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6   # started from stage 1, lr ~ 0
    r = train_cli(str(tmp_path / "bad"), data, *wan(wan_dir), "model.action_dim=2", "train.steps=1",
                  "checkpoint.resume=none", f"checkpoint.init_weights={init}", nproc=1)
    assert r.returncode != 0 and "its model config differs" in r.stderr, r.stderr[-3000:]


def test_wan_with_the_wan_vae_end_to_end(tmp_path):
    """Video -> tiny Wan VAE latents in shards -> a Wan run on them -> generate and eval decode through the VAE."""
    import subprocess
    import sys

    from diffusers import AutoencoderKLWan

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch.manual_seed(0)
    vae = str(tmp_path / "vae")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.1] * 4, latents_std=[2.0] * 4).save_pretrained(vae)    # 4x time, 4x space
    folder = str(tmp_path / "wan4")
    WanTransformer3DModel(**dict(CONFIG, in_channels=4, out_channels=4)).save_pretrained(
        os.path.join(folder, "transformer"), safe_serialization=True)
    data = str(tmp_path / "data")
    subprocess.run([sys.executable, "-m", "decmem.cli", "preprocess", "--format", "render",
                    "scenes=2,frames=41,hw=32x32,seed=0", data, "--segment-frames", "41", "--codec",
                    f"autoencoder:{vae}", "--quiet"], check=True, cwd=root)                 # 41 frames -> 11 latents
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    assert manifest["config"]["codec"] == f"autoencoder:{vae}" and manifest["samples"] == 2
    run_dir = str(tmp_path / "run")
    r = train_cli(run_dir, data, *wan(folder), "train.steps=2", "checkpoint.every_steps=2", "log.every_steps=1",
                  "data.clip_frames=8", "model.attention.block_size=4", "log.rollout_every=0", nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    weights = os.path.join(run_dir, "checkpoints", "step-2", "weights")
    model, wcfg = load_weights(weights)
    assert wcfg.codec == f"autoencoder:{vae}" and wcfg.model.latent_channels == 4 and type(model).__name__ == "DecMemWan"
    save_clip(str(tmp_path / "clip.npz"), synthetic_clip(25, (32, 32), seed=2))          # 25 frames -> 7 latents
    rc = main(["generate", "--weights", weights, "--clip", str(tmp_path / "clip.npz"), "--init-frames", "3",
               "--frames", "4", "--out", str(tmp_path / "gen"), "--steps", "2"])
    assert rc == 0
    info = json.loads((tmp_path / "gen" / "frames.json").read_text())
    assert info["summary"]["bank_frames_final"] == 7
    assert sum(f["kind"] == "generated" for f in info["frames"]) == 16                  # 4 latents -> frames 9..24
    rc = main(["eval", "--weights", weights, "--data", data, "--init-frames", "3", "--frames", "4", "--clips", "1",
               "--strategies", "decmem,window", "--steps", "1", "--min-gap", "1", "--out", str(tmp_path / "eval")])
    assert rc == 0
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(res["clips"]) == 1 and set(res["clips"][0]["strategies"]) == {"decmem", "window"}


def test_wan_job_through_submit_bf16_activation_checkpointing_cp2(tmp_path, data, wan_dir):
    """`decmem submit` (submitit's job function, 2 local processes) runs a Wan job the way the paper config trains:
    bf16, ZeRO-2 + activation checkpointing of Wan's blocks, cp = 2."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "decmem.cli", "submit", os.path.join(root, "configs", "debug.yaml"),
                        f"run_dir={run_dir}", f"data.data={data}", *wan(wan_dir), "train.steps=2",
                        "checkpoint.every_steps=2", "log.every_steps=1", "log.progress=false", "train.cp=2",
                        "train.precision=bf16", "train.zero_stage=2", "train.activation_checkpointing=true",
                        "--cluster", "local", "--tasks-per-node", "2", "--wait", "240"],
                       cwd=root, capture_output=True, text=True, timeout=360)
    assert r.returncode == 0 and "FINISHED" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    m = metrics(run_dir)
    assert sorted(m) == [1, 2] and all(math.isfinite(row["train/loss"]) for row in m.values())
    model, wcfg = load_weights(os.path.join(run_dir, "checkpoints", "step-2", "weights"))
    assert type(model).__name__ == "DecMemWan" and wcfg.model.backbone == "wan"
