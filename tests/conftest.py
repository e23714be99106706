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


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Rendered MiniWorld scenes at 16x16 in 4 shards (enough for 2 dp ranks): the trainer's tests' dataset."""
    import subprocess

    out = tmp_path_factory.mktemp("render") / "data"
    subprocess.run([sys.executable, "-m", "decmem.cli", "preprocess", "--format", "render",
                    "scenes=4,frames=48,hw=16x16,seed=0", str(out), "--segment-frames", "24", "--shard-bytes", "40KB",
                    "--quiet"], check=True, cwd=ROOT)
    return str(out)
