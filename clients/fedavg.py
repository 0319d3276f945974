"""FedAvg client: receive the model, train locally, send the whole model back."""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Context, MetricRecord, RecordDict

from clients.common import train_locally
from fedcmd import task
from strategies.fedavg import model_content, read_buffers
from strategies.base import read_vector


def train(content: RecordDict, context: Context, config: Mapping[str, Any], partition_id: int) -> RecordDict:
    weight_layout, buffer_layout = task.layouts(config)
    weights = read_vector(content, "weights", weight_layout.numel)
    buffers = read_buffers(content, buffer_layout.numel)
    weights, buffers, metrics = train_locally(config, partition_id, weights, buffers, context=context)
    reply = model_content(weights, buffers)
    reply["metrics"] = MetricRecord(metrics)
    return reply
