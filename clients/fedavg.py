"""FedAvg client: receive the model, train locally, send the whole model back (through the wire
codecs: `clients.common.Downlink`, `clients.common.Uplink`).

Algorithms that only change the local objective reuse it with a `penalty`: given the global
weights received, the term added to every step's loss (FedProx's proximal term, clients/fedprox.py).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Context, MetricRecord, RecordDict
from torch import nn

from clients.common import Downlink, Uplink, train_locally
from fedcmd import task
from fedcmd.wire import read_buffers

Penalty = Callable[[np.ndarray], Callable[[nn.Module], torch.Tensor] | None]


def train(
    content: RecordDict, context: Context, config: Mapping[str, Any], partition_id: int, penalty: Penalty | None = None
) -> RecordDict:
    weight_layout, buffer_layout = task.layouts(config)
    downlink = Downlink(content, context, config)
    weights = downlink.values("weights", weight_layout.numel)
    downlink.keep(weights)
    buffers = read_buffers(content, buffer_layout.numel)
    uplink = Uplink(config, partition_id, weights, buffers, {"weights": None, "buffers": None})
    _, _, metrics = train_locally(
        config,
        partition_id,
        weights,
        buffers,
        context=context,
        uplink=uplink,
        penalty=penalty(weights) if penalty is not None else None,
    )
    reply = uplink.content
    reply["metrics"] = MetricRecord({**metrics, **({"model-version": downlink.version} if downlink.head else {})})
    return reply
