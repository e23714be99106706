"""The canonical clip: one camera-annotated video, in memory as a dict and on disk as one ``.npz``.

Keys (T = number of frames):
  frames   uint8   [T, H, W, 3]  RGB
  K        float   [T, 3, 3]     intrinsics in pixels of ``frames`` (pixel centres at +0.5)
  c2w      float   [T, 4, 4]     camera-to-world, OpenCV axes (x right, y down, z forward)
  actions  float   [T, A]        optional per-frame actions
  fps      number                frames per second
  source   str                   dataset / renderer name
  video_id str                   identifier within ``source``
Other keys are kept as-is (saved with ``np.asarray``). Strings and numbers are stored as 0-d
arrays so the file loads with ``allow_pickle=False``.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

REQUIRED = ("frames", "K", "c2w", "fps", "source", "video_id")
CONVENTIONS = {"K": (3, 3), "c2w": (4, 4)}


def _fail(name: str, key: str, msg: str) -> None:
    raise ValueError(f"{name}: key {key!r} {msg}")


def validate_clip(clip: dict, name: str = "clip") -> dict:
    """Check a clip dict against the canonical layout; raise ValueError naming ``name`` and the key."""
    if not isinstance(clip, dict):
        raise ValueError(f"{name}: expected a dict clip, got {type(clip).__name__}")
    for key in REQUIRED:
        if key not in clip or clip[key] is None:
            _fail(name, key, f"is missing (required keys: {', '.join(REQUIRED)})")

    frames = clip["frames"]
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        _fail(name, "frames", f"expected uint8 [T,H,W,3], got dtype {getattr(frames, 'dtype', type(frames).__name__)}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        _fail(name, "frames", f"expected uint8 [T,H,W,3] with T>=1, got shape {frames.shape}")
    T = frames.shape[0]

    for key, tail in CONVENTIONS.items():
        a = clip[key]
        want = f"float [T,{','.join(map(str, tail))}] with T={T} (frames)"
        if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating):
            _fail(name, key, f"expected {want}, got dtype {getattr(a, 'dtype', type(a).__name__)}")
        if a.shape != (T, *tail):
            _fail(name, key, f"expected {want}, got shape {a.shape}")
        if not np.isfinite(a).all():
            _fail(name, key, f"expected finite values, found {int((~np.isfinite(a)).sum())} non-finite")
    bottom = clip["c2w"][:, 3, :]                                      # [T, 4] should be [0, 0, 0, 1]
    bad = np.abs(bottom - np.array([0, 0, 0, 1], dtype=bottom.dtype)).max(axis=-1) > 1e-4
    if bad.any():
        i = int(np.argmax(bad))
        _fail(name, "c2w", f"expected last row [0,0,0,1] (tol 1e-4), frame {i} has {bottom[i].tolist()}")

    actions = clip.get("actions")
    if actions is not None:
        if not isinstance(actions, np.ndarray) or not np.issubdtype(actions.dtype, np.floating):
            _fail(name, "actions", f"expected float [T,A], got dtype {getattr(actions, 'dtype', type(actions).__name__)}")
        if actions.ndim != 2 or actions.shape[0] != T:
            _fail(name, "actions", f"expected float [T,A] with T={T} (frames), got shape {actions.shape}")
        if not np.isfinite(actions).all():
            _fail(name, "actions", "expected finite values")

    fps = clip["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not np.isfinite(fps) or fps <= 0:
        _fail(name, "fps", f"expected a positive finite number, got {fps!r}")
    for key in ("source", "video_id"):
        if not isinstance(clip[key], str):
            _fail(name, key, f"expected str, got {type(clip[key]).__name__}")
    return clip


def save_clip(path: str, clip: dict) -> None:
    """Validate ``clip`` and write it to ``path`` as a compressed .npz (atomically, via a temp name)."""
    validate_clip(clip, name=str(path))
    arrays = {k: np.asarray(v) for k, v in clip.items() if v is not None}   # str/number -> 0-d array
    for k, a in arrays.items():
        if a.dtype == object:                  # would need pickle to load back
            _fail(str(path), k, f"cannot be stored without pickle (object dtype from {type(clip[k]).__name__})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = str(path) + ".tmp"
    try:
        # Pass a file object: given a name, np.savez would append ".npz" to the temp name.
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_clip(path: str) -> dict:
    """Load and validate a clip .npz written by ``save_clip`` -> dict (0-d arrays become Python scalars/str)."""
    name = str(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):              # a bare .npy array, not an archive
            raise ValueError("not an .npz archive")
        with z:
            clip = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{name}: cannot read clip .npz ({e})") from e
    clip = {k: (v.item() if v.ndim == 0 else v) for k, v in clip.items()}
    return validate_clip(clip, name=name)


def load_clip_source(spec: str) -> dict:
    """A canonical clip from a ``.npz``, or a sample of a dataset: a folder/prefix with manifest.json, or a .tar
    shard (local or s3://); ``spec#KEY`` picks the sample with that key, else the first one is taken."""
    path, _, key = spec.partition("#")
    if path.endswith(".npz"):
        return load_clip(path)
    for clip in iter_clip_sources(spec):
        return clip
    raise AssertionError("unreachable: iter_clip_sources raises when it finds nothing")


def iter_clip_sources(spec: str, limit: int | None = None):
    """Yield canonical clips (with ``depth`` [T,H,W] when the sample has one) from a ``.npz`` or a dataset, in shard
    order; ``spec#KEY`` yields only that sample. Raises ValueError when nothing matches."""
    path, _, key = spec.partition("#")
    if path.endswith(".npz"):
        yield load_clip(path)
        return
    import json

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from decmem.data_pipeline import storage
    from decmem.data_pipeline.loader import resolve_shards
    from decmem.data_pipeline.shards import npy_load
    from decmem.data_pipeline.video import decode_mp4_bytes

    seen = given = 0
    for url in resolve_shards(path):
        with storage.open_read(url) as f:
            for s in group_by_keys((dict(e, __url__=url) for e in tar_file_iterator(f)), lcase=False):
                seen += 1
                if key and s["__key__"] != key:
                    continue
                name = f"{url}#{s['__key__']}"
                m = {k.lower(): v for k, v in s.items() if not k.startswith("__")}
                if "frames.mp4" not in m:
                    raise ValueError(f"{name}: no frames.mp4 (latent-only samples have no pixels to "
                                     "compare with; preprocess with the pixels codec)")
                meta = json.loads(m.get("meta.json", b"{}"))
                frames = decode_mp4_bytes(m["frames.mp4"], f"{name}/frames.mp4")
                H, W = meta.get("size", frames.shape[1:3])
                clip = {"frames": np.ascontiguousarray(frames[:, :H, :W]),
                        "K": npy_load(m["k.npy"], f"{s['__key__']}/K.npy").astype(np.float32),
                        "c2w": npy_load(m["c2w.npy"], f"{s['__key__']}/c2w.npy").astype(np.float32),
                        "fps": float(meta.get("fps", 10)), "source": str(meta.get("source") or "dataset"),
                        "video_id": s["__key__"]}
                if "actions.npy" in m:
                    clip["actions"] = npy_load(m["actions.npy"], f"{s['__key__']}/actions.npy").astype(np.float32)
                if "depth.npy" in m:
                    depth = npy_load(m["depth.npy"], f"{s['__key__']}/depth.npy").astype(np.float32)
                    if depth.shape != clip["frames"].shape[:3]:
                        raise ValueError(f"{name}/depth.npy: expected [T,H,W] = {clip['frames'].shape[:3]}, "
                                         f"got {depth.shape}")
                    clip["depth"] = depth
                yield validate_clip(clip, name=name)
                given += 1
                if limit is not None and given >= limit:
                    return
    if not given:
        raise ValueError(f"{spec}: " + (f"no sample with key {key!r} among {seen}" if key else "holds no sample"))
