"""DeepSpeed's checkpoint files, guarded: every load unpickles with weights_only=True, a failed write is recorded.

DeepSpeed 0.19 itself loads its files with ``weights_only=False``: a replaced file could run code on load, even
where SHA256SUMS (checkpoint_integrity) was rewritten to match it. The guarded engine routes DeepSpeed's loads
through ``safe_torch_load``, which allows tensors, plain containers and the few plain classes DeepSpeed pickles.
On save, a write that fails (a full disk) is recorded instead of raised, so every rank still reaches DeepSpeed's
barriers and the ranks can agree to stop cleanly.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re

import torch

from decmem.training.checkpoint_integrity import CheckpointRefused


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its optimizer states, ZeRO stages 0-3, fp32 and bf16: an
    enum, the loss scalers and an (int, int) dataclass, whose unpickling sets attributes and runs no code."""
    out = []
    try:  # deepspeed is imported by the trainer first (DS_ACCELERATOR); here only its classes are needed
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 and bf16: param_slice_mappings

        out += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:  # another DeepSpeed: its files then load only if they hold tensors and containers
        pass
    return out


def safe_torch_load(path: str, map_location="cpu"):
    """torch.load with weights_only=True: tensors, containers, and DeepSpeed's few plain classes; never code.

    A file that needs anything else (a pickle whose ``__reduce__`` would call a function) is refused by name.
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            # name what the pickle wanted, not torch's advice on how to allow it
            m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            why = f"it would call or build {m.group(1)}" if m else "it holds more than tensors and plain containers"
            raise CheckpointRefused(f"{path}: refused to unpickle: {why}. Checkpoint files hold only tensors and plain "
                                    "containers; this one was replaced or comes from elsewhere, and unpickling it "
                                    "could run arbitrary code") from None
        raise CheckpointRefused(f"{path}: not a readable checkpoint file ({text.splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointRefused(f"{path}: not a readable checkpoint file ({first[:200]})") from None


class GuardedCheckpointEngine:
    """DeepSpeed's checkpoint engine, wrapped: loads go through ``safe_torch_load``; a failed write is recorded
    instead of raised, so every rank still reaches DeepSpeed's barriers and the ranks can agree to stop cleanly."""

    def __init__(self, inner):
        self.inner = inner
        self.errors: list[str] = []

    def __getattr__(self, name):                  # makedirs, create, commit, ... stay DeepSpeed's
        return getattr(self.inner, name)

    def save(self, state_dict, path: str):
        if self.errors:                           # one file already failed (a full disk): write no more of it
            return
        try:
            self.inner.save(state_dict, path)
        except Exception as e:
            self.errors.append(describe_write_error(path, e))
            with contextlib.suppress(OSError):    # no half-written file is left behind
                os.remove(path)

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location if map_location is not None else "cpu")

    def take_errors(self) -> list[str]:
        out, self.errors = self.errors, []
        return out


def guard_engine(engine) -> GuardedCheckpointEngine:
    """Install (once) the guarded checkpoint engine into a DeepSpeed engine; returns it."""
    ce = engine.checkpoint_engine
    if not isinstance(ce, GuardedCheckpointEngine):
        ce = engine.checkpoint_engine = GuardedCheckpointEngine(ce)
        copy_scripts = getattr(engine, "_copy_recovery_script", None)
        if copy_scripts is not None:
            def guarded_copy(save_path, _copy=copy_scripts, _ce=ce):
                # rank 0 copies zero_to_fp32.py next to the checkpoints; on a full disk this must not raise
                # between DeepSpeed's collectives either
                try:
                    _copy(save_path)
                except OSError as e:
                    _ce.errors.append(describe_write_error(save_path, e))
            engine._copy_recovery_script = guarded_copy
    return ce


def describe_write_error(path: str, e: BaseException) -> str:
    """'<path>: No space left on device (...)' for a full disk, whatever layer reported it, else the error itself.

    torch's zip writer says only "unexpected pos"; safetensors says "os error 28"; so a write that failed on a
    filesystem with (almost) nothing left is named for what it is.
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    free = _free_bytes(path)
    nospace = (getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
               or "os error 28" in str(e) or (free is not None and free < (1 << 20)))
    if nospace:
        left = f"{free} bytes were free on its filesystem" if free is not None else "its filesystem is full"
        return f"{path}: No space left on device ({left})"
    return f"{path}: {type(e).__name__}: {text[:300]}"


def _free_bytes(path: str) -> int | None:
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
