"""Writing results: numbers formatted for tables, JSON that stays valid (no NaN), files replaced atomically."""
from __future__ import annotations

import json
import math

import numpy as np

from decmem.data_pipeline.storage import write_bytes_atomic


def fmt(x, spec: str) -> str:
    """``format(x, spec)``, or "n/a" for a missing or non-finite number."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def json_safe(x):
    """JSON-safe copy: numpy -> Python, non-finite floats -> None."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def write_json(path: str, obj, indent: int = 1) -> None:
    """Write obj as strict JSON (non-finite floats become null), replacing path atomically."""
    write_bytes_atomic(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False).encode())
