"""``decmem bench data``: preprocessing throughput, loader throughput (local vs S3), and what the trainer consumes.

All measured in one run on the same data. S3 is a real S3-compatible server
(moto) on loopback started by the benchmark, so "S3" numbers include HTTP and
s3fs overheads but no real network latency or bandwidth limit.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

from decmem.data_pipeline.loader import DataArgs, ShardLoader
from decmem.data_pipeline.preprocess import PreprocessArgs, preprocess
from decmem.data_pipeline.sources import get_source
from decmem.model.diffusion import rectified_flow_loss
from decmem.model.factory import build_model


def _loader_rate(data: str, clip_frames: int, chunk_frames: int, n: int, warmup: int = 4) -> float:
    loader = ShardLoader(DataArgs(data=data, clip_frames=clip_frames, batch_size=1, prefetch=8), chunk_frames)
    for _ in range(warmup):
        loader.next_batch()
    t = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate


def _trainer_rate(cfg, hw, clip_frames: int, steps: int = 3) -> float:
    """Samples per second one optimizer step of the configured model consumes (batch 1, one target chunk)."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lat = torch.randn(1, clip_frames, cfg.model.latent_channels, *hw)
    K = torch.tensor([[hw[1], 0, hw[1] / 2], [0, hw[1], hw[0] / 2], [0, 0, 1.0]]).expand(1, clip_frames, 3, 3)
    c2w = torch.eye(4).expand(1, clip_frames, 4, 4)
    C = cfg.model.chunk_frames
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss, _ = rectified_flow_loss(model, lat, K, c2w, [clip_frames - C], cfg.diffusion)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    return 1.0 / (sum(times) / len(times))


def _loopback_s3(bucket: str):
    """devtools.s3_local.loopback_s3 from the checkout this package runs from: a helper for tests and benchmarks,
    not installed with the package (it also needs moto, from the dev extra)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "devtools", "s3_local.py")) and root not in sys.path:
        sys.path.append(root)
    try:
        # imported here: devtools/ exists only in a source checkout, and moto only with the dev extra
        from devtools.s3_local import loopback_s3
    except ImportError as e:
        raise ValueError(f"decmem bench data needs a source checkout (devtools/) and pip install -e '.[dev]' for the "
                         f"S3 server on loopback ({e})") from None
    return loopback_s3(bucket)


def run_data_bench(cfg, spec: str, clip_frames: int, samples: int, json_path=None, log=print,
                   fmt: str = "synthetic") -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="decmem-bench-data-")
    rows = []
    try:
        # 1. preprocessing, per worker, deterministic (default) and fast x264; a warm-up render first so
        #    neither pays the renderer's one-off start-up (EGL context, textures: seconds)

        src = get_source(fmt)
        src.read(src.find_inputs(spec)[0])
        for det in (True, False):
            out = os.path.join(tmp, f"local-{int(det)}")
            m = preprocess(spec, out, PreprocessArgs(format_name=fmt, segment_frames=64, shard_bytes=2 << 20,
                                                     deterministic=det), progress=False, log=lambda *_: None)
            rows.append({"what": "preprocess", "variant": "deterministic" if det else "fast-encode",
                         "frames_per_s_per_worker": m["stats"]["frames_per_worker_s"], "frames": m["frames"],
                         "shards": len(m["shards"])})
            log(f"preprocess ({rows[-1]['variant']}): {rows[-1]['frames_per_s_per_worker']:.0f} frames/s per worker")
        local = os.path.join(tmp, "local-1")
        hw = tuple(int(x) for x in dict(kv.split("=") for kv in spec.split(","))["hw"].split("x"))
        # 2-3. loader from local disk and from S3 on loopback, alternated 3 times (this VM is noisy): medians
        with _loopback_s3("decmem-bench"):
            import s3fs

            s3fs.S3FileSystem().put(local, "decmem-bench/ds", recursive=True)
            rates = {"local": [], "s3 (loopback)": []}
            for _ in range(3):
                for variant, url in (("local", local), ("s3 (loopback)", "s3://decmem-bench/ds")):
                    rates[variant].append(_loader_rate(url, clip_frames, cfg.model.chunk_frames, samples))
            for variant, rs in rates.items():
                rows.append({"what": "loader", "variant": variant, "samples_per_s": sorted(rs)[1], "runs": rs})
                log(f"loader {variant}: {sorted(rs)[1]:.1f} samples/s (median of {[round(r, 1) for r in rs]})")
        # 4. what the trainer consumes
        rows.append({"what": "trainer", "variant": f"{cfg.model.size} model, fwd+bwd+AdamW, batch 1",
                     "samples_per_s": _trainer_rate(cfg, hw, clip_frames)})
        log(f"trainer consumes: {rows[-1]['samples_per_s']:.2f} samples/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {r["variant"]: r.get("samples_per_s") for r in rows}
    trainer = rows[-1]["samples_per_s"]
    for r in rows:
        if r["what"] == "loader":
            r["x_trainer"] = r["samples_per_s"] / trainer
    rows.append({"what": "ratio", "variant": "local / s3", "value": by["local"] / by["s3 (loopback)"]})
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump([dict(r, machine={"platform": platform.platform(), "cpus": os.cpu_count()}, spec=spec, format=fmt,
                            clip_frames=clip_frames) for r in rows], f, indent=1)
    return rows
