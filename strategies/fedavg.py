"""FedAvg (McMahan et al., 2017): the baseline every volume ratio is measured against.

Each sampled client receives the whole model (trainable weights and float buffers, one flat array
each) and returns its locally trained copy; the server takes the sample-weighted mean. Under the
wire codecs the client returns the encoded change instead, and a client that holds the previous
global model receives the round's encoded change of the weights (`FedcmdStrategy.publish`).
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
        head, broadcast = self.sync_head(server_round, partition_id)
        if head is None:
            return model_content(self.weights, self.buffers)
        content = RecordDict({"sync": head, "weights": self.dense_record("weights", self.weights, broadcast)})
        if self.buffers.size:
            content["buffers"] = vector_record(self.buffers)
        return content

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> Any:
        return self.read_values(content, "weights", self.weights), self.read_buffer_values(content)

    def update_pairs(self, update: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(update[0], self.weights), (update[1], self.buffers)]

    def aggregate(self, server_round: int, updates: list[tuple[int, Any]]) -> None:
        counts = [n for _, (n, _) in updates]
        before = self.weights
        self.weights = weighted_mean([u[0] for _, (_, u) in updates], counts)
        if self.buffers.size:
            self.buffers = weighted_mean([u[1] for _, (_, u) in updates], counts)
        self.publish(server_round, before, {"weights": np.arange(self.weights.size)})
