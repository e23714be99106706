"""``decmem generate``: roll a trained model out along a clip's camera path and write videos + timings."""
from __future__ import annotations

import os
import statistics

import numpy as np
import torch
from tqdm import tqdm

from decmem.data_pipeline.clip import load_clip_source
from decmem.data_pipeline.video import side_by_side, write_mp4
from decmem.evaluation.metrics import psnr
from decmem.evaluation.report import write_json
from decmem.model.camera import clip_cameras
from decmem.model.codec import make_codec
from decmem.model.rollout import rollout
from decmem.training.weights import load_weights


def clip_inputs(clip: dict, codec, model, total: int, device="cpu"):
    """The model's inputs for a clip's first ``total`` latent frames: latents [1, T', C, h, w], K [1, total, 3, 3]
    and c2w [1, total, 4, 4] in latent pixels, actions [1, total, A] or None, and the pose scale applied."""
    src = [codec.frame_index(i) for i in range(total)]
    used = clip["frames"][: src[-1] + 1]
    latents = codec.encode(used).unsqueeze(0).to(device)                               # [1, T', C, h, w]
    H, W = used.shape[1:3]
    h, w = latents.shape[-2:]
    K = torch.from_numpy(clip["K"][src]).unsqueeze(0)
    c2w = torch.from_numpy(clip["c2w"][src]).unsqueeze(0)
    K, c2w, scale = clip_cameras(K, c2w, (H, W), (h, w))
    K, c2w = K.float().to(device), c2w.float().to(device)
    actions = torch.from_numpy(clip["actions"][src]).unsqueeze(0).float().to(device) if (
        model.args.action_dim and "actions" in clip) else None
    return latents, K, c2w, actions, scale


def generate(weights: str, clip_path: str, init_frames: int, frames: int, out_dir: str, strategy: str | None = None,
             steps: int | None = None, seed: int = 0, device: str = "cpu", teacher_forcing: bool = False,
             save_bank: str | None = None, progress: bool = True, overrides=()) -> dict:
    """Generate ``frames`` latent frames after the clip's first ``init_frames``; returns the summary dict."""
    ov = list(overrides) + ([f"model.attention.strategy={strategy}"] if strategy else [])
    ov += [f"diffusion.sample_steps={steps}"] if steps else []
    model, wcfg = load_weights(weights, device, overrides=ov)
    clip = load_clip_source(clip_path)
    codec = make_codec(wcfg.codec, device)
    T = clip["frames"].shape[0]
    # latent frames the clip supports, and the source frame each latent stands for
    n_lat = codec.latent_frames(T) if codec.temporal > 1 else T
    if init_frames < 1 or frames < 1:
        raise ValueError("--init-frames and --frames must be >= 1")
    if init_frames + frames > n_lat:
        raise ValueError(f"{clip_path}: {T} frames give {n_lat} latent frames with codec {wcfg.codec}; "
                         f"--init-frames {init_frames} + --frames {frames} needs {init_frames + frames} camera poses")
    total = init_frames + frames
    latents, K, c2w, actions, scale = clip_inputs(clip, codec, model, total, device)
    if wcfg.diffusion.action_cfg != 1.0 and actions is None:
        raise ValueError(f"--action-cfg {wcfg.diffusion.action_cfg}: guidance needs actions, but "
                         + (f"the model has action_dim=0 ({weights})" if not model.args.action_dim else
                            f"{clip_path} has no actions"))

    bar = None
    if progress:
        bar = tqdm(total=frames, unit="latent", desc=f"generate [{model.args.attention.strategy}]")

    def on_chunk(done, _total, res):
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_postfix(s_per_latent=f"{res.chunk_seconds[-1] / res.chunk_frames[-1]:.3f}", bank=res.bank.frames
                            if res.bank is not None else 0)

    g = torch.Generator(device=device).manual_seed(seed)
    res = rollout(model, wcfg.diffusion, latents[:, :init_frames], K, c2w, frames, actions, g,
                  gt_latents=latents if teacher_forcing else None, teacher_forcing=teacher_forcing, on_chunk=on_chunk)
    if bar is not None:
        bar.close()

    gen = codec.decode(res.latents[0])                                                 # [T_out, H, W, 3] uint8
    gt = clip["frames"][: gen.shape[0]]
    os.makedirs(out_dir, exist_ok=True)
    fps = int(clip.get("fps", 10) or 10)
    write_mp4(os.path.join(out_dir, "rollout.mp4"), gen, fps=fps)
    gt_pad = np.concatenate([gt, np.zeros((gen.shape[0] - gt.shape[0], *gen.shape[1:]), np.uint8)]) if (
        gt.shape[0] < gen.shape[0]) else gt
    write_mp4(os.path.join(out_dir, "compare.mp4"), side_by_side([gt_pad, gen]), fps=fps)

    per_latent = res.seconds_per_latent()
    records = []
    # latent i >= 1 of a time-compressing (causal) autoencoder decodes to frames frame_index(i-1)+1 .. frame_index(i)
    first_gen = codec.frame_index(init_frames - 1) + 1
    for i in range(gen.shape[0]):
        generated = i >= first_gen
        rec = {"frame": i, "kind": "generated" if generated else "init"}
        if generated:
            li = min(init_frames + (i - first_gen) // max(1, codec.temporal), total - 1) - init_frames
            rec["seconds"] = per_latent[li] / max(1, codec.temporal)
            rec["latent"] = init_frames + li
        if i < gt.shape[0]:
            rec["psnr"] = psnr(gen[i], gt[i])
        records.append(rec)
    summary = {
        "weights": os.path.abspath(weights), "clip": os.path.abspath(clip_path), "video_id": clip.get("video_id"),
        "strategy": model.args.attention.strategy, "sample_steps": wcfg.diffusion.sample_steps, "seed": seed,
        "teacher_forcing": teacher_forcing, "init_frames": init_frames, "generated_latents": frames,
        "chunk_frames": model.args.chunk_frames, "bank_frames_final": res.bank.frames if res.bank is not None else 0,
        "attended_tokens_per_query": res.attended_tokens, "pose_scale": float(scale[0]),
        "seconds_per_latent_median": statistics.median(per_latent),
        "psnr_generated_mean": float(np.mean([r["psnr"] for r in records if r["kind"] == "generated" and "psnr" in r]
                                             or [float("nan")])),
    }
    write_json(os.path.join(out_dir, "frames.json"), {"summary": summary, "frames": records})   # atomic, no NaN
    if save_bank:
        res.bank.save(save_bank)
    return summary
