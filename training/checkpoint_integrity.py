"""Checkpoint integrity: SHA256SUMS written at save time, every file checked against it before anything is loaded.

A step-N folder's SHA256SUMS lists the sha256 of every file in it but itself and COMPLETE (both written after it),
in ``sha256sum -c`` format, so the check can also be run by hand. Resume refuses, on every rank, a folder whose
files are missing, added or changed, before anything is unpickled; the ranks share the hashing (each every
world-th file).
"""
from __future__ import annotations

import logging
import os
import re

from decmem.training.distributed import RunFailed, broadcast_object, gather_objects, world_size
from decmem.training.weights import file_sha256 as _sha256

log = logging.getLogger("decmem.checkpoint")

SUMS = "SHA256SUMS"
COMPLETE = "COMPLETE"


class CheckpointError(RunFailed):
    """A checkpoint could not be written, or is refused on load; the message names the file."""

    exit_code = 5


class CheckpointRefused(CheckpointError):
    """A checkpoint file differs from what was saved, or holds more than tensors and plain containers."""


def _list_files(path: str) -> list[str]:
    """Every file under ``path``, relative, with '/' separators, sorted."""
    out = []
    for d, _, files in os.walk(path):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/"))
    return sorted(out)


def hash_files(path: str, rank: int) -> tuple[dict[str, str], list[str]]:
    """Collective: sha256 of every file in the folder (as rank 0 lists it), each rank hashing every world-th file
    -> (name -> sha256, read errors of any rank)."""
    files = broadcast_object(_list_files(path) if rank == 0 else None)
    world = world_size()
    mine, errors = {}, []
    for i, f in enumerate(files):
        if i % world == rank:
            try:
                mine[f] = _sha256(os.path.join(path, f))
            except OSError as e:                 # reported through the agreement, not raised on one rank
                errors.append(f"{os.path.join(path, f)}: cannot read back ({e.strerror or e})")
    out: dict[str, str] = {}
    everyone: list[str] = []
    for part, errs in gather_objects((mine, errors)):
        out.update(part)
        everyone += errs
    return out, everyone


def format_sums(sums: dict[str, str]) -> str:
    """SHA256SUMS' text: ``<sha256>  <name>`` per file, sorted by name (what ``sha256sum -c`` reads)."""
    return "".join(f"{h}  {name}\n" for name, h in sorted(sums.items()))


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
    expected, problems = broadcast_object(listing)
    if expected is None:
        return
    world, mine = world_size(), []
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
    problems = problems + [m for per_rank in gather_objects(mine) for m in per_rank]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        e = CheckpointRefused(f"{path}: refused: its files are not the ones saved (modified, corrupted or replaced; "
                              f"{SUMS} was written at save time):\n  {shown}\nNothing was loaded from it. Resume from "
                              "another complete checkpoint with checkpoint.resume=PATH, or start again with "
                              "checkpoint.resume=none.")
        e.on_every_rank = True
        raise e
