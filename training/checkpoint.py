"""Checkpoints: DeepSpeed's sharded engine state + one TrainState per rank, a ``latest`` pointer written last.

    run_dir/checkpoints/
      step-N/                    one checkpoint (DeepSpeed's files + ours)
        trainstate.json          step, layout, config: human-readable, written by rank 0
        trainstate/rank-R.pt     rank R's loader cursor, RNG states, EMA shard (weights_only loadable)
        weights/                 inference weights in the generation format (model.safetensors + config.yaml)
        weights-ema/             the EMA weights, when train.ema > 0
        COMPLETE                 written once every rank has finished writing
      latest                     "step-N", replaced atomically after COMPLETE

A crash during a save leaves ``latest`` on the previous checkpoint; the
half-written folder has no COMPLETE and is never resumed from.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist


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
_STEP_DIR = re.compile(r"^step-(\d+)$")


class LayoutMismatch(RuntimeError):
    """A checkpoint written under another dp x cp layout (ZeRO-3 shards cannot be re-split on load)."""


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


def save_checkpoint(engine, run_dir: str, state: TrainState, rank: int, keep: int, meta: dict,
                    export=None) -> str:
    """Collective: every rank writes its part of step-N, then rank 0 marks it complete and moves ``latest``.

    export(path) (collective, optional) writes inference weights into the folder before it is marked complete.
    """
    root = checkpoint_root(run_dir)
    tag = f"step-{state.step}"
    path = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(path):                 # a save of this step interrupted earlier, or a re-save
            shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    os.makedirs(os.path.join(path, "trainstate"), exist_ok=True)
    _atomic_torch_save(asdict(state), os.path.join(path, "trainstate", f"rank-{rank:05d}.pt"))
    if export is not None:
        export(path)
    dist.barrier()                               # every rank's files are on disk
    if rank == 0:
        info = {"step": state.step, "samples": state.samples, "tokens": state.tokens, "layout": state.layout,
                "train_seconds": state.train_seconds, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        _atomic_write(os.path.join(path, "trainstate.json"), json.dumps(info, indent=1))
        _atomic_write(os.path.join(path, COMPLETE), "")
        _atomic_write(os.path.join(root, LATEST), tag)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


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
    """Collective: restore DeepSpeed's state (weights, optimizer, scheduler) and this rank's TrainState."""
    check_layout(path, layout)
    root, tag = os.path.split(path.rstrip("/"))
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    f = os.path.join(path, "trainstate", f"rank-{rank:05d}.pt")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{f}: missing (this rank's data cursor and RNG state); the checkpoint is incomplete")
    return TrainState(**torch.load(f, weights_only=True))


def _atomic_write(path: str, text: str) -> None:
    from data_pipeline.storage import write_bytes_atomic

    write_bytes_atomic(path, text.encode())


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
