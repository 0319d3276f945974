"""Flatten a model's trainable parameters (or float buffers) into one vector and back.

Tensor boundaries are int64 offsets, so positions beyond 2^31 (and 2^24, where float32 indices
break) are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: np.ndarray  # int64, length len(names) + 1

    @classmethod
    def from_module(cls, module: nn.Module, kind: str = "parameters") -> "ParamLayout":
        """Layout of `module`'s trainable parameters (named_parameters order) or float buffers."""
        if kind == "parameters":
            items = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        elif kind == "buffers":
            items = [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        else:
            raise ValueError(f"kind must be 'parameters' or 'buffers', got {kind!r}")
        sizes = np.array([t.numel() for _, t in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(tuple(n for n, _ in items), tuple(tuple(t.shape) for _, t in items), offsets)

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    @property
    def tensor_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def _tensors(self, module: nn.Module) -> list[torch.Tensor]:
        found = dict(module.named_parameters())
        found.update(dict(module.named_buffers()))
        try:
            return [found[n] for n in self.names]
        except KeyError as err:
            raise ValueError(f"module has no tensor {err.args[0]!r} of this layout") from err

    def flatten(self, module: nn.Module) -> np.ndarray:
        """A float32 copy of the module's tensors of this layout, concatenated."""
        tensors = self._tensors(module)
        if not tensors:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            return torch.cat([t.detach().reshape(-1).float() for t in tensors]).numpy().copy()

    def load(self, module: nn.Module, vec: np.ndarray) -> None:
        """Write `vec` into the module's tensors in place."""
        vec = np.asarray(vec)
        if vec.shape != (self.numel,):
            raise ValueError(f"vector has shape {vec.shape}, layout needs ({self.numel},)")
        source = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
        with torch.no_grad():
            for t, start, stop in zip(self._tensors(module), self.offsets[:-1], self.offsets[1:]):
                t.copy_(source[start:stop].view_as(t))

    def split(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        return {n: vec[s:e].reshape(shape) for n, shape, s, e in
                zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])}
