"""Local paths and ``s3://`` URLs behind one small API (fsspec / s3fs).

S3 endpoint and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)
or fsspec's own configuration; nothing here logs or stores them.
"""
from __future__ import annotations

import os
import posixpath

import fsspec


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def fs_for(url: str):
    """(filesystem, path within it) for a local path or URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *names)
    return os.path.join(base, *names)


def exists(url: str) -> bool:
    fs, path = fs_for(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole object: a local file via temporary name + rename, an S3 object in one PUT."""
    if is_remote(url):
        fs, path = fs_for(url)
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(url)) or ".", exist_ok=True)
    tmp = url + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, url)


def publish_file(local_tmp: str, url: str) -> None:
    """Move a finished local file to its final place: rename locally, or upload whole to S3 then delete."""
    if is_remote(url):
        fs, path = fs_for(url)
        fs.put_file(local_tmp, path)
        os.remove(local_tmp)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(url)) or ".", exist_ok=True)
        os.replace(local_tmp, url)


REMOTE_BLOCK = 16 << 20   # shards are read front to back: few large range requests beat many small ones


def open_read(url: str):
    fs, path = fs_for(url)
    if is_remote(url):
        return fs.open(path, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")
    return fs.open(path, "rb")


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


def register_webdataset_s3() -> None:
    """Let ``webdataset.WebDataset("s3://...")`` open shards through fsspec (it has no s3 handler)."""
    import importlib

    try:  # the package re-exports a *function* named gopen, so import the module by name
        gopen = importlib.import_module("webdataset.gopen")
    except ImportError:
        return

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        return open_read(url)

    gopen.gopen_schemes.setdefault("s3", gopen_s3)


register_webdataset_s3()
