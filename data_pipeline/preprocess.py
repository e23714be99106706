"""``decmem preprocess``: source files -> canonical clips -> segments -> WebDataset shards + manifest.

Parallel over inputs (spawned worker processes; results consumed in input order,
so the shards' content does not depend on the worker count), resumable from the
manifest (inputs already in published shards are skipped, partly published ones
resume at their first missing segment), and a bad input is skipped and recorded
with its reason (or fatal with ``strict``).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import re
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np

from decmem.data_pipeline.clip import validate_clip
from decmem.data_pipeline.shards import Manifest, ShardSink, npy_bytes, sample_key
from decmem.data_pipeline.sources import get_source
from decmem.data_pipeline.transforms import resize_clip, segments, subsample_fps, take_frames
from decmem.data_pipeline.video import encode_mp4_bytes


class BadInputError(ValueError):
    """An input could not be read and ``strict`` is set; the message names the input, the file and the problem."""


@dataclass
class PreprocessArgs:
    """How source clips become shards."""

    format_name: str = "synthetic"
    resolution: list[int] | None = None    # [H, W]: centre-crop to the aspect ratio, then resize
    fps: float | None = None               # subsample to about this frame rate
    segment_frames: int | None = None      # frames per sample (None: one sample per clip)
    min_segment_frames: int = 8            # shorter tails are dropped (recorded as a count)
    shard_bytes: int = 1 << 30
    codec: str = "pixels"                  # pixels | autoencoder:DIR (adds latents.npy)
    workers: int = 1
    strict: bool = False
    crf: int = 18                          # H.264 quality of frames.mp4
    deterministic: bool = True             # same input -> same shard bytes (x264 without asm, ~4x slower encode)


def parse_size(s: str | int) -> int:
    """'64MB', '1G', '500k', '123' -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)([iI]?[bB]?)\s*", str(s))
    if not m:
        raise ValueError(f"--shard-bytes: expected a size like 512MB or 1G, got {s!r}")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    if m.group(3).lower().startswith("i"):
        mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_resolution(s: str | None) -> list[int] | None:
    if not s:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", s)
    if not m:
        raise ValueError(f"--resolution: expected HxW like 64x64, got {s!r}")
    return [int(m.group(1)), int(m.group(2))]


#################################################################################
#                                 Per-input work                                #
#################################################################################

_CODECS: dict = {}


def _codec(spec: str):
    if spec not in _CODECS:
        from decmem.model.codec import make_codec
        _CODECS[spec] = make_codec(spec)
    return _CODECS[spec]


def process_input(task) -> dict:
    """Read, transform and encode one input's segments (runs in a worker). Never raises."""
    desc, args, done = task
    start = time.perf_counter()
    try:
        args = PreprocessArgs(**args)
        clip = validate_clip(get_source(args.format_name).read(desc), name=str(desc.get("id")))
        clip = resize_clip(subsample_fps(clip, args.fps), tuple(args.resolution) if args.resolution else None)
        T = clip["frames"].shape[0]
        segs = segments(T, args.segment_frames, args.min_segment_frames)
        if not segs:
            return {"id": desc["id"], "error": f"{T} frames after fps/resize, fewer than min_segment_frames="
                                               f"{args.min_segment_frames}"}
        out = []
        for i, (a, b) in enumerate(segs):
            if i in done:
                continue
            out.append((i, b - a, encode_segment(take_frames(clip, a, b), desc, i, args)))
        dropped = T - sum(b - a for a, b in segs)
        return {"id": desc["id"], "segments": len(segs), "samples": out, "frames": T, "dropped_frames": dropped,
                "seconds": time.perf_counter() - start}
    except Exception as e:  # a bad input must not stop the run; the reason goes to the manifest
        msg = str(e) if isinstance(e, (ValueError, FileNotFoundError, KeyError)) else (
            f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        return {"id": desc.get("id"), "error": msg}


def encode_segment(seg: dict, desc: dict, index: int, args: PreprocessArgs) -> dict:
    """One canonical-clip segment -> WebDataset sample members (bytes)."""
    frames = seg["frames"]
    key = sample_key(seg.get("video_id") or desc["id"], index)
    sample = {"__key__": key, "frames.mp4": encode_mp4_bytes(frames, fps=seg.get("fps") or 10, crf=args.crf,
                                                            deterministic=args.deterministic),
              "K.npy": npy_bytes(seg["K"].astype(np.float32)), "c2w.npy": npy_bytes(seg["c2w"].astype(np.float32))}
    if "actions" in seg:
        sample["actions.npy"] = npy_bytes(np.asarray(seg["actions"], np.float32))
    if "depth" in seg:
        sample["depth.npy"] = npy_bytes(np.asarray(seg["depth"], np.float16))
    meta = {"source": seg.get("source"), "video_id": seg.get("video_id") or desc["id"], "segment": index,
            "fps": float(seg.get("fps") or 10), "size": list(frames.shape[1:3]), "frames": int(frames.shape[0]),
            "frame_indices": seg["frame_indices"].tolist(), "pose_convention": "c2w_opencv", "codec": args.codec,
            "input": desc}
    if "object_names" in seg:   # scene objects (rendered data): for retrieval / revisit evaluation
        meta["objects"] = [{"name": str(n), "position": [float(x) for x in p], "size": float(z)} for n, p, z in
                           zip(seg["object_names"], seg["object_positions"], seg["object_sizes"])]
    if "revisit_of" in seg:
        meta["revisit_of"] = [int(r) for r in seg["revisit_of"]]
    if args.codec != "pixels":
        codec = _codec(args.codec)
        n = frames.shape[0]
        usable = 1 + (n - 1) // codec.temporal * codec.temporal                      # 1 + t·n frames
        lat = codec.encode(frames[:usable]).numpy().astype(np.float16)              # [T', C, h, w]
        sample["latents.npy"] = npy_bytes(lat)
        meta.update(latent_shape=list(lat.shape), latent_frame_index=[codec.frame_index(i) for i in range(lat.shape[0])],
                    codec_temporal=codec.temporal, codec_spatial=codec.spatial)
    sample["meta.json"] = json.dumps(meta).encode()
    return sample


#################################################################################
#                                    Driver                                     #
#################################################################################

def preprocess(input_spec: str, output: str, args: PreprocessArgs, progress: bool = True, log=print) -> dict:
    """Run (or resume) preprocessing; returns the manifest dict."""
    source = get_source(args.format_name)
    descs = source.find_inputs(input_spec)
    ids = [d["id"] for d in descs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{input_spec}: input ids are not unique")
    config = dict(asdict(args), input=input_spec)
    config.pop("workers"), config.pop("strict")
    manifest = Manifest.load_or_new(output, config)
    todo = [d for d in descs if manifest.status(d["id"]) not in ("done", "skipped")]
    log(f"preprocess: {len(descs)} inputs, {len(descs) - len(todo)} already done or skipped, {len(todo)} to do "
        f"-> {output}")
    sink = ShardSink(output, manifest, args.shard_bytes)
    tasks = [(d, asdict(args), manifest.done_segments(d["id"])) for d in todo]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), unit="input", desc="preprocess")
    frames_done, t0, worker_seconds = 0, time.perf_counter(), 0.0
    by_id = {d["id"]: d for d in descs}
    try:
        for res in _results(tasks, args.workers):
            desc = by_id[res["id"]]
            if "error" in res:
                if args.strict:
                    sink.flush()             # publish what is done, so a re-run after the fix resumes from it
                    raise BadInputError(f"input {res['id']}: {res['error']}")
                manifest.skip(res["id"], desc, res["error"])
                manifest.save()
            else:
                manifest.expect(res["id"], desc, res["segments"])
                if res["dropped_frames"]:
                    manifest.data["inputs"][res["id"]]["dropped_frames"] = res["dropped_frames"]
                for seg, n, sample in res["samples"]:
                    sink.add(sample, res["id"], seg, n)
                frames_done += res["frames"]
                worker_seconds += res["seconds"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(frames_per_s=f"{frames_done / max(1e-9, time.perf_counter() - t0):.0f}",
                                shards=sink.index, skipped=len(manifest.data["skipped"]))
        sink.flush()
    finally:
        if bar is not None:
            bar.close()
    manifest.data["stats"] = {"frames_per_s": frames_done / max(1e-9, time.perf_counter() - t0),
                              "frames_per_worker_s": frames_done / max(1e-9, worker_seconds), "workers": args.workers}
    manifest.save()
    d = manifest.data
    log(f"preprocess: {len(d['shards'])} shards, {d['samples']} samples, {d['frames']} frames, "
        f"{len(d['skipped'])} inputs skipped -> {manifest.url}")
    return d


def _results(tasks, workers):
    if workers <= 1:
        for t in tasks:
            yield process_input(t)
        return
    ctx = mp.get_context("spawn")   # fork after torch/OpenMP start-up can deadlock workers
    with ctx.Pool(workers) as pool:
        yield from pool.imap(process_input, tasks, chunksize=1)
