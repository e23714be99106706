"""A real S3-compatible server (moto) on loopback, for tests and benchmarks: no mock, real HTTP and s3fs."""
from __future__ import annotations

import contextlib
import os

_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """Start moto's server on 127.0.0.1, point the standard AWS variables at it, create ``bucket``; undo on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in _KEYS}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="decmem-local",
                      AWS_SECRET_ACCESS_KEY="decmem-local", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()     # cached filesystems would keep an old endpoint
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield bucket
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
