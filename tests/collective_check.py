"""Worker for the collective-device check: one rank of a real short `train()` that declares a CUDA collective device.

NCCL registers only CUDA, so under it every tensor handed to a collective must be on the GPU; a CPU tensor raises
"No backend type associated with device type cpu", which gloo (every CPU test) and one-GPU runs never show. Here the
run is real (gloo, CPU, 2 ranks) but declares the collective device ``cuda:0``:
- ``collective_device`` (decmem.training.distributed) is replaced by one that answers ``cuda:0``;
- a TorchFunctionMode lets the code ask for ``cuda``: such a tensor is made on the CPU (so gloo still runs the
  collective and the values flow on) and tagged as being on ``cuda:0``;
- every torch.distributed tensor collective called directly from decmem code is recorded with the (declared)
  device of each tensor it is handed. DeepSpeed's own collectives are not recorded: they carry the engine's tensors,
  which live on the compute device (the CPU here, the GPU in a CUDA run).
Each rank writes its records as JSON for the test to check.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import pkgutil
import sys

import torch
from torch.overrides import TorchFunctionMode

DECLARED = "cuda:0"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single")


def _is_cuda(x) -> bool:
    if isinstance(x, (str, torch.device)):
        try:
            return torch.device(x).type == "cuda"
        except RuntimeError:                     # a str that is no device (e.g. a memory format name)
            return False
    return False


class DeclareCuda(TorchFunctionMode):
    """Tensors asked for on ``cuda`` are made on the CPU and tagged ``_declared_device = "cuda:0"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        asked = False
        if _is_cuda(kwargs.get("device")):
            kwargs["device"], asked = "cpu", True
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                func, args, asked = torch.Tensor.to, (args[0], "cpu"), True
            elif any(_is_cuda(a) for a in args[1:]):
                args, asked = tuple("cpu" if _is_cuda(a) else a for a in args), True
        out = func(*args, **kwargs)
        if asked and isinstance(out, torch.Tensor):
            if any(out is a for a in args):      # .to() of a CPU tensor to the CPU returns it; to CUDA it would copy
                out = out.clone()
            out._declared_device = DECLARED
        return out


def device_of(t: torch.Tensor) -> str:
    return getattr(t, "_declared_device", None) or str(t.device)


def record_collectives(records: list) -> None:
    """Wrap torch.distributed's tensor collectives: calls made directly from decmem code are recorded."""
    import torch.distributed as dist

    def wrap(name, fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("decmem."):
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                for a in (*args, *kwargs.values()):
                    if isinstance(a, (list, tuple)):
                        tensors += [t for t in a if isinstance(t, torch.Tensor)]
                records.append({"site": f"{module}:{caller.f_lineno} ({caller.f_code.co_name})", "op": name,
                                "devices": [device_of(t) for t in tensors]})
            return fn(*args, **kwargs)
        return recorded

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def declare_collective_device() -> None:
    """``collective_device`` answers cuda:0 in decmem.training.distributed and wherever it was imported by name."""
    import decmem.training as pkg
    import decmem.training.distributed as distributed

    for m in pkgutil.iter_modules(pkg.__path__):       # import every training module first, so none keeps the original
        importlib.import_module(f"decmem.training.{m.name}")
    original = getattr(distributed, "collective_device", None)

    def declared(group=None):
        return torch.device(DECLARED)

    distributed.collective_device = declared
    for name, mod in list(sys.modules.items()):
        if name.startswith("decmem.") and original is not None and getattr(mod, "collective_device", None) is original:
            mod.collective_device = declared


def run_rank(rank: int, world: int, port: int, config: str, overrides: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from decmem.training.config import load_config
    from decmem.training.run_config import RunConfig
    from decmem.training.trainer import train

    cfg = load_config(RunConfig, config, overrides)
    records: list = []
    declare_collective_device()
    record_collectives(records)
    with DeclareCuda():
        outcome = train(cfg)
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump({"outcome": outcome, "records": records}, f)
