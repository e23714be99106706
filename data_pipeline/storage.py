"""Local paths and ``s3://`` URLs behind one small API (fsspec / s3fs).

S3 endpoint and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)
or fsspec's own configuration; nothing here logs or stores them, and ``scrub``
removes them from any text (an error message) that is about to be logged.

Errors of the storage (connection refused or reset, time-outs, 5xx, throttling)
are told apart from errors of the data (``is_transient``), so that a reader can
retry the first kind and skip only the second.
"""
from __future__ import annotations

import os
import posixpath
import re

import fsspec


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def fs_for(url: str, fresh: bool = False):
    """(filesystem, path within it) for a local path or URL.

    ``fresh``: a new filesystem object instead of fsspec's cached instance, so nothing from before (a
    connection pool to a restarted endpoint, listings, the endpoint and credentials read from the
    environment) is reused; used when retrying after an error.
    """
    if fresh and is_remote(url):
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        return fs, path
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


def open_read(url: str, fresh: bool = False):
    """A binary file object for reading ``url`` (remote: large read-ahead blocks); ``fresh`` as in ``fs_for``."""
    fs, path = fs_for(url, fresh)
    if is_remote(url):
        return fs.open(path, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")
    return fs.open(path, "rb")


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


#################################################################################
#                          Transient errors and retries                         #
#################################################################################

_remote_errors: tuple | None = None


def _remote_error_types() -> tuple:
    """Connection-level exception types of the S3 stack that are not OSError (imported lazily, if installed)."""
    global _remote_errors
    if _remote_errors is None:
        found: list = []
        try:                 # s3fs' own list of what it retries (time-outs, HTTP client errors, short bodies)
            from s3fs.core import S3_RETRYABLE_ERRORS
            found += list(S3_RETRYABLE_ERRORS)
        except ImportError:
            pass
        try:                 # connection refused / closed: raised after s3fs and botocore gave up
            from botocore.exceptions import ConnectionError as BotoConnectionError
            from botocore.exceptions import HTTPClientError
            found += [BotoConnectionError, HTTPClientError]
        except ImportError:
            pass
        try:
            from aiohttp import ClientError
            found.append(ClientError)
        except ImportError:
            pass
        import http.client
        found.append(http.client.HTTPException)
        _remote_errors = tuple(found)
    return _remote_errors


def is_missing(exc: BaseException) -> bool:
    """The object is not there (or is not a file): retrying will not make it appear."""
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))


def is_transient(exc: BaseException) -> bool:
    """True for errors of the storage or the network (worth retrying), False for errors of the bytes read.

    Any OSError but "not found" counts as transient: data errors of a tar stream are TarError, EOFError
    or ValueError, never OSError, while s3fs turns every S3 error code it does not know (and 5xx,
    throttling, expired credentials) into one.
    """
    if is_missing(exc):
        return False
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, _remote_error_types())


_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_SECRET_OPTION = re.compile(r"(key|secret|token|password|credential)", re.I)
_SIGNED_QUERY = re.compile(r"((?:X-Amz-(?:Credential|Signature|Security-Token)|AWSAccessKeyId|Signature)=)[^&\s\"']+",
                           re.I)


def _secret_values(options) -> set[str]:
    found = set()
    if isinstance(options, dict):
        for k, v in options.items():
            if isinstance(v, dict):
                found |= _secret_values(v)
            elif isinstance(v, str) and _SECRET_OPTION.search(str(k)) and len(v) >= 4:
                found.add(v)
    return found


def scrub(text: str, options: dict | None = None) -> str:
    """``text`` with credentials replaced by ``***``: AWS variables, secret-looking fsspec options, signed URLs."""
    secrets = {os.environ[k] for k in _SECRET_ENV if len(os.environ.get(k) or "") >= 4}
    secrets |= _secret_values(options) | _secret_values(fsspec.config.conf)
    for v in sorted(secrets, key=len, reverse=True):      # longest first: one secret may contain another
        text = text.replace(v, "***")
    return _SIGNED_QUERY.sub(r"\1***", text)


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
