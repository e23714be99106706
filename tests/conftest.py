import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback for the whole session; yields the bucket name."""
    pytest.importorskip("moto.server")
    from devtools.s3_local import loopback_s3

    with loopback_s3("decmem-test") as bucket:
        yield bucket
