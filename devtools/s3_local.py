"""A real S3-compatible server (moto) on loopback, for tests and benchmarks: no mock, real HTTP and s3fs.

``LoopbackS3`` can also be stopped and started again on the same port, for
outage tests. moto keeps buckets and objects in the memory of the process that
serves them, so a restart in the same process comes back with the same data.
moto's own ``ThreadedMotoServer.stop()`` is not an outage: it leaves the listening
socket open (clients hang instead of being refused) and keep-alive connections
keep being served; ``LoopbackS3.stop()`` closes the port and resets every open
connection, as a crashed or restarted endpoint does.

``python -m devtools.s3_local [--port N]`` runs one in its own process and
obeys ``stop`` / ``start`` / ``quit`` lines on stdin (answering ``ok ...``), so a
test can take the endpoint down and up again from outside the client process.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import weakref

_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class LoopbackS3:
    """moto's S3 server on 127.0.0.1 that can be stopped (port closed, connections reset) and restarted."""

    def __init__(self, port: int = 0):
        self.port = port              # 0: any free port on the first start, then always the same one
        self._server = self._thread = None
        self._conns: weakref.WeakSet = weakref.WeakSet()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackS3":
        """Serve on ``self.port`` (the same port again after ``stop``), with whatever moto holds in this process."""
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        if self._server is not None:
            return self
        logging.getLogger("werkzeug").setLevel(logging.ERROR)      # one log line per request otherwise
        # The same app and handler as moto's ThreadedMotoServer; the server is built here so that accepted
        # connections can be tracked (werkzeug serves HTTP/1.1 keep-alive, which outlives shutdown()).
        server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app), threaded=True,
                             request_handler=MotoRequestHandler)
        accept = server.get_request

        def get_request():
            conn, addr = accept()
            self._conns.add(conn)
            return conn, addr

        server.get_request = get_request
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True, name=f"loopback-s3-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go down like a crashed endpoint: stop accepting, reset open connections, release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """Start moto's server on 127.0.0.1, point the standard AWS variables at it, create ``bucket``; undo on exit."""
    server = LoopbackS3().start()
    saved = {k: os.environ.get(k) for k in _KEYS}
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="decmem-local",
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


def main(argv=None) -> int:
    """Serve until ``quit`` (or end of stdin); ``stop`` / ``start`` take the endpoint down and up on the same port."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    server = LoopbackS3(args.port).start()
    print(f"ready {server.endpoint}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stop":
            server.stop()
        elif cmd == "start":
            server.start()
        elif cmd == "quit":
            break
        else:
            print(f"error: unknown command {cmd!r}; expected stop, start or quit", flush=True)
            continue
        print(f"ok {cmd}", flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
