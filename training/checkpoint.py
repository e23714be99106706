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
(checked, in parallel over the ranks, before anything is unpickled), and every
pickle, DeepSpeed's included (DeepSpeed 0.19 itself loads with
``weights_only=False``), is loaded with ``weights_only=True``, so a replaced
file cannot run code even where SHA256SUMS was rewritten to match it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from decmem.data_pipeline.storage import write_bytes_atomic
from decmem.training.distributed import RunFailed
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
COMPLETE = "COMPLETE"
SUMS = "SHA256SUMS"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RunFailed):
    """A checkpoint could not be written, or is refused on load; the message names the file."""

    exit_code = 5


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed on some rank (e.g. no space left); the partial folder was removed."""


class CheckpointRefused(CheckpointError):
    """A checkpoint file differs from what was saved, or holds more than tensors and plain containers."""


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
#                       Collectives Used While Saving/Loading                   #
#################################################################################

def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(obj) -> list:
    """Every rank's ``obj`` (small Python objects), in rank order; also a barrier."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _agree(errors: list[str]) -> list[str]:
    """Collective: every rank's error messages, so that all ranks go on, or all stop, together."""
    return [m for per_rank in _gather(list(errors)) for m in per_rank]


#################################################################################
#                     DeepSpeed's Files: Guarded Writes, Safe Loads             #
#################################################################################

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
            _remove(path)

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


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


#################################################################################
#                                      Save                                     #
#################################################################################

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
    sums, errors = _hash_files(path, rank)
    if rank == 0 and not errors:
        info = {"step": state.step, "samples": state.samples, "tokens": state.tokens, "layout": state.layout,
                "train_seconds": state.train_seconds, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        target = path
        try:
            target = os.path.join(path, "trainstate.json")
            _atomic_write(target, json.dumps(info, indent=1))
            sums["trainstate.json"] = _sha256(target)
            target = os.path.join(path, SUMS)
            _atomic_write(target, "".join(f"{h}  {name}\n" for name, h in sorted(sums.items())))
            target = os.path.join(path, COMPLETE)
            _atomic_write(target, "")
            target = os.path.join(root, LATEST)
            _atomic_write(target, tag)               # the last write: until it lands, latest names the previous one
        except Exception as e:
            errors.append(describe_write_error(target, e))
            _remove(target + ".tmp")
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
    _gather(None)                                # no rank exits (and has the launcher stop rank 0) before the cleanup
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
#                                   Checksums                                   #
#################################################################################

def _list_files(path: str) -> list[str]:
    """Every file under ``path``, relative, with '/' separators, sorted."""
    out = []
    for d, _, files in os.walk(path):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/"))
    return sorted(out)


def _hash_files(path: str, rank: int) -> tuple[dict[str, str], list[str]]:
    """Collective: sha256 of every file in the folder (as rank 0 lists it), each rank hashing every world-th file
    -> (name -> sha256, read errors of any rank)."""
    files = _broadcast(_list_files(path) if rank == 0 else None)
    world = _world()
    mine, errors = {}, []
    for i, f in enumerate(files):
        if i % world == rank:
            try:
                mine[f] = _sha256(os.path.join(path, f))
            except OSError as e:                 # reported through the agreement, not raised on one rank
                errors.append(f"{os.path.join(path, f)}: cannot read back ({e.strerror or e})")
    out: dict[str, str] = {}
    everyone: list[str] = []
    for part, errs in _gather((mine, errors)):
        out.update(part)
        everyone += errs
    return out, everyone


def verify_checkpoint(path: str, rank: int) -> None:
    """Collective: refuse (on every rank) a checkpoint whose files differ from its SHA256SUMS, before any is loaded.

    Files missing, added, or with another sha256 are named. A checkpoint without SHA256SUMS (written before it
    existed) is loaded with a warning: its pickles are still loaded with weights_only=True.
    """
    listing = None
    if rank == 0:
        expected, problems = None, []
        sums = os.path.join(path, SUMS)
        if os.path.exists(sums):
            expected = {}
            try:
                with open(sums, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                lines, problems = [], [f"{sums}: unreadable ({e})"]
            for n, line in enumerate(lines, 1):
                m = re.match(r"^([0-9a-f]{64})  (.+)$", line)
                if not m or ".." in m.group(2).split("/") or m.group(2).startswith("/"):
                    problems.append(f"{sums} line {n}: not a sha256sum line")
                    continue
                expected[m.group(2)] = m.group(1)
            present = set(_list_files(path)) - {SUMS, COMPLETE}
            problems += [f"{os.path.join(path, f)}: not listed in {SUMS} (added after the save)"
                         for f in sorted(present - set(expected))]
            problems += [f"{os.path.join(path, f)}: missing (listed in {SUMS})" for f in sorted(set(expected) - present)]
        else:
            log.warning("%s has no %s (written by an older decmem): its files are not checked against the save; "
                        "pickled state is still loaded with weights_only=True", path, SUMS)
        listing = (expected, problems)
    expected, problems = _broadcast(listing)
    if expected is None:
        return
    world, mine = _world(), []
    for i, name in enumerate(sorted(expected)):
        full = os.path.join(path, name)
        if i % world == rank and os.path.isfile(full):
            try:
                got = _sha256(full)
            except OSError as e:
                mine.append(f"{full}: unreadable ({e.strerror or e})")
                continue
            if got != expected[name]:
                mine.append(f"{full}: sha256 {got[:16]}... differs from {SUMS} ({expected[name][:16]}...)")
    problems = problems + [m for per_rank in _gather(mine) for m in per_rank]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        e = CheckpointRefused(f"{path}: refused: its files are not the ones saved (modified, corrupted or replaced; "
                              f"{SUMS} was written at save time):\n  {shown}\nNothing was loaded from it. Resume from "
                              "another complete checkpoint with checkpoint.resume=PATH, or start again with "
                              "checkpoint.resume=none.")
        e.on_every_rank = True
        raise e




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
        _remove(tmp)                             # a half-written file is not left behind (a full disk)
        raise
