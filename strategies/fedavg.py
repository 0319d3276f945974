"""FedAvg (McMahan et al., 2017): the baseline every volume ratio is measured against.

Each sampled client receives the whole model (trainable weights and float buffers, one flat array
each) and returns its locally trained copy; the server takes the sample-weighted mean. Under the
wire codecs the client returns the encoded change instead, and a client that holds the previous
global model receives the round's encoded change of the weights (`FedcmdStrategy.publish`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flwr.app import RecordDict

from fedcmd.aggregation import ExactMean
from fedcmd.wire import vector_record
from strategies.base import FedcmdStrategy


class DenseUpdate(NamedTuple):
    """A client's trained model: all N weights and the float buffers."""

    weights: np.ndarray
    buffers: np.ndarray


class FedAvg(FedcmdStrategy):
    """The sample-weighted mean of the sampled clients' trained models (module docstring)."""

    name = "fedavg"

    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        # The dense model (an empty buffer vector is left out); under a lossy codec-down, `sync` too.
        head, broadcast = self.sync_head(server_round, partition_id)
        weights = self.shared(
            ("weights", broadcast is None), lambda: self.dense_record("weights", self.weights, broadcast)
        )
        content = RecordDict({"weights": weights})
        if self.buffers.size:
            content["buffers"] = self.shared("buffers", lambda: vector_record(self.buffers))
        if head is not None:
            content["sync"] = head
        return content

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> DenseUpdate:
        return DenseUpdate(
            self.read_values(content, "weights", self.weights.size, lambda: self.weights),
            self.read_buffer_values(content),
        )

    def update_pairs(self, update: DenseUpdate) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(update.weights, self.weights), (update.buffers, self.buffers)]

    def accumulators(self, server_round: int, max_examples: int) -> dict[str, ExactMean]:
        return {"weights": self.mean_over(slice(None), max_examples), **self.buffer_mean(max_examples)}

    def aggregate(self, server_round: int, means: dict[str, ExactMean]) -> None:
        before = self.weights if self.codec_down.lossless else self.weights.copy()  # publish's reference
        means.pop("weights").mean_into(self.weights)
        if "buffers" in means:
            means.pop("buffers").mean_into(self.buffers)
        self.publish(server_round, before, {"weights": slice(None)})
