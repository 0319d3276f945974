"""FedAvg client: receive the model, train locally, send the whole model back (through the wire
codecs: `clients.common.Downlink`, `clients.common.Uplink`)."""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Context, MetricRecord, RecordDict

from clients.common import Downlink, Uplink, train_locally
from fedcmd import task
from strategies.base import read_buffers


def train(content: RecordDict, context: Context, config: Mapping[str, Any], partition_id: int) -> RecordDict:
    weight_layout, buffer_layout = task.layouts(config)
    downlink = Downlink(content, context, config)
    weights = downlink.values("weights", weight_layout.numel)
    downlink.keep(weights)
    buffers = read_buffers(content, buffer_layout.numel)
    uplink = Uplink(config, partition_id, weights, buffers, {"weights": None, "buffers": None})
    _, _, metrics = train_locally(config, partition_id, weights, buffers, context=context, uplink=uplink)
    reply = uplink.content
    reply["metrics"] = MetricRecord({**metrics, **({"model-version": downlink.version} if downlink.head else {})})
    return reply
