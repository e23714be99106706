"""Format name -> (find_inputs, read): every source reader behind one interface.

``find_inputs(INPUT) -> [descriptor]`` lists the inputs (JSON-serialisable dicts
with a unique ``id``); ``read(descriptor) -> canonical clip``. Modules load lazily
so a user without, say, MiniWorld installed can still preprocess RealEstate10K.
"""
from __future__ import annotations

import importlib

from decmem.data_pipeline.synthetic import synthetic_clip

FORMATS = ("re10k", "nerfstudio", "worldmem", "memory_maze", "render", "synthetic")


class _Synthetic:
    """Built-in numpy renderer (data_pipeline/synthetic.py): INPUT like 'clips=4,frames=64,hw=32x32,seed=0'."""

    @staticmethod
    def find_inputs(spec: str) -> list[dict]:
        opts = {"clips": 4, "frames": 64, "hw": "32x32", "seed": 0}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise ValueError(f"synthetic spec {spec!r}: expected key=value items, got {item!r}")
            k, v = item.split("=", 1)
            if k not in opts:
                raise ValueError(f"synthetic spec {spec!r}: unknown key {k!r}, expected one of {sorted(opts)}")
            opts[k] = v
        h, w = (int(x) for x in str(opts["hw"]).lower().split("x"))
        seed, n = int(opts["seed"]), int(opts["clips"])
        return [{"id": f"synthetic-{seed + i:05d}", "seed": seed + i, "frames": int(opts["frames"]), "hw": [h, w]}
                for i in range(n)]

    @staticmethod
    def read(desc: dict) -> dict:
        return synthetic_clip(desc["frames"], tuple(desc["hw"]), desc["seed"])


def get_source(fmt: str):
    """The reader module (or object) for a format name, with a clear error for unknown ones."""
    if fmt == "synthetic":
        return _Synthetic
    if fmt == "render":
        return importlib.import_module("decmem.data_pipeline.render")
    if fmt in FORMATS:
        readers = importlib.import_module("decmem.data_pipeline.readers")
        return readers.READERS[fmt]
    raise ValueError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
