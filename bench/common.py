"""What every benchmark shares: synthetic cameras, the machine stamp, the JSON rows, ratios against a baseline
row, process memory and device sync."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import weakref

import torch
import torch.distributed as dist
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def orbit_cameras(n: int, hw: tuple[int, int], radius: float = 2.0, turns: float = 1.5):
    """A camera circling a point and looking at it: K [1, n, 3, 3], c2w [1, n, 4, 4] (OpenCV axes)."""
    H, W = hw
    K = torch.tensor([[0.8 * W, 0, W / 2], [0, 0.8 * W, H / 2], [0, 0, 1.0]]).expand(1, n, 3, 3).clone()
    c2w = torch.eye(4).repeat(1, n, 1, 1)
    for i in range(n):
        a = 2 * math.pi * turns * i / max(1, n)
        pos = torch.tensor([radius * math.sin(a), 0.0, -radius * math.cos(a)])
        fwd = -pos / pos.norm()                                   # look at the origin
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), fwd)   # y is down in OpenCV
        right = right / right.norm()
        down = torch.linalg.cross(fwd, right)
        c2w[0, i, :3, :3] = torch.stack([right, down, fwd], dim=1)
        c2w[0, i, :3, 3] = pos
    return K, c2w


def machine() -> dict:
    """The machine a row was measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__}


def write_rows(json_path: str | None, rows: list[dict], **extra) -> None:
    """Every benchmark's JSON: its rows, each stamped with the machine (and ``extra``) it was measured on."""
    if not json_path:
        return
    stamp = machine()
    write_json(json_path, [dict(r, machine=stamp, **extra) for r in rows], indent=1)


def write_json(path: str, obj, indent: int | None = None) -> None:
    """Strict JSON (a NaN is an error, not a token other readers reject), replacing path atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, allow_nan=False)
    os.replace(tmp, path)


def add_ratio(rows: list[dict], value: str, out: str, baseline: str, over_baseline: bool,
              keep=lambda r: True) -> None:
    """Set row[out] on every kept row whose bank size the baseline strategy measured: row[value] / baseline's
    (``over_baseline``) or baseline's / row[value]."""
    base = {r["bank_frames"]: r[value] for r in rows if keep(r) and r.get("strategy") == baseline}
    for r in rows:
        if keep(r) and r.get("bank_frames") in base:
            r[out] = r[value] / base[r["bank_frames"]] if over_baseline else base[r["bank_frames"]] / r[value]


#################################################################################
#                                Process memory                                 #
#################################################################################

def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS since the last :func:`reset_peak_rss` (since its start without one), MiB.

    ``ru_maxrss`` is only the fallback: it never resets, and a spawned child starts with its parent's."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0              # Linux: KiB


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages that ops create inside the mode and that are still alive, whatever the
    allocator. The dry run's memory estimate models exactly this; a CPU process's RSS can stay far above it because
    glibc keeps freed heap blocks (measured 1.4-1.9x on the training bench; with ``MALLOC_MMAP_THRESHOLD_`` fixed,
    RSS and this peak agree). Storages created before the mode (weights, optimizer states) are not counted."""

    supports_higher_order_operators = True      # FlexAttention (sparse_backend=flex) is one: see below

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.bytes = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, HigherOrderOperator):
            # run its eager kernel inside the mode, so the ops it is made of (FlexAttention's score buffers) count
            impl = func.py_kernels.get(DispatchKey.CompositeExplicitAutograd)
            if impl is None:
                return NotImplemented
            with self:
                return impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not isinstance(t, FakeTensor):
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr and ptr not in self.live:            # views and in-place results share a counted storage
                    self.live[ptr] = s.nbytes()
                    self.bytes += s.nbytes()
                    weakref.finalize(s, self._free, ptr)
        self.peak = max(self.peak, self.bytes)
        return out

    def _free(self, ptr: int) -> None:
        self.bytes -= self.live.pop(ptr, 0)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def sync(dev) -> None:
    """Wait for the device's queued work, so a timer around it measures it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gather_to_json(row, world: int, rank: int, out_path: str) -> None:
    """Every rank's ``row`` of a multi-process bench, written by rank 0 as one JSON list (rank order)."""
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
