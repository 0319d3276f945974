"""FedAvg (McMahan et al., 2017): the baseline every volume ratio is measured against.

Each sampled client receives the whole model (trainable weights and float buffers, one flat array
each) and returns its locally trained copy; the server takes the sample-weighted mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from strategies.base import FedcmdStrategy, ReplyError, read_vector, vector_record, weighted_mean


def model_content(weights: np.ndarray, buffers: np.ndarray) -> RecordDict:
    """The dense model as a FedAvg message carries it (an empty buffer vector is left out)."""
    content = RecordDict({"weights": vector_record(weights)})
    if buffers.size:
        content["buffers"] = vector_record(buffers)
    return content


def read_buffers(content: RecordDict, length: int) -> np.ndarray:
    if length:
        return read_vector(content, "buffers", length)
    if "buffers" in content:  # the sender has no buffers to send: whatever came is not the model's
        raise ReplyError("'buffers' sent for a model without buffers")
    return np.zeros(0, dtype=np.float32)


class FedAvg(FedcmdStrategy):
    name = "fedavg"

    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        return model_content(self.weights, self.buffers)

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> Any:
        return read_vector(content, "weights", self.weights.size), read_buffers(content, self.buffers.size)

    def update_pairs(self, update: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(update[0], self.weights), (update[1], self.buffers)]

    def aggregate(self, server_round: int, updates: list[tuple[int, Any]]) -> None:
        counts = [n for _, (n, _) in updates]
        self.weights = weighted_mean([u[0] for _, (_, u) in updates], counts)
        if self.buffers.size:
            self.buffers = weighted_mean([u[1] for _, (_, u) in updates], counts)
