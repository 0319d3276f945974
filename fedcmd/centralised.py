"""CMD beside a centralised training loop (paper Tables 1-2), with EMA and SWA as baselines.

Callbacks have `on_step(model)` (after every optimiser step) and/or `on_epoch_end(epoch)`
(epochs count from 1); `train_with_callbacks` runs `fedcmd.training.train` and calls them.

- `CMDCallback`: online CMD on one flat snapshot per epoch. Snapshot 0 is the initial model, as on
  the federated server, so CMD is fitted at the end of epoch F; with observe_initial=False it is the
  end of epoch 1 (the jump away from the random initialisation is then not part of the fit).
  `cmd_model()` evaluates the CMD-modelled network. With an
  `EmbeddingSchedule`, embedded weights are overwritten with their CMD value at every epoch end,
  as in the authors' code: they still receive gradient steps within an epoch.
- `EMACallback`: exponential moving average of the weights after every step.
- `SWACallback`: plain average of the end-of-epoch weights from a start epoch on.
Both use `torch.optim.swa_utils.AveragedModel`. Models with BatchNorm would also need
`torch.optim.swa_utils.update_bn` before evaluating an average; LeNet-5 has none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fedcmd.cmd import EmbeddingSchedule, OnlineCMD
from fedcmd.flat import ParamLayout
from fedcmd.training import train


class CMDCallback:
    """Online CMD of `model`'s trainable parameters, optionally embedded into training."""

    def __init__(
        self,
        model: nn.Module,
        n_modes: int | None,
        warmup: int,
        *,
        embed: EmbeddingSchedule | None = None,
        observe_initial: bool = True,
        n_samples: int = 1000,
        seed: int = 0,
        **cmd_options: Any,
    ) -> None:
        self.model = model
        self.layout = ParamLayout.from_module(model, kind="parameters")
        self.online = OnlineCMD(
            self.layout.numel, n_modes, warmup, n_samples, seed, tensor_sizes=self.layout.tensor_sizes, **cmd_options
        )
        self.schedule = embed
        self.epoch = 0
        self.embedded_index = np.zeros(0, dtype=np.int64)
        if observe_initial:
            self.online.observe(self.layout.flatten(model))

    @property
    def embedded_fraction(self) -> float:
        return self.embedded_index.size / self.layout.numel

    def on_epoch_end(self, epoch: int) -> np.ndarray:
        """Observe the epoch's weights; embed and overwrite as the schedule says. Returns new indices."""
        if epoch <= self.epoch:
            raise ValueError(
                f"epoch {epoch} was already observed (last was {self.epoch}): "
                "observing a snapshot twice would bias the CMD statistics"
            )
        self.epoch = epoch
        theta = self.layout.flatten(self.model)
        self.online.observe(theta)
        if self.schedule is None:
            return np.zeros(0, dtype=np.int64)
        new = self.schedule.step(self.online)
        if new.size:
            self.embedded_index = np.union1d(self.embedded_index, new)
        if self.embedded_index.size:
            theta[self.embedded_index] = self.online.model_weights(theta, self.embedded_index)
            self.layout.load(self.model, theta)
        return new

    @contextmanager
    def cmd_model(self) -> Iterator[nn.Module]:
        """Within the block, `model` holds the CMD-modelled weights; its own weights come back after."""
        saved = self.layout.flatten(self.model)
        self.layout.load(self.model, self.online.model_weights(saved))
        try:
            yield self.model
        finally:
            self.layout.load(self.model, saved)


class EMACallback:
    """`averaged` follows decay * averaged + (1 - decay) * weights after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def on_step(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)


class SWACallback:
    """`averaged` is the plain mean of the end-of-epoch weights of epochs start_epoch, start_epoch + 1, ..."""

    def __init__(self, model: nn.Module, start_epoch: int) -> None:
        if start_epoch < 1:
            raise ValueError(f"start_epoch must be >= 1, got {start_epoch!r}")
        self.model = model
        self.start_epoch = start_epoch
        self.averaged = AveragedModel(model)

    def on_epoch_end(self, epoch: int) -> None:
        if epoch >= self.start_epoch:
            self.averaged.update_parameters(self.model)


def train_with_callbacks(
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
    callbacks: Sequence[Any] = (),
) -> dict[str, float]:
    """`fedcmd.training.train` for `epochs` epochs (one optimiser, momentum kept across epochs),
    calling each callback's `on_step(model)` after every step and `on_epoch_end(epoch)` after the
    last step of every epoch, in the order given."""
    steps_per_epoch = -(-len(x) // batch_size)  # train() makes ceil(len(x) / batch_size) steps per epoch
    on_step = [c.on_step for c in callbacks if hasattr(c, "on_step")]
    on_epoch_end = [c.on_epoch_end for c in callbacks if hasattr(c, "on_epoch_end")]
    steps = 0

    def hook(stepped: nn.Module) -> None:
        nonlocal steps
        steps += 1
        for callback in on_step:
            callback(stepped)
        if steps % steps_per_epoch == 0:
            for callback in on_epoch_end:
                callback(steps // steps_per_epoch)
            stepped.train()  # an epoch callback may have evaluated the model

    result = train(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        step_hook=hook,
    )
    if result["steps"] != epochs * steps_per_epoch:
        raise RuntimeError(
            f"train made {result['steps']} steps, expected {epochs} x {steps_per_epoch}: epoch ends were misplaced"
        )
    return result
