"""FedProx client: FedAvg's client (clients/fedavg.py) with the proximal term
(mu/2) * ||w - w_global||^2 added to every local step's loss, w_global being the weights received.
Buffers (BatchNorm statistics) are not parameters and have no term. With mu = 0 it is FedAvg's
client exactly. The reported train loss is the data loss alone (fedcmd.training.run_steps)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Context, RecordDict
from torch import nn

from clients import fedavg


def proximal_term(mu: float, global_weights: np.ndarray) -> Callable[[nn.Module], torch.Tensor]:
    """(mu/2) * sum over trainable parameters of ||p - p_global||^2, p_global from the flat weights
    in `named_parameters` order (the order a model travels in)."""
    anchor = torch.from_numpy(np.array(global_weights, dtype=np.float32))
    anchors: list[torch.Tensor] = []

    def term(model: nn.Module) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        if not anchors:  # the global weights as tensors shaped like the parameters, on their device
            sizes = [p.numel() for p in params]
            if sum(sizes) != anchor.numel():
                raise ValueError(f"proximal term: {anchor.numel()} global weights for {sum(sizes)} parameters")
            anchors.extend(a.view_as(p).to(p.device) for a, p in zip(anchor.split(sizes), params))
        return 0.5 * mu * sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchors))

    return term


def train(content: RecordDict, context: Context, config: Mapping[str, Any], partition_id: int) -> RecordDict:
    mu = float(config["fedprox-mu"])
    return fedavg.train(
        content, context, config, partition_id, penalty=lambda weights: proximal_term(mu, weights) if mu > 0 else None
    )
