"""WebDataset shards and the dataset manifest (DESIGN §2.3).

A sample is one clip segment under key ``{video_id}-{segment:05d}`` with members
``frames.mp4`` and/or ``latents.npy``, ``K.npy``, ``c2w.npy``, optional
``actions.npy`` / ``depth.npy``, and ``meta.json``. Shards are written to a local
temporary file and published whole (rename, or one upload) when complete, so no
reader ever sees half a shard under a final name. ``manifest.json`` records
shards, checksums, per-input progress and skipped inputs; it is rewritten after
every published shard, which is what makes preprocessing resumable.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time

import numpy as np
import webdataset as wds

from decmem.data_pipeline import storage

FORMAT = "decmem-shards/1"
SHARD_NAME = "shard-{:06d}.tar"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for bad headers
        raise ValueError(f"{what}: not a readable .npy ({e})") from None


def sample_key(video_id: str, segment: int) -> str:
    """WebDataset splits extensions at the first dot, so keys must have none."""
    return f"{str(video_id).replace('.', '_').replace('/', '_')}-{segment:05d}"


#################################################################################
#                                   Manifest                                    #
#################################################################################

class Manifest:
    """The dataset's table of contents and the preprocessing run's progress record."""

    def __init__(self, url: str, data: dict):
        self.url, self.data = url, data

    @classmethod
    def load_or_new(cls, root: str, config: dict) -> "Manifest":
        url = storage.join(root, "manifest.json")
        if storage.exists(url):
            try:
                data = json.loads(storage.read_bytes(url))
            except json.JSONDecodeError as e:
                raise ValueError(f"{url}: not valid JSON ({e}); move it away to start over") from None
            if data.get("format") != FORMAT:
                raise ValueError(f"{url}: format {data.get('format')!r} is not {FORMAT!r}")
            old = {k: data["config"].get(k) for k in _SHAPING_KEYS}
            new = {k: config.get(k) for k in _SHAPING_KEYS}
            if old != new:
                diff = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in _SHAPING_KEYS if old[k] != new[k])
                raise ValueError(f"{url}: this output was preprocessed with different settings ({diff}); "
                                 "use a new OUTPUT or the original settings")
            return cls(url, data)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(url, {"format": FORMAT, "created": now, "updated": now, "config": config, "shards": [],
                         "samples": 0, "frames": 0, "inputs": {}, "skipped": []})

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        storage.write_bytes_atomic(self.url, json.dumps(self.data, indent=1).encode())

    def status(self, input_id: str) -> str | None:
        rec = self.data["inputs"].get(input_id)
        return rec["status"] if rec else None

    def done_segments(self, input_id: str) -> set[int]:
        rec = self.data["inputs"].get(input_id)
        return set(rec.get("segments_done", [])) if rec else set()

    def expect(self, input_id: str, desc: dict, n_segments: int) -> None:
        rec = self.data["inputs"].setdefault(input_id, {"status": "partial", "segments_done": [], "input": desc})
        rec["segments"] = n_segments
        if len(rec["segments_done"]) >= n_segments:
            rec["status"] = "done"

    def skip(self, input_id: str, desc: dict, reason: str) -> None:
        self.data["inputs"][input_id] = {"status": "skipped", "input": desc, "reason": reason}
        self.data["skipped"] = [s for s in self.data["skipped"] if s["id"] != input_id]
        self.data["skipped"].append({"id": input_id, "input": desc, "reason": reason})

    def add_shard(self, record: dict, members: list[tuple[str, int, int]]) -> None:
        """A shard was published holding ``members`` = [(input_id, segment, frames), ...]."""
        self.data["shards"].append(record)
        self.data["samples"] += record["samples"]
        self.data["frames"] += record["frames"]
        for input_id, seg, _ in members:
            rec = self.data["inputs"][input_id]
            rec["segments_done"] = sorted(set(rec["segments_done"]) | {seg})
            rec.setdefault("shards", [])
            if record["name"] not in rec["shards"]:
                rec["shards"].append(record["name"])
            if len(rec["segments_done"]) >= rec.get("segments", 1 << 30):
                rec["status"] = "done"


_SHAPING_KEYS = ("format_name", "resolution", "fps", "segment_frames", "codec")


#################################################################################
#                                  Shard Sink                                   #
#################################################################################

class ShardSink:
    """Appends samples to the current shard; publishes it whole once it reaches ``shard_bytes``."""

    def __init__(self, root: str, manifest: Manifest, shard_bytes: int, tmp_dir: str | None = None):
        self.root, self.manifest, self.shard_bytes = root, manifest, shard_bytes
        self.index = len(manifest.data["shards"])
        if storage.is_remote(root):
            self.tmp_dir = tmp_dir or tempfile.mkdtemp(prefix="decmem-shards-")
        else:
            self.tmp_dir = root
            os.makedirs(root, exist_ok=True)
            for name in os.listdir(root):   # leftovers of an interrupted run are never final: drop them
                if name.endswith(".tar.tmp"):
                    os.remove(os.path.join(root, name))
        self._f = self._tar = None
        self._members: list[tuple[str, int, int]] = []
        self._frames = 0

    def add(self, sample: dict, input_id: str, segment: int, frames: int) -> None:
        if self._tar is None:
            self._tmp = os.path.join(self.tmp_dir, SHARD_NAME.format(self.index) + ".tmp")
            self._f = open(self._tmp, "wb")
            self._tar = wds.TarWriter(self._f, encoder=False, mtime=0)   # fixed mtime: same input -> same bytes
        self._tar.write(sample)
        self._members.append((input_id, segment, frames))
        self._frames += frames
        if self._f.tell() >= self.shard_bytes:
            self.flush()

    def flush(self) -> dict | None:
        """Publish the current shard (if any) and record it in the manifest."""
        if self._tar is None:
            return None
        self._tar.close()          # also closes the file object it was given
        name = SHARD_NAME.format(self.index)
        h = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        size = os.path.getsize(self._tmp)
        storage.publish_file(self._tmp, storage.join(self.root, name))
        record = {"name": name, "samples": len(self._members), "frames": self._frames, "bytes": size,
                  "sha256": h.hexdigest()}
        self.manifest.add_shard(record, self._members)
        self.manifest.save()
        self.index += 1
        self._tar = self._f = None
        self._members, self._frames = [], 0
        return record
