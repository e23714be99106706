"""Source readers: each converts one dataset's own layout into the canonical clip (DESIGN §2.1).

Every module in ``READERS`` has the same interface:
  ``find_inputs(root) -> list[dict]``  inputs under a local directory, sorted by their unique ``"id"``
                                       (a stable string without dots); descriptors are JSON-serialisable;
  ``read(desc) -> dict``               the validated canonical clip (``data_pipeline.clip.validate_clip``);
                                       problems raise ValueError / FileNotFoundError naming the file and
                                       the line (text) or key (npz / json) and what was expected.
"""
from decmem.data_pipeline.readers import memory_maze, nerfstudio, re10k, worldmem

READERS = {"re10k": re10k, "nerfstudio": nerfstudio, "worldmem": worldmem, "memory_maze": memory_maze}


__all__ = ["READERS"]
