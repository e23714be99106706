"""Training samples from WebDataset shards (local or s3://), split by data-parallel rank, exactly resumable.

Order: each epoch the shard list is permuted from the seed (the same permutation
on every rank), rank r takes shards r, r+dp, r+2dp, ..., and reads them
``interleave`` at a time, round robin, so consecutive samples come from
different videos. Every random draw is seeded from (seed, epoch, key) or
(seed, batch number), so the whole state is a small cursor: ``state_dict()``
after n batches + a rebuilt loader + ``load_state_dict()`` gives exactly the
batches n+1, n+2, ... of the uninterrupted run.

Context-parallel ranks of one group must be built with the same ``dp_rank``
(``rank // cp``): they then see identical samples.

Faults: a shard that is corrupt, truncated or missing is skipped and counted
(``stats["corrupt_shards"]``, ``"missing_shards"``): the data is bad and no
retry will mend it. An error of the storage itself (connection refused or
reset, time-out, 5xx, throttling: ``storage.is_transient``) is retried with
exponential backoff (at most ``read_attempts`` tries, waits doubling from
``read_retry_initial_s``, giving up ``read_retry_max_wait_s`` after the first
failure) and counted in ``stats["read_retries"]``; the shard is reopened on a
fresh filesystem object and read on from the first sample not yet produced, so
the samples and their order are those of an uninterrupted pass. When the
budget is spent the loader raises ``StorageUnavailableError`` naming the URL,
the tries and the last error.
"""
from __future__ import annotations

import json
import logging
import queue
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from decmem.data_pipeline import storage
from decmem.data_pipeline.shards import npy_load
from decmem.data_pipeline.video import decode_mp4_bytes
from decmem.model.camera import clip_cameras

log = logging.getLogger("decmem.data")


@dataclass
class DataArgs:
    """Where training samples come from and how each is drawn."""

    data: str = ""                   # manifest.json, a dataset folder/prefix with one, or a brace pattern of shards;
                                     # several joined by '::' are read as one dataset
    clip_frames: int = 16            # latent frames per training sample: memory frames + target chunks
    target_chunks: int = 1           # target chunks per sample (DESIGN §2.4); 0 = every chunk after min_context
                                     # (the paper's teacher forcing: each chunk a noisy target reading the clean history)
    min_context: int = 1             # frames before the first target chunk
    batch_size: int = 1              # samples per micro-batch per data-parallel rank
    seed: int = 0
    interleave: int = 4              # shards read round robin at a time
    prefetch: int = 4                # samples decoded ahead in a background thread (0: decode on demand)
    read_attempts: int = 6           # tries of one read when the storage fails (connection, time-out, 5xx); 1: no retry
    read_retry_initial_s: float = 2.0     # first wait between tries; doubles after each failed try
    read_retry_max_wait_s: float = 60.0   # give up this many seconds after the read first failed (waits and tries)

    def __post_init__(self):
        for key in ("clip_frames", "batch_size", "interleave", "read_attempts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)!r}")
        for key in ("target_chunks", "min_context", "prefetch", "read_retry_initial_s", "read_retry_max_wait_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: expected >= 0, got {getattr(self, key)!r}")


class StorageUnavailableError(RuntimeError):
    """The storage kept failing through every retry: an outage, not bad data (which is skipped instead)."""


class _LoaderClosed(Exception):
    """``close()`` interrupted a retry wait of the producer thread."""


# Errors of the bytes of a shard (webdataset / tarfile on a truncated or garbled stream): skip, do not retry.
_DATA_ERRORS = (tarfile.TarError, EOFError, ValueError, KeyError)


class _Retry:
    """The retry budget of one read: ``failed(exc)`` waits before the next try, or raises when it is spent.

    Waits double from ``read_retry_initial_s``; the read gives up after ``read_attempts`` tries or once
    ``read_retry_max_wait_s`` have passed since its first failure, whichever comes first. The clock includes
    the failed tries themselves (s3fs and botocore retry inside each, several seconds against a refused
    connection), so the budget bounds how long training can stall on an outage.
    """

    def __init__(self, args: DataArgs, what: str, stats: dict | None, stop: threading.Event | None):
        self.args, self.what, self.stats, self.stop = args, what, stats, stop
        self.reset()

    def reset(self) -> None:
        """The read made progress: a later failure starts a fresh budget."""
        self.tries, self.t0 = 0, None

    def failed(self, exc: BaseException, where: str = "") -> None:
        """Count a failed try of the read; wait before the next, or raise StorageUnavailableError if none is left."""
        a = self.args
        self.tries += 1
        now = time.monotonic()
        self.t0 = now if self.t0 is None else self.t0
        left = a.read_retry_max_wait_s - (now - self.t0)
        error = f"{type(exc).__name__}: {storage.scrub(str(exc))}"
        if self.tries >= a.read_attempts or left <= 0:
            raise StorageUnavailableError(
                f"{storage.scrub(self.what)}: still failing after {self.tries} attempts over {now - self.t0:.1f} s "
                f"since the first failure (data.read_attempts={a.read_attempts}, data.read_retry_max_wait_s="
                f"{a.read_retry_max_wait_s:g}); the storage is unreachable or failing, the data was not skipped. "
                f"Last error: {error}") from None
        wait = min(a.read_retry_initial_s * 2 ** (self.tries - 1), left)
        if self.stats is not None:
            self.stats["read_retries"] = self.stats.get("read_retries", 0) + 1
            self.stats["read_retry_wait_s"] = self.stats.get("read_retry_wait_s", 0.0) + wait
        log.warning("reading %s%s failed (%s); retry %d of %d in %.1f s", storage.scrub(self.what), where, error,
                    self.tries, a.read_attempts - 1, wait)
        if self.stop is None:
            time.sleep(wait)
        elif self.stop.wait(wait):               # the loader is being closed: do not keep it waiting
            raise _LoaderClosed()


def resolve_shards(data: str) -> list[str]:
    """Shard URLs from a manifest, a dataset root holding manifest.json, a brace pattern, or one shard; several such
    sources joined by ``::`` (webdataset's separator: braces already use commas) give their shards in that order."""
    if not data:
        raise ValueError("data: no dataset given (a manifest.json, a dataset folder or s3:// prefix, or shard-{..}.tar)")
    if "::" in data:
        parts = [p.strip() for p in data.split("::")]
        if not all(parts):
            raise ValueError(f"data: empty source between '::' in {data!r} (expected SOURCE::SOURCE...)")
        return [url for part in parts for url in resolve_shards(part)]
    if "{" in data:
        return list(braceexpand(data))
    url = data if data.endswith("manifest.json") else storage.join(data, "manifest.json")
    if storage.exists(url):
        m = json.loads(storage.read_bytes(url))
        base = url[: -len("manifest.json")].rstrip("/")
        urls = [storage.join(base, s["name"]) for s in m.get("shards", [])]
        if not urls:
            raise ValueError(f"{url}: the manifest lists no shards")
        return urls
    if data.endswith(".tar") and storage.exists(data):
        return [data]
    raise FileNotFoundError(f"data: {data!r} is neither a manifest, a folder/prefix with manifest.json, "
                            "a brace pattern, nor an existing .tar shard")


class ShardLoader:
    """Batches of training samples for one data-parallel rank; ``state_dict`` / ``load_state_dict`` resume exactly."""

    def __init__(self, args: DataArgs, chunk_frames: int, dp_rank: int = 0, dp_size: int = 1):
        self.args, self.C = args, chunk_frames
        self.dp_rank, self.dp_size = dp_rank, dp_size
        retry = _Retry(args, args.data, None, None)
        while True:                  # the manifest may sit on the same storage as the shards: same retries
            try:
                self.urls = resolve_shards(args.data)
                break
            except Exception as e:
                if not storage.is_transient(e):
                    raise
                retry.failed(e)
        if len(self.urls) < dp_size:
            raise ValueError(f"{args.data}: {len(self.urls)} shards cannot feed {dp_size} data-parallel ranks "
                             "(each needs at least one); preprocess with a smaller --shard-bytes")
        if args.min_context + chunk_frames > args.clip_frames:
            raise ValueError(f"clip_frames={args.clip_frames} leaves no room for min_context={args.min_context} "
                             f"plus a target chunk of {chunk_frames} frames")
        self._cursor = {"epoch": 0, "group": 0, "pos": [0] * args.interleave, "turn": 0, "batches": 0}
        self.stats = self.new_stats()
        self._thread = self._queue = self._stop = None
        self._gen = None

    # ----------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------

    @staticmethod
    def new_stats() -> dict:
        """Cumulative counts: samples produced; samples skipped as bad or short; shards skipped as unreadable
        (``corrupt_shards``: corrupt, truncated or missing; ``missing_shards``: of those, the ones not found;
        ``corrupt_urls``: the last 20); storage failures retried (``read_retries``) and seconds waited for them."""
        return {"samples": 0, "bad_samples": 0, "short_samples": 0, "corrupt_shards": 0, "missing_shards": 0,
                "corrupt_urls": [], "read_retries": 0, "read_retry_wait_s": 0.0}

    def state_dict(self) -> dict:
        return {"cursor": json.loads(json.dumps(self._cursor)), "stats": json.loads(json.dumps(self.stats)),
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "shards": len(self.urls), "seed": self.args.seed}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("dp_size", self.dp_size), ("shards", len(self.urls)), ("seed", self.args.seed)):
            if state.get(key) != mine:
                raise ValueError(f"loader state was saved with {key}={state.get(key)}, this loader has {key}={mine}: "
                                 "the sample order would differ, so it cannot resume exactly")
        self.close()
        self._cursor = json.loads(json.dumps(state["cursor"]))
        self.stats = {**self.new_stats(), **json.loads(json.dumps(state["stats"]))}   # older states lack new keys

    def close(self) -> None:
        self._gen = None
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():       # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None

    # ----------------------------------------------------------------------------
    # Batches
    # ----------------------------------------------------------------------------

    def __iter__(self):
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict:
        """The next micro-batch: latents [B, T, C, h, w], K, c2w, chunk_starts (shared by the batch), scale, keys."""
        items = [self._next_sample() for _ in range(self.args.batch_size)]
        shapes = {tuple(it["latents"].shape) for it in items}
        if len(shapes) > 1:
            raise ValueError(f"samples of one batch differ in shape {sorted(shapes)} (keys {[i['key'] for i in items]}); "
                             "preprocess to one --resolution or use batch_size=1")
        # not per dp rank: under ZeRO-3 every rank runs one forward per target chunk, so a step's chunks must agree
        rng = np.random.default_rng([self.args.seed, 7, self._cursor["batches"]])
        self._cursor["batches"] += 1
        batch = {
            "latents": torch.stack([it["latents"] for it in items]), "K": torch.stack([it["K"] for it in items]),
            "c2w": torch.stack([it["c2w"] for it in items]), "scale": torch.tensor([it["scale"] for it in items]),
            "keys": [it["key"] for it in items], "chunk_starts": self._chunk_starts(rng),
        }
        if all("actions" in it for it in items):
            batch["actions"] = torch.stack([it["actions"] for it in items])
        return batch

    def _chunk_starts(self, rng) -> list[int]:
        lo, hi = self.args.min_context, self.args.clip_frames - self.C
        if self.args.target_chunks == 0:
            # every chunk: consecutive, non-overlapping chunks tiling the clip after min_context; the tiling's
            # phase is drawn so that chunk boundaries fall on every frame over training, as at generation time
            # (where they follow the number of init frames)
            phase = int(rng.integers(0, min(self.C, hi - lo + 1)))
            return list(range(lo + phase, hi + 1, self.C))
        cand = np.arange(lo, hi + 1)
        k = min(self.args.target_chunks, len(cand))
        return sorted(int(c) for c in rng.choice(cand, size=k, replace=False))

    def _next_sample(self) -> dict:
        if self.args.prefetch == 0:
            if self._gen is None:
                self._gen = self._gen_from(json.loads(json.dumps(self._cursor)))
            cursor, item = next(self._gen)
            self._cursor.update(cursor)
            return item
        if self._thread is None:
            self._start()
        got = self._queue.get()
        if isinstance(got[2], BaseException):
            self.stats = got[1]                  # the retries that led to the failure count too
            raise got[2]
        cursor, stats, item = got
        self._cursor.update(cursor)
        self.stats = stats
        return item

    def _start(self):
        self._queue, self._stop = queue.Queue(maxsize=self.args.prefetch), threading.Event()
        start = json.loads(json.dumps(self._cursor))
        stats = json.loads(json.dumps(self.stats))

        def run():
            try:
                for cursor, item in self._gen_from(start, stats):
                    snapshot = json.loads(json.dumps(stats))      # stats as of this sample, not of the producer
                    while not self._stop.is_set():
                        try:
                            self._queue.put((cursor, snapshot, item), timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if self._stop.is_set():
                        return
            except BaseException as e:  # surface the producer's failure (and its stats) at the consumer
                self._queue.put((None, json.loads(json.dumps(stats)), e))

        self._thread = threading.Thread(target=run, daemon=True, name=f"decmem-loader-{self.dp_rank}")
        self._thread.start()

    # ----------------------------------------------------------------------------
    # Production (deterministic in the cursor)
    # ----------------------------------------------------------------------------

    def rank_shards(self, epoch: int) -> list[str]:
        perm = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in perm[self.dp_rank::self.dp_size]]

    def _gen_from(self, cursor: dict, stats: dict | None = None):
        """Yield (cursor after this sample, sample) starting at ``cursor``; loops over epochs forever."""
        stats = self.stats if stats is None else stats
        epoch, group, pos = cursor["epoch"], cursor["group"], list(cursor["pos"])
        turn = cursor.get("turn", 0)                         # round-robin: shard of the group to read next
        n_i = self.args.interleave
        while True:
            shards = self.rank_shards(epoch)
            groups = [shards[i:i + n_i] for i in range(0, len(shards), n_i)]
            whole_epoch = group == 0 and not any(pos)            # only a whole epoch can prove "nothing usable"
            produced = 0
            while group < len(groups):
                urls = groups[group]
                its = {i: self._open(urls[i], pos[i], stats) for i in range(len(urls))}
                while its:
                    order = sorted(its)
                    i = next((j for j in order if j >= turn), order[0])
                    turn = i + 1
                    try:
                        key, raw = next(its[i])
                    except StopIteration:
                        del its[i]
                        continue
                    pos[i] += 1
                    item = self._decode(key, raw, epoch, stats)
                    if item is None:
                        continue
                    produced += 1
                    stats["samples"] += 1
                    yield {"epoch": epoch, "group": group, "pos": list(pos), "turn": turn}, item
                group, pos, turn = group + 1, [0] * n_i, 0
            if produced == 0 and whole_epoch:
                raise RuntimeError(f"data-parallel rank {self.dp_rank}: epoch {epoch} produced no usable sample from "
                                   f"{len(shards)} shards (stats: {stats})")
            epoch, group, pos, turn = epoch + 1, 0, [0] * n_i, 0

    def _open(self, url: str, skip: int, stats: dict):
        """(key, members) of one shard from its ``skip``-th sample on.

        A corrupt or missing shard ends early, counted, not fatal. A storage failure is retried (``_Retry``):
        the shard is reopened on a fresh filesystem object (nothing cached from before the failure: no
        pooled connection, listing or endpoint) and re-read up to the first sample not yet produced. Samples
        come whole out of ``group_by_keys`` (a sample is yielded once the next one starts, or at the end),
        so the ones produced before the failure are exactly the ones to skip.
        """
        retry = _Retry(self.args, url, stats, self._stop)

        def samples():
            done = skip                                         # samples of this shard produced (or skipped)
            while True:
                try:
                    with storage.open_read(url, fresh=retry.tries > 0) as f:
                        files = (dict(e, __url__=url) for e in tar_file_iterator(f))
                        for n, s in enumerate(group_by_keys(files, lcase=False)):
                            if n >= done:
                                done = n + 1
                                retry.reset()
                                yield s["__key__"], s
                    return
                except Exception as e:
                    missing = storage.is_missing(e)
                    if not missing and not isinstance(e, _DATA_ERRORS):
                        if not storage.is_transient(e):
                            raise                               # neither storage nor data: a bug, show it
                        retry.failed(e, f" at sample {done}")
                        continue
                    stats["corrupt_shards"] += 1
                    stats["missing_shards"] = stats.get("missing_shards", 0) + int(missing)
                    stats["corrupt_urls"] = (stats["corrupt_urls"] + [url])[-20:]
                    log.warning("skipping %s shard %s after %d samples: %s", "missing" if missing else "corrupt",
                                url, done, storage.scrub(f"{type(e).__name__}: {e}"))
                    return
        return samples()

    def _decode(self, key: str, raw: dict, epoch: int, stats: dict) -> dict | None:
        """Members -> one training sample, or None (counted) if bad or too short."""
        members = {k.lower(): v for k, v in raw.items() if not k.startswith("__")}
        try:
            meta = json.loads(members["meta.json"]) if "meta.json" in members else {}
            K = npy_load(members["k.npy"], f"{key}/K.npy").astype(np.float32)           # [S, 3, 3]
            c2w = npy_load(members["c2w.npy"], f"{key}/c2w.npy").astype(np.float32)     # [S, 4, 4]
            if "latents.npy" in members:
                lat = torch.from_numpy(npy_load(members["latents.npy"], f"{key}/latents.npy").astype(np.float32))
                idx = np.asarray(meta.get("latent_frame_index", range(lat.shape[0])))
                image_hw = tuple(meta["size"])
            else:
                frames = decode_mp4_bytes(members["frames.mp4"], f"{key}/frames.mp4")  # [S, H', W', 3] (even-padded)
                H, W = meta.get("size", frames.shape[1:3])
                frames = frames[:, :H, :W]
                lat = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # pixels codec
                idx = np.arange(lat.shape[0])
                image_hw = (H, W)
            if idx.max(initial=0) >= K.shape[0] or K.shape[0] != c2w.shape[0]:
                raise ValueError(f"{key}: {K.shape[0]} K / {c2w.shape[0]} c2w poses for {lat.shape[0]} frames")
        except (KeyError, ValueError) as e:
            stats["bad_samples"] += 1
            log.warning("skipping sample %s: %s", key, e)
            return None
        n = self.args.clip_frames
        if lat.shape[0] < n:
            stats["short_samples"] += 1
            return None
        rng = np.random.default_rng([self.args.seed, epoch, zlib.crc32(key.encode())])
        s = int(rng.integers(0, lat.shape[0] - n + 1))
        sel = idx[s:s + n]
        Kt, ct, scale = clip_cameras(torch.from_numpy(K[sel])[None], torch.from_numpy(c2w[sel])[None], image_hw,
                                     tuple(lat.shape[-2:]))
        item = {"key": key, "latents": lat[s:s + n].contiguous(), "K": Kt[0].float(), "c2w": ct[0].float(),
                "scale": float(scale[0])}
        if "actions.npy" in members:
            item["actions"] = torch.from_numpy(npy_load(members["actions.npy"], f"{key}/actions.npy")[sel].astype(np.float32))
        return item
