"""Checks of a run config against its layout and its data, before anything starts: used by every launch
path (``decmem train`` with or without ``--nproc``, ``--dry-run``, ``decmem submit``) and by the trainer itself.

Semantics (the trainer's, DESIGN §2.4, §4, §5): see training/dry_run.py.
"""
from __future__ import annotations

import dataclasses
import json
import tarfile

from webdataset.tariterators import group_by_keys, tar_file_iterator

from decmem.data_pipeline import storage
from decmem.data_pipeline.loader import ShardLoader, resolve_shards
from decmem.data_pipeline.shards import npy_load
from decmem.model.blocks import BlockLayout
from decmem.training.context_parallel import shard_range
from decmem.training.distributed import resolve_device


def resolve_device_precision(train) -> tuple[str, str, str]:
    """(device, precision, how they were resolved) for a TrainArgs; auto precision is bf16 on cuda, fp32 on cpu."""
    how = []
    device = train.device
    if device == "auto":
        device = resolve_device("auto")
        how.append(f"train.device=auto -> {device} on this machine (cuda wherever a GPU is visible)")
    precision = resolve_precision(train.precision, device)
    if train.precision == "auto":
        how.append(f"train.precision=auto -> {precision} on {device}")
    return device, precision, "; ".join(how)


def resolve_precision(precision: str, device: str) -> str:
    """train.precision on a resolved device: auto is bf16 on cuda, fp32 on cpu (DESIGN §5)."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def bank_frames(cfg) -> int:
    """Memory-bank frames of a training sample, worst case: the last target chunk ends at the clip's end."""
    return cfg.data.clip_frames - cfg.model.chunk_frames


def local_bank_frames(cfg) -> int:
    """The most bank frames one cp rank encodes (shard_range gives the first n % cp ranks one more)."""
    n, cp = bank_frames(cfg), cfg.train.cp
    if n < cp:
        return 1 if n > 0 else 0
    return max(hi - lo for lo, hi in (shard_range(n, cp, r) for r in range(cp)))


def target_chunks(cfg) -> int:
    """Chunks the loader draws at most: distinct starts in [min_context, clip_frames - chunk_frames], or with
    data.target_chunks = 0 (every chunk) the chunks that tile the clip after min_context."""
    d, C = cfg.data, cfg.model.chunk_frames
    if d.target_chunks == 0:
        return max(0, (d.clip_frames - d.min_context) // C)
    return max(0, min(d.target_chunks, d.clip_frames - C - d.min_context + 1))


def validate(cfg, world: int) -> list[str]:
    """Cross-field checks the dataclasses cannot do alone; ValueError naming the keys. Returns soft warnings."""
    m, d, t, lg = cfg.model, cfg.data, cfg.train, cfg.log
    C, cp = m.chunk_frames, t.cp
    if world < 1:
        raise ValueError(f"world: expected >= 1 processes, got {world}")
    if world % cp:
        divisors = [c for c in range(1, world + 1) if world % c == 0]
        raise ValueError(f"train.cp={cp} does not divide the world of {world} processes (dp x cp = world): "
                         f"use train.cp in {divisors} or a multiple of {cp} processes")
    if d.clip_frames < d.min_context + C:
        raise ValueError(f"data.clip_frames={d.clip_frames}: expected >= data.min_context + model.chunk_frames = "
                         f"{d.min_context} + {C} = {d.min_context + C} (the memory frames before the first target "
                         "chunk plus one chunk)")
    if cp > 1 and d.min_context < cp:
        raise ValueError(f"data.min_context={d.min_context}: with train.cp={cp} every cp rank holds a contiguous "
                         f"share of the memory bank and needs at least one frame, so expected data.min_context >= "
                         f"{cp} (or a smaller train.cp)")
    if lg.rollout_every and lg.rollout_frames >= d.clip_frames:
        raise ValueError(f"log.rollout_frames={lg.rollout_frames}: expected < data.clip_frames={d.clip_frames} "
                         "(the rest of the clip initialises the rollout's memory bank)")
    warnings = []
    starts = d.clip_frames - C - d.min_context + 1
    if d.target_chunks > starts:
        warnings.append(f"data.target_chunks={d.target_chunks} but only {starts} chunk starts fit in "
                        f"[data.min_context={d.min_context}, data.clip_frames - model.chunk_frames = "
                        f"{d.clip_frames - C}]: the loader draws {starts} chunks per sample")
    if cfg.checkpoint.every_steps > t.steps:
        warnings.append(f"checkpoint.every_steps={cfg.checkpoint.every_steps} > train.steps={t.steps}: "
                        "only the final checkpoint is written")
    if cfg.optim.warmup_steps >= t.steps:
        warnings.append(f"optim.warmup_steps={cfg.optim.warmup_steps} >= train.steps={t.steps}: "
                        "the learning rate never reaches optim.lr")
    device, precision, _ = resolve_device_precision(t)
    if device == "cpu" and precision == "bf16":
        warnings.append("train.precision=bf16 with train.device=cpu: DESIGN §5 trains fp32 on CPU")
    return warnings


#################################################################################
#                                    Data                                       #
#################################################################################

def _first_sample_frames(url: str) -> int | None:
    """Frames of the first sample with a meta.json in one shard (latent frames where latents are stored)."""
    try:
        with storage.open_read(url) as f:
            for s in group_by_keys((dict(e, __url__=url) for e in tar_file_iterator(f)), lcase=False):
                members = {k.lower(): v for k, v in s.items() if not k.startswith("__")}
                if "latents.npy" in members:
                    return int(npy_load(members["latents.npy"], f"{s['__key__']}/latents.npy").shape[0])
                if "meta.json" in members:
                    meta = json.loads(members["meta.json"])
                    if "frames" in meta:
                        return int(meta["frames"])
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError):
        return None
    return None


def _first_batch(d, m, first: str, n_urls: int) -> dict:
    """The first usable sample of one shard; ValueError names the key at fault."""
    args = dataclasses.replace(d, data=first, prefetch=0, batch_size=1, interleave=1)
    try:
        loader = ShardLoader(args, m.chunk_frames)
    except FileNotFoundError:
        raise ValueError(f"data.data: the first shard {first} (of {n_urls}) does not exist") from None
    except ValueError as e:  # clip_frames too short for min_context + a chunk
        raise ValueError(f"data.clip_frames={d.clip_frames}: {e}") from None
    try:
        batch = loader.next_batch()
    except RuntimeError:  # the shard produced no usable sample
        st = loader.stats
        if st["corrupt_shards"]:
            raise ValueError(f"data.data: the first shard {first} is unreadable or corrupt "
                             f"(see the warning above)") from None
        if st["short_samples"]:
            n = _first_sample_frames(first)
            have = f" (its first sample has {n} frames)" if n is not None else ""
            raise ValueError(f"data.clip_frames={d.clip_frames}: no sample of the first shard {first} has that many "
                             f"latent frames{have}; expected data.clip_frames <= the samples' length "
                             "(or preprocess with longer --segment-frames)") from None
        raise ValueError(f"data.data: the first shard {first} holds no usable sample "
                         f"({st['bad_samples']} bad samples; see the warnings above)") from None
    except Exception as e:
        raise ValueError(f"data.data: reading the first shard {first} failed ({type(e).__name__}: {e})") from None
    finally:
        loader.close()
    return batch


def check_data(cfg) -> dict:
    """Decode the first usable sample of the first shard (of each '::' source) and check it against the model.

    Returns {shards, first_shard, frame_hw (latent h, w), channels, sample_frames}.
    ValueError names the key at fault (data.data, data.clip_frames, model.latent_channels,
    model.patch_size, model.attention.block_size) and what was expected.
    """
    m, d = cfg.model, cfg.data
    try:
        urls = resolve_shards(d.data)
    except FileNotFoundError as e:
        raise ValueError(f"data.data: {e}".replace("data.data: data: ", "data.data: ")) from None
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg.replace("data:", "data.data:", 1) if msg.startswith("data:") else
                         f"data.data={d.data!r}: {msg}") from None
    except Exception as e:  # unreachable storage, missing credentials (botocore's own exception types), ...
        raise ValueError(f"data.data={d.data!r}: cannot read it ({type(e).__name__}: {e})") from None
    firsts = [resolve_shards(src.strip())[0] for src in d.data.split("::")]   # one shard per '::' source
    batches = [_first_batch(d, m, url, len(urls)) for url in firsts]
    first, batch = firsts[0], batches[0]
    for url, other in zip(firsts[1:], batches[1:]):
        if other["latents"].shape[2:] != batch["latents"].shape[2:]:
            raise ValueError(f"data.data: the '::' sources hold different latent frames: {first} "
                             f"{list(batch['latents'].shape[2:])}, {url} {list(other['latents'].shape[2:])} "
                             "(channels, h, w); expected one shape (preprocess them with the same codec and size)")
    lat = batch["latents"]                                               # [1, T, C, h, w]
    _, T, ch, h, w = lat.shape
    if ch != m.latent_channels:
        raise ValueError(f"model.latent_channels={m.latent_channels}, but {first} holds {ch}-channel latent frames "
                         f"({h}x{w}): expected model.latent_channels={ch} (3 for the pixels codec, 4 for SD-VAE "
                         "latents) or data preprocessed with the matching codec")
    p = m.patch_size
    if h % p or w % p:
        ok = [q for q in range(1, min(h, w) + 1) if h % q == 0 and w % q == 0]
        raise ValueError(f"model.patch_size={p} does not divide the {h}x{w} latent frames of {first}: "
                         f"expected one of {ok}")
    try:
        BlockLayout(h // p, w // p, m.attention.block_size)
    except ValueError as e:
        raise ValueError(f"model.attention.block_size={m.attention.block_size}: {h}x{w} latents with patch_size={p} "
                         f"give {(h // p) * (w // p)} tokens per frame ({h // p}x{w // p}); {e}") from None
    if T != d.clip_frames:  # the loader crops every sample to clip_frames exactly
        raise ValueError(f"data.clip_frames={d.clip_frames}: the loader returned {T} frames")
    return {"shards": len(urls), "first_shard": first, "frame_hw": (int(h), int(w)), "channels": int(ch),
            "sample_frames": _first_sample_frames(first) or int(T), "key": batch["keys"][0]}


