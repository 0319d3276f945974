"""Local training and evaluation: plain PyTorch loops shared by every strategy and experiment."""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from fedcmd.config import OPTIMIZER_NAMES


def default_device() -> torch.device:
    """CUDA when PyTorch sees a GPU (unless FEDCMD_DEVICE says otherwise), else the CPU."""
    name = os.environ.get("FEDCMD_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str = "sgd",
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """`sgd` (with momentum) or `adam`. Weight decay is PyTorch's coupled L2 term in both, which is
    what `torch.optim.Adam(weight_decay=...)` does and what the APF paper's LeNet-5 setting used
    (Adam, lr 0.001, weight decay 0.01, PyTorch's default betas and eps)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZER_NAMES)}")


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches of `epochs` passes over n samples, each pass a new permutation drawn from one
    generator seeded with `seed` (the last batch of a pass may be short)."""
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


class BatchStream:
    """A client's endless shuffled stream of index batches over its n samples.

    Pass p is the permutation drawn from a generator seeded by (seed, partition, p), so the stream
    is a pure function of its position (pass, offset): a client that stores those two integers can
    continue it in a later round, process or run. Batches are full-sized: one that would run past
    the end of a pass is completed from the next pass, so no sample is drawn twice within a pass.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, partition_id: int, pass_index: int = 0, offset: int = 0
    ) -> None:
        if n <= 0:
            raise ValueError("BatchStream: empty partition")
        if not 0 <= offset < n or pass_index < 0:
            raise ValueError(f"BatchStream: position (pass {pass_index}, offset {offset}) is outside a pass of {n}")
        self.n, self.batch_size, self.seed, self.partition_id = n, batch_size, int(seed), int(partition_id)
        self.pass_index, self.offset = int(pass_index), int(offset)
        self._order = self._permutation(self.pass_index)

    def _permutation(self, pass_index: int) -> torch.Tensor:
        seed = int(np.random.default_rng([self.seed, self.partition_id, pass_index, 0x57E4]).integers(2**62))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))

    @property
    def position(self) -> tuple[int, int]:
        return self.pass_index, self.offset

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self.offset)
            parts.append(self._order[self.offset : self.offset + take])
            self.offset += take
            need -= take
            if self.offset == self.n:
                self.pass_index, self.offset = self.pass_index + 1, 0
                self._order = self._permutation(self.pass_index)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take(self, steps: int) -> Iterator[torch.Tensor]:
        for _ in range(steps):
            yield self.next_batch()


def run_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Iterable[torch.Tensor],
    optimiser: torch.optim.Optimizer,
    step_hook: Callable[[nn.Module], None] | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimiser step per index batch; returns the mean loss and the step count.

    `step_hook(model)` runs after every optimiser step; strategies use it to hold parameters that
    must not move (frozen APF scalars, frozen embedded CMD weights). `penalty(model)`, a scalar
    tensor, is added to every step's objective (FedProx's proximal term); the loss reported is the
    data loss alone, comparable across strategies.
    """
    if len(x) != len(y):
        raise ValueError(f"train: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("train: empty training set")
    device = next(model.parameters()).device
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, steps = 0.0, 0
    for batch in batches:
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[batch].to(device)), y[batch].to(device))
        (loss + penalty(model) if penalty is not None else loss).backward()
        optimiser.step()
        if step_hook is not None:
            step_hook(model)
        total_loss += float(loss.detach())
        steps += 1
    return {"train_loss": total_loss / max(steps, 1), "steps": steps}


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    step_hook: Callable[[nn.Module], None] | None = None,
) -> dict[str, float]:
    """Run `epochs` passes of mini-batch SGD over (x, y) with a fresh optimiser; mean loss and steps.

    The batch order comes from a generator seeded with `seed` alone, so a client's local run is
    reproducible whatever else the process did before.
    """
    optimiser = make_optimizer(model.parameters(), "sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)
    return run_steps(model, x, y, epoch_batches(len(x), batch_size, epochs, seed), optimiser, step_hook)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on (x, y)."""
    device = next(model.parameters()).device
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        target = y[start : start + batch_size].to(device)
        total_loss += float(loss_fn(logits, target))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = max(len(x), 1)
    return total_loss / n, correct / n
