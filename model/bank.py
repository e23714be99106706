"""MemoryBank: every layer's bank tensors for a growing video, plus the bank frames' cameras.

Training builds it in one parallel pass over a clip; generation grows it one
encoded chunk at a time (``append``). Buffers grow by doubling so an append
costs O(chunk), not O(bank). ``save``/``load`` pause and resume a rollout.
"""
from __future__ import annotations

import os

import torch

from decmem.model.memory import BankLayer


class MemoryBank:
    """Per-layer K/V and pooled block keys of frames [frame_offset, frame_offset + frames)."""

    def __init__(self, layers: list[BankLayer], K: torch.Tensor, c2w: torch.Tensor, frame_offset: int = 0):
        self._k = [l.k for l in layers]            # each [B, H, cap, N_f, d]
        self._v = [l.v for l in layers]
        self._kp = [l.k_pool for l in layers]      # each [B, H, cap, n_b, d]
        self._vp = [l.v_pool for l in layers]
        self._K, self._c2w = K, c2w                # [B, cap, 3, 3], [B, cap, 4, 4]
        self.frames = layers[0].k.shape[2] if layers else 0
        self.frame_offset = frame_offset

    # ----------------------------------------------------------------------------
    # Views
    # ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._k)

    def layer(self, i: int) -> BankLayer:
        n = self.frames
        return BankLayer(self._k[i][:, :, :n], self._v[i][:, :, :n], self._kp[i][:, :, :n], self._vp[i][:, :, :n],
                         self.frame_offset)

    @property
    def K(self) -> torch.Tensor:
        return self._K[:, : self.frames]

    @property
    def c2w(self) -> torch.Tensor:
        return self._c2w[:, : self.frames]

    def last_kv(self, i: int, n: int):
        """Layer i's (k, v) of the last n frames [B, H, n', N_f, d] (n' <= n), or None if empty."""
        n = min(n, self.frames)
        if n <= 0:
            return None
        return self._k[i][:, :, self.frames - n:self.frames], self._v[i][:, :, self.frames - n:self.frames]

    def tokens(self) -> int:
        """Bank tokens per layer per sample."""
        return self.frames * (self._k[0].shape[3] if self._k else 0)

    # ----------------------------------------------------------------------------
    # Growth
    # ----------------------------------------------------------------------------

    def append(self, other: "MemoryBank") -> None:
        """Add the frames of ``other`` (the next frames in time) after this bank's frames."""
        if len(other) != len(self):
            raise ValueError(f"cannot append a bank of {len(other)} layers to one of {len(self)}")
        n, add = self.frames, other.frames
        cap = self._k[0].shape[2]
        if n + add > cap:
            new_cap = max(2 * cap, n + add)
            self._k = [_grow(t, n, new_cap, 2) for t in self._k]
            self._v = [_grow(t, n, new_cap, 2) for t in self._v]
            self._kp = [_grow(t, n, new_cap, 2) for t in self._kp]
            self._vp = [_grow(t, n, new_cap, 2) for t in self._vp]
            self._K, self._c2w = _grow(self._K, n, new_cap, 1), _grow(self._c2w, n, new_cap, 1)
        for i in range(len(self)):
            src = other.layer(i)
            self._k[i][:, :, n:n + add] = src.k
            self._v[i][:, :, n:n + add] = src.v
            self._kp[i][:, :, n:n + add] = src.k_pool
            self._vp[i][:, :, n:n + add] = src.v_pool
        self._K[:, n:n + add] = other.K
        self._c2w[:, n:n + add] = other.c2w
        self.frames = n + add

    # ----------------------------------------------------------------------------
    # Persistence
    # ----------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """One safetensors file (no pickle); written to a temporary name, then renamed."""
        from safetensors.torch import save_file

        tensors = {"K": self.K.contiguous(), "c2w": self.c2w.contiguous()}
        for i in range(len(self)):
            l = self.layer(i)
            tensors[f"layer{i}.k"], tensors[f"layer{i}.v"] = l.k.contiguous(), l.v.contiguous()
            tensors[f"layer{i}.k_pool"], tensors[f"layer{i}.v_pool"] = l.k_pool.contiguous(), l.v_pool.contiguous()
        meta = {"format": "decmem-memory-bank/2", "layers": str(len(self)), "frames": str(self.frames),
                "frame_offset": str(self.frame_offset)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, device="cpu") -> "MemoryBank":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "decmem-memory-bank/2":
                raise ValueError(f"{path}: not a DecMem memory bank of this version (metadata format="
                                 f"{meta.get('format')!r}, expected 'decmem-memory-bank/2')")
            n = int(meta["layers"])
            layers = [BankLayer(*(f.get_tensor(f"layer{i}.{name}") for name in ("k", "v", "k_pool", "v_pool")))
                      for i in range(n)]
            return cls(layers, f.get_tensor("K"), f.get_tensor("c2w"), int(meta.get("frame_offset", 0)))


def _grow(t: torch.Tensor, n: int, cap: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = cap
    out = t.new_empty(shape)
    out.narrow(dim, 0, n).copy_(t.narrow(dim, 0, n))
    return out
