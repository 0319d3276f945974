"""What every fedcmd strategy shares: cohorts, node discovery, accounting and reply checks.

A strategy holds the global model as two flat float32 vectors (`weights`: trainable parameters in
`named_parameters` order; `buffers`: floating-point buffers such as BatchNorm statistics) and
subclasses Flower's message-based `Strategy`. Subclasses say what a sampled client receives
(`train_content`), how a reply is read (`parse_reply`) and how accepted replies become the next
global model (`aggregate`); this class records every message in the accountant and rejects
replies that are malformed, non-finite or from clients it did not ask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcmd.accountant import VolumeAccountant
from fedcmd.sampling import sample_cohort

log = logging.getLogger("fedcmd")

# Run-config keys a client needs to load its data and train; sent in every train message.
CLIENT_KEYS = (
    "dataset", "data-dir", "download", "synthetic-train-size", "synthetic-test-size", "synthetic-shape",
    "partition", "dirichlet-alpha", "classes-per-client", "num-clients", "data-seed", "model",
    "local-epochs", "local-steps", "batch-size", "lr", "momentum", "weight-decay", "optimizer", "adam-beta1",
    "adam-beta2", "adam-eps", "optimizer-state", "seed", "strategy",
    "cmd-embedded-training",
)


class ReplyError(ValueError):
    """A client reply that cannot be used: it is rejected and counted, the model is untouched."""


def vector_record(values: np.ndarray) -> ArrayRecord:
    """One flat array under the key `values`: one Flower Array costs ~0.5 KB of headers, so
    strategies send few, large arrays."""
    return ArrayRecord({"values": Array(np.ascontiguousarray(values))})


def read_vector(content: RecordDict, key: str, length: int, dtype=np.float32) -> np.ndarray:
    """The `values` array of record `key`, checked for presence, dtype, length and finiteness."""
    if key not in content or not isinstance(content[key], ArrayRecord) or "values" not in content[key]:
        raise ReplyError(f"reply has no '{key}' array")
    values = content[key]["values"].numpy()
    if values.dtype != np.dtype(dtype) or values.ndim != 1:
        raise ReplyError(f"'{key}' must be a flat {np.dtype(dtype).name} array, got {values.dtype} {values.shape}")
    if values.size != length:
        raise ReplyError(f"'{key}' has {values.size} values, expected {length}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ReplyError(f"'{key}' holds NaN or Inf")
    return values


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Sample-weighted mean, accumulated in float64 so the order of clients does not matter."""
    total = np.zeros(vectors[0].shape, dtype=np.float64)
    for vec, w in zip(vectors, weights):
        total += w * vec.astype(np.float64, copy=False)
    return (total / float(sum(weights))).astype(np.float32)


@dataclass
class RoundLog:
    sampled: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    train_loss: float = float("nan")
    train_seconds: float = 0.0  # sum over accepted replies of the clients' own optimizer-step time


class FedcmdStrategy(Strategy):
    """Base of fedcmd's strategies; see the module docstring."""

    name = "base"

    def __init__(self, weights: np.ndarray, buffers: np.ndarray, config: dict[str, Any],
                 accountant: VolumeAccountant | None = None) -> None:
        self.weights = np.asarray(weights, dtype=np.float32).copy()
        self.buffers = np.asarray(buffers, dtype=np.float32).copy()
        self.config = config
        self.accountant = accountant if accountant is not None else VolumeAccountant()
        self.node_of: dict[int, int] = {}        # partition id -> Flower node id
        self.partition_of: dict[int, int] = {}   # Flower node id -> partition id
        self.rounds: dict[int, RoundLog] = {}
        # Set by the server when clients keep local-training state: the run's token and where
        # clients keep copies of that state for resumed runs (clients/common.py); sent with the config.
        self.run_info: dict[str, str] = {}

    # ----- what subclasses define -------------------------------------------------------------
    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        raise NotImplementedError

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> Any:
        raise NotImplementedError

    def aggregate(self, server_round: int, updates: list[tuple[int, Any]]) -> None:
        raise NotImplementedError

    def on_reply_accepted(self, server_round: int, partition_id: int, update: Any) -> None:
        """Hook for per-client bookkeeping once a reply passed every check."""

    def on_reply_rejected(self, server_round: int, partition_id: int) -> None:
        """Hook: a client's reply was an error, malformed or non-finite."""

    def on_node_changed(self, partition_id: int) -> None:
        """Hook: a partition is now served by a different node (e.g. a restarted SuperNode)."""

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Per-round figures for the metrics table (e.g. frozen or embedded fraction)."""
        return {}

    # ----- shared mechanics ------------------------------------------------------------------
    def cohort(self, server_round: int) -> np.ndarray:
        c = self.config
        return sample_cohort(c["num-clients"], c["fraction-train"], c["seed"], server_round)

    def register_node(self, node_id: int, partition_id: int) -> None:
        """Map a node to its data partition; a node that reconnects under a new id replaces the old."""
        old = self.node_of.get(partition_id)
        if old is not None and old != node_id:
            self.partition_of.pop(old, None)
            self.on_node_changed(partition_id)
        self.node_of[partition_id] = node_id
        self.partition_of[node_id] = partition_id

    def forget_node(self, node_id: int) -> None:
        """A node left: whatever comes back for its partition may have lost its state."""
        partition_id = self.partition_of.pop(node_id, None)
        if partition_id is not None and self.node_of.get(partition_id) == node_id:
            del self.node_of[partition_id]
            self.on_node_changed(partition_id)

    def client_config(self, server_round: int) -> ConfigRecord:
        values = {key: self.config[key] for key in CLIENT_KEYS}
        values.update(self.run_info)
        values["server-round"] = server_round
        return ConfigRecord(values)

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                        grid: Grid) -> Iterable[Message]:
        log_ = self.rounds.setdefault(server_round, RoundLog())
        log_.sampled = [int(p) for p in self.cohort(server_round)]
        messages = []
        for pid in log_.sampled:
            node = self.node_of.get(pid)
            if node is None:
                log_.rejected.append((pid, "unreachable: no node holds this partition"))
                continue
            content = self.train_content(server_round, pid)
            content["config"] = self.client_config(server_round)
            msg = Message(content, dst_node_id=node, message_type="train", group_id=str(server_round))
            self.accountant.record_message(server_round, pid, "down", msg)
            log_.sent.append(pid)
            messages.append(msg)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        log_ = self.rounds.setdefault(server_round, RoundLog())
        updates, losses, seen = [], [], set()
        for reply in replies:
            pid = self.partition_of.get(reply.metadata.src_node_id)
            if pid is None or pid not in log_.sent or pid in seen:
                log.warning("round %d: ignoring a reply from node %s that was not asked or answered twice",
                            server_round, reply.metadata.src_node_id)
                continue
            seen.add(pid)
            self.accountant.record_message(server_round, pid, "up", reply)
            try:
                if reply.has_error():
                    reason = reply.error.reason
                    raise ReplyError("client error: " + (reason[:300] + " ..." if len(reason) > 300 else reason))
                update = self.parse_reply(server_round, pid, reply.content)
                metrics = reply.content.get("metrics")
                if not isinstance(metrics, MetricRecord) or not metrics.get("num-examples", 0) > 0:
                    raise ReplyError("reply lacks a positive 'num-examples' metric")
            except ReplyError as err:
                log.warning("round %d: rejected reply of client %d: %s", server_round, pid, err)
                log_.rejected.append((pid, str(err)))
                self.on_reply_rejected(server_round, pid)
                continue
            updates.append((pid, (float(metrics["num-examples"]), update)))
            losses.append(float(metrics.get("train-loss", float("nan"))))
            log_.train_seconds += float(metrics.get("train-seconds", 0.0))
            log_.accepted.append(pid)
            self.on_reply_accepted(server_round, pid, update)
        for pid in set(log_.sent) - seen:
            log_.rejected.append((pid, "no reply before the round timeout"))
        if updates:
            self.aggregate(server_round, updates)
            log_.train_loss = float(np.nanmean(losses)) if losses else float("nan")
        else:
            log.warning("round %d: no usable reply; the global model is unchanged", server_round)
        return self.global_arrays(), MetricRecord({"accepted": len(updates)})

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord({"weights": Array(self.weights), "buffers": Array(self.buffers)})

    # Central evaluation happens on the server (fedcmd.server); no client-side evaluation rounds.
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("strategy %s: %d weights, %d buffer values", self.name, self.weights.size, self.buffers.size)
