"""``<stem>.png`` and ``<stem>.targets.json`` next to a bench's ``--json PATH``, from exactly the rows saved there."""
from __future__ import annotations

import json
import os

from decmem.bench.common import write_json
from decmem.bench.figures import plot_attention, plot_cp, plot_data, plot_generate, plot_train
from decmem.bench.memory import plot_memory, targets_memory
from decmem.bench.targets import (
    format_targets,
    targets_attention,
    targets_cp,
    targets_data,
    targets_generate,
    targets_train,
)

PLOTS = {"attention": plot_attention, "generate": plot_generate, "cp": plot_cp, "data": plot_data, "train": plot_train,
         "memory": plot_memory}
TARGETS = {"attention": targets_attention, "generate": targets_generate, "cp": targets_cp, "data": targets_data,
           "train": targets_train, "memory": targets_memory}


def write_bench_outputs(kind: str, json_path: str | None, log=print) -> list[dict]:
    """From the rows at json_path: write <stem>.png and <stem>.targets.json, print the targets table; [] without json."""
    if not json_path:
        return []
    with open(json_path) as f:
        rows = json.load(f)                      # exactly what the bench wrote: the plot shows the saved numbers
    stem = os.path.splitext(json_path)[0]
    PLOTS[kind](rows, stem + ".png")
    targets = TARGETS[kind](rows)
    write_json(stem + ".targets.json", targets, indent=1)
    log(f"\n{format_targets(targets)}\n\nwrote {stem}.png and {stem}.targets.json")
    return targets
