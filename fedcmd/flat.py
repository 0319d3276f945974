"""Flatten a model's trainable parameters (or floating-point buffers) into one vector and back.

CMD, APF and the wire format all see a model as one flat float32 vector theta in R^N. A
`ParamLayout` fixes which tensors make up theta, in which order, and where each one starts.
Tensor boundaries are int64 offsets, so positions beyond 2^24 (where float32 indices break) and
2^31 are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LAYOUT_KINDS = ("parameters", "buffers")


@dataclass(frozen=True, eq=False)
class ParamLayout:
    """Names, shapes and int64 start offsets of the tensors that make up a flat vector.

    kind="parameters": trainable parameters (requires_grad) in `named_parameters` order.
    kind="buffers": floating-point buffers (BatchNorm running statistics); integer buffers such as
    `num_batches_tracked` are counters, not values to average or model, and are left out.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: np.ndarray  # int64, length len(names) + 1; tensor k is theta[offsets[k]:offsets[k + 1]]
    kind: str = "parameters"

    @classmethod
    def from_module(cls, module: nn.Module, kind: str = "parameters") -> "ParamLayout":
        items = _named_tensors(module, kind)
        sizes = np.array([t.numel() for _, t in items], dtype=np.int64)
        offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes, dtype=np.int64)])
        return cls(tuple(n for n, _ in items), tuple(tuple(t.shape) for _, t in items), offsets, kind)

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    @property
    def tensor_sizes(self) -> np.ndarray:
        """int64 number of elements of each tensor, in layout order."""
        return np.diff(self.offsets)

    def tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The module's live tensors of this layout, checked against the layout's names and shapes."""
        found = dict(_named_tensors(module, self.kind))
        tensors = []
        for name, shape in zip(self.names, self.shapes):
            tensor = found.get(name)
            if tensor is None:
                raise ValueError(f"module has no {self.kind[:-1]} {name!r} of this layout")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{self.kind[:-1]} {name!r} has shape {tuple(tensor.shape)}, layout says {shape}")
            tensors.append(tensor)
        return tensors

    def flatten(self, module: nn.Module) -> np.ndarray:
        """A float32 copy of the module's tensors of this layout, concatenated (one torch.cat)."""
        tensors = self.tensors(module)
        if not tensors:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        return flat.cpu().numpy()

    def load(self, module: nn.Module, vec: np.ndarray | torch.Tensor) -> None:
        """Write `vec` (length numel) into the module's tensors in place, outside autograd."""
        if isinstance(vec, torch.Tensor):
            source = vec.detach().cpu()
        else:  # torch.from_numpy warns on read-only arrays (e.g. decoded messages): copy those
            source = torch.from_numpy(np.require(vec, requirements=["C", "W"]))
        if tuple(source.shape) != (self.numel,):
            raise ValueError(f"vec has shape {tuple(source.shape)}, this layout needs ({self.numel},)")
        with torch.no_grad():
            for tensor, start, stop in zip(self.tensors(module), self.offsets[:-1], self.offsets[1:]):
                tensor.copy_(source[start:stop].reshape(tensor.shape))

    def split(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        """Views of `vec` per tensor name, in the tensors' shapes (no copy)."""
        vec = np.asarray(vec)
        if vec.shape != (self.numel,):
            raise ValueError(f"vec has shape {vec.shape}, this layout needs ({self.numel},)")
        return {
            name: vec[start:stop].reshape(shape)
            for name, shape, start, stop in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])
        }


def _named_tensors(module: nn.Module, kind: str) -> list[tuple[str, torch.Tensor]]:
    if kind == "parameters":
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if kind == "buffers":
        return [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    raise ValueError(f"kind must be one of {LAYOUT_KINDS}, got {kind!r}")
