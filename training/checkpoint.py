"""Checkpoints: DeepSpeed's sharded engine state + one TrainState per rank, a ``latest`` pointer written last.

    run_dir/checkpoints/
      step-N/                    one checkpoint (DeepSpeed's files + ours)
        trainstate.json          step, layout, config: human-readable, written by rank 0
        trainstate/rank-RRRRR.pt rank R's loader cursor, RNG states, EMA shard (weights_only loadable)
        weights/                 inference weights in the generation format (model.safetensors + config.yaml)
        weights-ema/             the EMA weights, when train.ema > 0
        SHA256SUMS               sha256 of every file above (``sha256sum -c SHA256SUMS`` checks it by hand)
        COMPLETE                 written once every rank has finished writing
      latest                     "step-N", replaced atomically after COMPLETE

A crash during a save leaves ``latest`` on the previous checkpoint; the
half-written folder has no COMPLETE and is never resumed from. A save that
fails (a full disk) is agreed by every rank: the partial folder is removed and
the run stops with one message naming the file and the error.

Checkpoint files are not trusted on load: the files must match SHA256SUMS
(checkpoint_integrity.py, before anything is unpickled), and every pickle,
DeepSpeed's included, is loaded with ``weights_only=True`` (checkpoint_guard.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch

from decmem.data_pipeline.storage import write_bytes_atomic
from decmem.training.checkpoint_guard import describe_write_error, guard_engine, safe_torch_load
from decmem.training.checkpoint_integrity import (
    COMPLETE,
    SUMS,
    CheckpointError,
    format_sums,
    hash_files,
    verify_checkpoint,
)
from decmem.training.distributed import gather_objects
from decmem.training.faults import maybe_kill_in_save
from decmem.training.weights import file_sha256 as _sha256

log = logging.getLogger("decmem.checkpoint")


@dataclass
class CheckpointArgs:
    """When checkpoints are written, how many are kept, where a run resumes from."""

    every_steps: int = 500           # save every N optimizer steps (0 = only at the end)
    every_minutes: float = 0.0       # also save when this much wall time passed since the last save (0 = off)
    keep: int = 3                    # keep the last k complete checkpoints
    resume: str = "latest"           # latest | none | PATH to a step-N folder
    export_weights: bool = True      # write step-N/weights/ (the `decmem generate` format) with every checkpoint
    init_weights: str = ""           # start a fresh run from a weights folder (e.g. to change the dp x cp layout)

    def __post_init__(self):
        if self.every_steps < 0 or self.every_minutes < 0:
            raise ValueError("every_steps / every_minutes: expected >= 0")
        if self.keep < 1:
            raise ValueError(f"keep: expected >= 1, got {self.keep}")


LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed on some rank (e.g. no space left); the partial folder was removed."""


class LayoutMismatch(CheckpointError):
    """A checkpoint written under another dp x cp layout (ZeRO-3 shards cannot be re-split on load)."""

    on_every_rank = True         # every rank reads the same trainstate.json


@dataclass
class TrainState:
    """Everything a rank needs, besides DeepSpeed's own state, to continue exactly where it stopped."""

    step: int = 0                                   # optimizer steps done
    samples: int = 0                                # unique training samples consumed (all dp ranks)
    tokens: int = 0                                 # training tokens consumed (all dp ranks)
    layout: dict = field(default_factory=dict)      # world, dp, cp of the run that wrote it
    loader: dict = field(default_factory=dict)      # this rank's ShardLoader.state_dict()
    rng: dict = field(default_factory=dict)         # torch (and cuda) RNG states of this rank
    ema: dict = field(default_factory=dict)         # parameter name -> this rank's EMA shard (fp32)
    train_seconds: float = 0.0                      # wall time spent training, over all restarts


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint that finished writing, oldest first."""
    root = checkpoint_root(run_dir)
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(root, name, COMPLETE)):
                out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """The step-N folder to resume from, or None for a fresh start; an explicit path must be complete."""
    if resume == "none":
        return None
    if resume != "latest":
        path = resume.rstrip("/")
        if not os.path.exists(os.path.join(path, COMPLETE)):
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: not a complete checkpoint folder (no {COMPLETE} "
                                    f"file); complete ones under {checkpoint_root(run_dir)}: "
                                    f"{[p for _, p in complete_checkpoints(run_dir)] or 'none'}")
        return path
    pointer = os.path.join(checkpoint_root(run_dir), LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(checkpoint_root(run_dir), f.read().strip())
        if os.path.exists(os.path.join(path, COMPLETE)):
            return path
    # the pointer is missing or names a folder that did not finish: fall back to the newest complete one
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#################################################################################
#                                      Save                                     #
#################################################################################

def _agree(errors: list[str]) -> list[str]:
    """Collective: every rank's error messages, so that all ranks go on, or all stop, together."""
    return [m for per_rank in gather_objects(list(errors)) for m in per_rank]


def save_checkpoint(engine, run_dir: str, state: TrainState, rank: int, keep: int, meta: dict,
                    export=None) -> str:
    """Collective: every rank writes its part of step-N, then rank 0 marks it complete and moves ``latest``.

    export(path) -> [error messages] (collective, optional) writes inference weights into the folder before it is
    marked complete; it runs all its collectives even when a write fails and reports the failures it saw.
    Raises CheckpointSaveError on every rank when any rank failed to write (the partial folder is removed first).
    """
    root = checkpoint_root(run_dir)
    tag = f"step-{state.step}"
    path = os.path.join(root, tag)
    errors: list[str] = []
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(path):             # a save of this step interrupted earlier, or a re-save
                shutil.rmtree(path)
        except OSError as e:
            errors.append(describe_write_error(root, e))
    _stop_if_failed(_agree(errors), path, run_dir, rank)
    guard = guard_engine(engine)
    guard.take_errors()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    maybe_kill_in_save(rank, state.step)
    errors = guard.take_errors()
    if not errors:
        f = os.path.join(path, "trainstate", f"rank-{rank:05d}.pt")
        try:
            os.makedirs(os.path.dirname(f), exist_ok=True)
            _atomic_torch_save(asdict(state), f)
        except Exception as e:
            errors.append(describe_write_error(f, e))
    _stop_if_failed(_agree(errors), path, run_dir, rank)   # nothing is exported into a checkpoint already lost
    if export is not None:
        errors += export(path)
    _stop_if_failed(_agree(errors), path, run_dir, rank)   # every rank's files are on disk
    sums, errors = hash_files(path, rank)
    if rank == 0 and not errors:
        info = {"step": state.step, "samples": state.samples, "tokens": state.tokens, "layout": state.layout,
                "train_seconds": state.train_seconds, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        target = path
        try:
            target = os.path.join(path, "trainstate.json")
            _atomic_write(target, json.dumps(info, indent=1))
            sums["trainstate.json"] = _sha256(target)
            target = os.path.join(path, SUMS)
            _atomic_write(target, format_sums(sums))
            target = os.path.join(path, COMPLETE)
            _atomic_write(target, "")
            target = os.path.join(root, LATEST)
            _atomic_write(target, tag)               # the last write: until it lands, latest names the previous one
        except Exception as e:
            errors.append(describe_write_error(target, e))
            with contextlib.suppress(OSError):
                os.remove(target + ".tmp")
    _stop_if_failed(_agree(errors), path, run_dir, rank)
    if rank == 0:
        try:
            _rotate(run_dir, keep, state.step)
        except OSError as e:                     # the new checkpoint is complete; old ones stay for now
            log.warning("could not remove old checkpoints: %s", e)
    return path


def _stop_if_failed(errors: list[str], path: str, run_dir: str, rank: int) -> None:
    """After an agreement: if any rank failed, rank 0 removes the partial folder and every rank raises."""
    if not errors:
        return
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    gather_objects(None)                         # no rank exits (and has the launcher stop rank 0) before the cleanup
    prev = resolve_resume(run_dir, "latest")
    kept = (f"{os.path.join(checkpoint_root(run_dir), LATEST)} still names {os.path.basename(prev)} (complete), "
            "which checkpoint.resume=latest continues from" if prev else "there is no earlier complete checkpoint")
    hint = " Free some space (or move run_dir) before resuming." if any("No space left" in m for m in errors) else ""
    shown = "; ".join(dict.fromkeys(errors))     # the same message from several ranks once
    e = CheckpointSaveError(f"checkpoint {path} was not saved: {shown}. Its partial files were removed; {kept}.{hint}")
    e.on_every_rank = True
    raise e


def _rotate(run_dir: str, keep: int, step: int) -> None:
    """Keep the last ``keep`` complete checkpoints; drop folders of saves that never completed (older steps)."""
    for _, old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = checkpoint_root(run_dir)
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and int(m.group(1)) < step and not os.path.exists(os.path.join(root, name, COMPLETE)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


#################################################################################
#                                      Load                                     #
#################################################################################

def check_layout(path: str, layout: dict) -> dict:
    """The checkpoint's trainstate.json; raises LayoutMismatch if it was written under another layout."""
    with open(os.path.join(path, "trainstate.json")) as f:
        info = json.load(f)
    saved = info.get("layout", {})
    if any(saved.get(k) != layout[k] for k in ("world", "dp", "cp")):
        raise LayoutMismatch(
            f"{path} was written with world={saved.get('world')} (dp={saved.get('dp')} x cp={saved.get('cp')}); this "
            f"run has world={layout['world']} (dp={layout['dp']} x cp={layout['cp']}). ZeRO-3 optimizer shards and "
            f"the per-rank data-loader cursors cannot be re-split. Either run with the same number of processes and "
            f"train.cp={saved.get('cp')}, or start a new run from its weights: checkpoint.resume=none "
            f"checkpoint.init_weights={os.path.join(path, 'weights')} (optimizer state and data position restart).")
    return info


def load_checkpoint(engine, path: str, rank: int, layout: dict) -> TrainState:
    """Collective: check the files against SHA256SUMS, then restore DeepSpeed's state (weights, optimizer,
    scheduler; unpickled with weights_only=True) and this rank's TrainState."""
    verify_checkpoint(path, rank)
    check_layout(path, layout)
    guard_engine(engine)
    root, tag = os.path.split(path.rstrip("/"))
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    f = os.path.join(path, "trainstate", f"rank-{rank:05d}.pt")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{f}: missing (this rank's data cursor and RNG state); the checkpoint is incomplete")
    return TrainState(**safe_torch_load(f))


def _atomic_write(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):       # a half-written file is not left behind (a full disk)
            os.remove(tmp)
        raise
