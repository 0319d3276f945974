"""Local training and evaluation: plain PyTorch loops shared by every strategy and experiment."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn


def default_device() -> torch.device:
    """CUDA when PyTorch sees a GPU (unless FEDCMD_DEVICE says otherwise), else the CPU."""
    name = os.environ.get("FEDCMD_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """Run `epochs` passes of mini-batch SGD over (x, y) and return the mean loss and step count.

    The batch order comes from a generator seeded with `seed` alone, so a client's local run is
    reproducible whatever else the process did before. `step_hook(model)` runs after every
    optimiser step; strategies use it to hold parameters that must not move (frozen APF scalars,
    frozen embedded CMD weights).
    """
    if len(x) != len(y):
        raise ValueError(f"train: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("train: empty training set")
    device = next(model.parameters()).device
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(int(seed))
    total_loss, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch].to(device)), y[batch].to(device))
            loss.backward()
            optimiser.step()
            if step_hook is not None:
                step_hook(model)
            total_loss += float(loss.detach())
            steps += 1
    return {"train_loss": total_loss / max(steps, 1), "steps": steps}


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
