"""What every fedcmd client shares: its data, a model kept for the process, local training."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fedcmd import task
from fedcmd.flat import ParamLayout
from fedcmd.sampling import local_seed
from fedcmd.training import default_device, train


@functools.lru_cache(maxsize=2)
def _model(model_name: str, in_shape: tuple, num_classes: int) -> nn.Module:
    from fedcmd.models import build_model

    return build_model(model_name, in_shape=in_shape, num_classes=num_classes).to(default_device())


def local_model(config: Mapping[str, Any]) -> tuple[nn.Module, ParamLayout, ParamLayout]:
    """The process's model object for this config (reused across rounds: only values change)."""
    data = task.dataset(config)
    weight_layout, buffer_layout = task.layouts(config)
    return _model(config["model"], tuple(data.in_shape), data.num_classes), weight_layout, buffer_layout


def train_locally(config: Mapping[str, Any], partition_id: int, weights: np.ndarray, buffers: np.ndarray,
                  step_hook: Callable[[nn.Module], None] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Load (weights, buffers) into the model, train on this client's partition, return the result."""
    torch.set_num_threads(1)  # one core per client: clients run side by side on a shared machine
    model, weight_layout, buffer_layout = local_model(config)
    weight_layout.load(model, weights)
    buffer_layout.load(model, buffers)
    x, y = task.client_data(config, partition_id)
    result = train(model, x, y, epochs=config["local-epochs"], batch_size=config["batch-size"],
                   lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight-decay"],
                   seed=local_seed(config["seed"], config["server-round"], partition_id), step_hook=step_hook)
    metrics = {"num-examples": float(len(y)), "train-loss": float(result["train_loss"])}
    return weight_layout.flatten(model), buffer_layout.flatten(model), metrics


def hold_fixed(layout: ParamLayout, model: nn.Module, index: np.ndarray, values: np.ndarray
               ) -> Callable[[nn.Module], None] | None:
    """A step hook that writes `values` back into the flat positions `index` after every step.

    Used for parameters a strategy keeps out of local training (frozen embedded CMD weights, frozen
    APF scalars). Gradients still flow through them; only their values are held.
    """
    if index.size == 0:
        return None
    params = dict(model.named_parameters())
    tensor_of = np.searchsorted(layout.offsets, index, side="right") - 1
    held = []
    for t in np.unique(tensor_of):
        sel = tensor_of == t
        param = params[layout.names[t]]
        local = torch.from_numpy(index[sel] - layout.offsets[t]).to(param.device)
        held.append((param, local, torch.from_numpy(np.ascontiguousarray(values[sel])).to(param.device)))

    @torch.no_grad()
    def hook(_: nn.Module) -> None:
        for param, local, vals in held:
            param.view(-1)[local] = vals

    return hook
