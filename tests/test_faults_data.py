"""Fault injection on the data side, with real components (issue #10).

- An S3 endpoint (moto, in its own process, on loopback) taken down mid-epoch and brought back on the same
  port: the loader retries with backoff and yields exactly the uninterrupted sequence; kept down, it fails
  with an error naming the URL, the tries and the last error, instead of hanging or skipping good data.
- Truncated, garbage and missing shards on disk and on S3: skipped and counted, every sample of the good
  shards seen exactly once per epoch, at one and two data-parallel ranks.
- Malformed RealEstate10K inputs through the real ``decmem preprocess`` command line: recorded in the
  manifest's skip list with a reason naming the file (and line), good inputs still sharded; ``--strict``
  fails at the first bad input with the same reason.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_data_pipeline import SPEC, same
from test_data_pipeline import args as preprocess_args
from test_readers import RE10K_FILES, pose_times, write_video

from decmem.data_pipeline import storage
from decmem.data_pipeline.loader import DataArgs, ShardLoader, StorageUnavailableError
from decmem.data_pipeline.preprocess import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "decmem-faults"
KEY_ID, SECRET = "faults-key-id-7Q2", "faults-secret-do-not-print-9Z"   # to check they never reach a message
N_SHARDS = 9                                                              # 2 samples each


# ------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """18 samples in 9 shards of 2 samples (synthetic clips), with manifest.json."""
    out = str(tmp_path_factory.mktemp("small"))
    m = preprocess(SPEC, out, preprocess_args(shard_bytes=8_000), progress=False, log=lambda *_: None)
    assert len(m["shards"]) == N_SHARDS and all(s["samples"] == 2 for s in m["shards"])
    return out


class S3Process:
    """``python -m devtools.s3_local`` in a child process: a moto S3 server we can stop and start."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "devtools.s3_local"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["ready"], line
        self.endpoint = line[1]
        self.up = True

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == f"ok {cmd}"
        self.up = cmd == "start"

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_proc(small_shards):
    """The server process with the bucket and ``small_shards`` uploaded under s3://BUCKET/ds."""
    server = S3Process()
    env = dict(os.environ, AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1")
    subprocess.run([sys.executable, "-c", "import boto3, sys; boto3.client('s3').create_bucket(Bucket=sys.argv[1])",
                    BUCKET], env=env, check=True)
    yield server
    server.close()


@pytest.fixture
def s3_env(s3_proc, monkeypatch):
    """Point this process at the server; s3fs and botocore give up after one try, so the loader's retries show."""
    import s3fs

    for k, v in dict(AWS_ENDPOINT_URL=s3_proc.endpoint, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET,
                     AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)    # a class attribute, not an option
    s3fs.S3FileSystem.clear_instance_cache()        # instances cached by other tests know another endpoint
    if not s3_proc.up:
        s3_proc.send("start")
    yield s3_proc
    if not s3_proc.up:
        s3_proc.send("start")
    s3fs.S3FileSystem.clear_instance_cache()


def upload(local_dir: str, url: str) -> None:
    fs, path = storage.fs_for(url)
    fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def epoch_keys(loader: ShardLoader, limit: int = 200) -> list[str]:
    """Keys of every sample of the loader's epoch 0, in order (reads one sample of epoch 1 to know it ended)."""
    keys = []
    for _ in range(limit):
        batch = loader.next_batch()
        if loader.state_dict()["cursor"]["epoch"] > 0:
            return keys
        keys += batch["keys"]
    raise AssertionError(f"epoch 0 did not end within {limit} batches")


# ------------------------------------------------------------------------------------
# Case 1: S3 endpoint restarted mid-epoch
# ------------------------------------------------------------------------------------

def s3_args(**kw) -> DataArgs:
    base = dict(data=f"s3://{BUCKET}/ds", clip_frames=8, interleave=2, prefetch=2, read_attempts=8,
                read_retry_initial_s=0.25, read_retry_max_wait_s=30.0)
    base.update(kw)
    return DataArgs(**base)


def test_s3_restart_mid_epoch_gives_the_uninterrupted_samples(small_shards, s3_env, monkeypatch, caplog):
    upload(small_shards, f"s3://{BUCKET}/ds")
    monkeypatch.setattr(storage, "REMOTE_BLOCK", 4096)     # several range requests per shard: fail mid-shard too
    n = 24                                                  # > one epoch of 18 samples
    reference = ShardLoader(s3_args(), 2)
    want = [reference.next_batch() for _ in range(n)]
    reference.close()
    assert reference.stats["read_retries"] == 0

    loader = ShardLoader(s3_args(), 2)
    got = [loader.next_batch() for _ in range(5)]
    s3_env.send("stop")
    t_stop = time.monotonic()
    down_s, when = 2.0, {}

    def restart():
        time.sleep(down_s)
        s3_env.send("start")
        when["up"] = time.monotonic()

    timer = threading.Thread(target=restart)
    timer.start()
    stamps = []
    for _ in range(n - 5):
        got.append(loader.next_batch())
        stamps.append(time.monotonic())
    timer.join()
    loader.close()
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert all(same(a, b) for a, b in zip(got, want))
    stats = loader.stats
    assert stats["read_retries"] >= 1 and stats["corrupt_shards"] == 0 and stats["samples"] >= n
    first_after = min(t for t in stamps if t > when["up"])
    print(f"\noutage {down_s:.1f} s: {stats['read_retries']} retries, {stats['read_retry_wait_s']:.2f} s waited; "
          f"longest stall {max(np.diff([t_stop] + stamps)):.2f} s, first sample {first_after - when['up']:.2f} s "
          f"after the restart")
    assert first_after - when["up"] < 10                    # the next try after the restart succeeds
    text = caplog.text
    assert "retry 1 of" in text and SECRET not in text and KEY_ID not in text


def test_s3_restart_inside_a_shard_resumes_at_the_next_sample(small_shards, s3_env, monkeypatch, caplog):
    """Decoding on demand, one shard at a time: the outage falls between the two samples of a shard."""
    upload(small_shards, f"s3://{BUCKET}/ds")
    monkeypatch.setattr(storage, "REMOTE_BLOCK", 4096)     # the first fetch holds sample 0, not sample 1
    kw = dict(prefetch=0, interleave=1)
    reference = ShardLoader(s3_args(**kw), 2)
    want = [reference.next_batch() for _ in range(4)]
    loader = ShardLoader(s3_args(**kw), 2)
    got = [loader.next_batch()]
    s3_env.send("stop")
    timer = threading.Timer(1.0, s3_env.send, ("start",))
    timer.start()
    got += [loader.next_batch() for _ in range(3)]
    timer.join()
    assert all(same(a, b) for a, b in zip(got, want)) and loader.stats["read_retries"] >= 1
    assert "at sample 1 failed" in caplog.text                # reopened and read on from the shard's 2nd sample


def test_s3_down_past_the_limit_is_a_clear_error_not_a_hang_or_a_skip(small_shards, s3_env, caplog):
    import s3fs

    upload(small_shards, f"s3://{BUCKET}/ds")
    # the attempts run out first: the 30 s budget leaves room for slow tries on a loaded machine
    loader = ShardLoader(s3_args(read_attempts=3, read_retry_initial_s=0.1, read_retry_max_wait_s=30.0), 2)
    loader.next_batch()
    s3_env.send("stop")
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        for _ in range(20):                                   # the prefetched samples come first
            loader.next_batch()
    took = time.monotonic() - t0
    loader.close()
    msg = str(info.value)
    print(f"\ngave up after {took:.2f} s: {msg}")
    assert took < 15
    assert f"s3://{BUCKET}/ds/shard-" in msg and "still failing after 3 attempts" in msg
    assert "data.read_attempts=3" in msg and "Could not connect to the endpoint URL" in msg
    assert SECRET not in msg and KEY_ID not in msg and SECRET not in caplog.text
    assert loader.stats["corrupt_shards"] == 0 and loader.stats["read_retries"] == 2     # retried, not skipped

    # fsspec's caches do not hide the outage: a listing cached by this thread's s3fs instance answers
    # "manifest.json exists", but reading it still fails, and the loader reports the outage
    s3_env.send("start")
    fs = s3fs.S3FileSystem()
    assert any(p.endswith("manifest.json") for p in fs.ls(f"{BUCKET}/ds"))
    s3_env.send("stop")
    assert fs.exists(f"{BUCKET}/ds/manifest.json")           # from the listing cache, server down
    with pytest.raises(StorageUnavailableError, match=rf"s3://{BUCKET}/ds: still failing after 2 attempts"):
        ShardLoader(s3_args(read_attempts=2, read_retry_initial_s=0.1), 2)


def test_close_interrupts_a_retry_wait():
    """``close()`` of a loader whose producer waits to retry returns at once, not after the backoff."""
    from decmem.data_pipeline import loader as loader_mod

    stop = threading.Event()
    retry = loader_mod._Retry(DataArgs(read_retry_initial_s=30.0), "s3://b/shard-000000.tar", {}, stop)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(loader_mod._LoaderClosed):
        retry.failed(ConnectionResetError(104, "Connection reset by peer"))
    assert time.monotonic() - t0 < 5


def test_scrub_removes_credentials():
    text = (f"GET http://h/b/k?X-Amz-Credential=AKIAXXXX%2F2026&X-Amz-Signature=abcdef01 failed; "
            f"key={KEY_ID} secret={SECRET}")
    out = storage.scrub(text, {"key": KEY_ID, "client_kwargs": {"aws_secret_access_key": SECRET}})
    assert KEY_ID not in out and SECRET not in out and "AKIAXXXX" not in out and "abcdef01" not in out
    assert "X-Amz-Credential=***" in out and "http://h/b/k" in out


# ------------------------------------------------------------------------------------
# Case 2: corrupt, truncated and missing shards
# ------------------------------------------------------------------------------------

def shard_keys(path: str) -> list[str]:
    import tarfile

    with tarfile.open(path) as t:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))


@pytest.fixture(scope="module")
def damaged(small_shards, tmp_path_factory):
    """A copy of ``small_shards`` with shard 2 truncated mid-member, shard 5 random bytes, shard 7 missing.

    Returns (folder, keys expected per epoch): every sample of the six good shards, plus the first sample of
    shard 2, which is whole and is produced once the next sample's first member has been read.
    """
    import tarfile

    out = tmp_path_factory.mktemp("damaged")
    names = [f"shard-{i:06d}.tar" for i in range(N_SHARDS)]
    shutil.copy(os.path.join(small_shards, "manifest.json"), out)
    expected = []
    for i, name in enumerate(names):
        src = os.path.join(small_shards, name)
        data = open(src, "rb").read()
        if i == 2:
            with tarfile.open(src) as t:
                mp4 = [m for m in t.getmembers() if m.name.endswith("frames.mp4")][1]   # second sample's video
            data = data[: mp4.offset_data + mp4.size // 2]
            expected += shard_keys(src)[:1]
        elif i == 5:
            data = np.random.default_rng(5).integers(0, 256, len(data), dtype=np.uint8).tobytes()
        elif i == 7:
            continue
        else:
            expected += shard_keys(src)
        (out / name).write_bytes(data)
    return str(out), expected


@pytest.mark.parametrize("where,world", [("local", 1), ("local", 2), ("s3", 1), ("s3", 2)])
def test_damaged_shards_are_skipped_and_every_good_sample_seen_once(damaged, where, world, request):
    folder, expected = damaged
    data = folder
    if where == "s3":
        request.getfixturevalue("s3_env")
        data = f"s3://{BUCKET}/damaged"
        upload(folder, data)
    seen, stats = [], []
    for rank in range(world):
        loader = ShardLoader(DataArgs(data=data, clip_frames=8, interleave=2, prefetch=2, read_attempts=2,
                                      read_retry_initial_s=0.1), 2, dp_rank=rank, dp_size=world)
        seen += epoch_keys(loader)
        loader.close()
        stats.append(loader.stats)
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(expected), (sorted(seen), sorted(expected))
    assert len(expected) == 13
    total = {k: sum(s[k] for s in stats) for k in ("corrupt_shards", "missing_shards", "read_retries")}
    # epoch 0 is done and epoch 1 has begun: the loader that read its first epoch-1 sample may have met
    # a damaged shard again, so count the shards of epoch 0 through their URLs
    urls = sorted({u.rsplit("/", 1)[1] for s in stats for u in s["corrupt_urls"]})
    assert urls == ["shard-000002.tar", "shard-000005.tar", "shard-000007.tar"], urls
    assert total["corrupt_shards"] >= 3 and total["missing_shards"] >= 1 and total["read_retries"] == 0, total


# ------------------------------------------------------------------------------------
# Case 3: malformed inputs to `decmem preprocess`
# ------------------------------------------------------------------------------------

def decmem(*argv, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "decmem")
    return subprocess.run([exe, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def re10k_inputs(tmp_path_factory):
    """RealEstate10K layout: two good clips, then (in id order) a bad column count, a non-numeric value,
    a pose file without video, a video of random bytes, and a video without pose file."""
    root = tmp_path_factory.mktemp("re10k_bad")
    videos = root / "videos"

    def clip(name, src, video=True):
        lines = open(src).read().splitlines()
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
        if video:
            write_video(str(videos / f"{name}.mp4"), pose_times(src), size=(36, 64))
        return lines

    clip("a_good", RE10K_FILES[0])
    clip("b_good", RE10K_FILES[1])
    lines = clip("c_badcols", RE10K_FILES[2])
    lines[4] = " ".join(lines[4].split()[:-1])                         # line 5: 18 numbers
    (root / "c_badcols.txt").write_text("\n".join(lines) + "\n")
    lines = clip("d_badnum", RE10K_FILES[3])
    cols = lines[6].split()
    cols[9] = "0.1x"                                                   # line 7: not a number
    lines[6] = " ".join(cols)
    (root / "d_badnum.txt").write_text("\n".join(lines) + "\n")
    clip("e_novideo", RE10K_FILES[4], video=False)
    clip("f_badvideo", RE10K_FILES[5], video=False)
    (videos / "f_badvideo.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, np.uint8).tobytes())
    write_video(str(videos / "g_orphan.mp4"), pose_times(RE10K_FILES[6]), size=(36, 64))
    return root


def test_preprocess_cli_records_bad_inputs_and_strict_stops_at_the_first(re10k_inputs, tmp_path):
    root = re10k_inputs
    out = tmp_path / "ds"
    r = decmem("preprocess", "--format", "re10k", "--resolution", "32x32", "--quiet", str(root), str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == ["c_badcols", "d_badnum", "e_novideo", "f_badvideo", "videos__g_orphan_mp4"], reasons
    assert reasons["c_badcols"].startswith(f"{root}/c_badcols.txt line 5: expected 19 numbers")
    assert reasons["c_badcols"].endswith("found 18")
    assert reasons["d_badnum"] == f"{root}/d_badnum.txt line 7: expected numbers, found '0.1x'"
    assert reasons["e_novideo"].startswith(f"{root}/e_novideo.txt: no video found")
    assert reasons["f_badvideo"].startswith(f"{root}/videos/f_badvideo.mp4: cannot open video")
    assert reasons["videos__g_orphan_mp4"].startswith(f"{root}/videos/g_orphan.mp4: no camera file for this video; "
                                                     "expected g_orphan.txt")
    assert {i: r["status"] for i, r in m["inputs"].items() if r["status"] != "skipped"} == {"a_good": "done",
                                                                                           "b_good": "done"}
    assert m["samples"] == 2 and m["shards"] and all((out / s["name"]).exists() for s in m["shards"])
    loader = ShardLoader(DataArgs(data=str(out), clip_frames=8, prefetch=0), 2)
    assert sorted(loader.next_batch()["keys"] + loader.next_batch()["keys"]) == ["a_good-00000", "b_good-00000"]

    strict = decmem("preprocess", "--format", "re10k", "--resolution", "32x32", "--quiet", "--strict", str(root),
                    str(tmp_path / "strict"))
    assert strict.returncode != 0
    assert f"input c_badcols: {reasons['c_badcols']}" in strict.stderr, strict.stderr[-2000:]
    assert "Traceback" not in strict.stderr and strict.returncode == 1                  # one line, not a trace
    assert "d_badnum" not in strict.stderr                                # stopped at the first bad input
    # what was done before the failure is published: a run without --strict resumes from it
    done = json.loads((tmp_path / "strict" / "manifest.json").read_text())
    assert done["samples"] == 2 and not done["skipped"]
    again = decmem("preprocess", "--format", "re10k", "--resolution", "32x32", "--quiet", str(root),
                   str(tmp_path / "strict"))
    assert again.returncode == 0 and "2 already done or skipped, 5 to do" in again.stdout, again.stdout
    assert json.loads((tmp_path / "strict" / "manifest.json").read_text())["skipped"] == m["skipped"]


def test_train_with_the_storage_down_exits_with_one_clear_line(small_shards, s3_env, tmp_path):
    """`decmem train` whose s3:// data stays unreachable: exit 7 within the retry budget, one line, no secret."""
    upload(small_shards, f"s3://{BUCKET}/ds")
    s3_env.send("stop")
    env = dict(os.environ, AWS_MAX_ATTEMPTS="1")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "decmem.cli", "train", "configs/debug.yaml", f"data.data=s3://{BUCKET}/ds",
                        "data.read_attempts=3", "data.read_retry_initial_s=0.2", "data.read_retry_max_wait_s=30",
                        f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == 7, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("decmem: ") and f"s3://{BUCKET}/ds" in last and "3 attempts" in last, last
    assert "resume with checkpoint.resume=latest" in last and "Traceback" not in p.stderr
    assert SECRET not in p.stderr + p.stdout and KEY_ID not in p.stderr + p.stdout
    assert took < 120
