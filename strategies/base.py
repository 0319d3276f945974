"""What every fedcmd strategy shares: cohorts, node discovery, accounting and reply checks.

A strategy holds the global model as two flat float32 vectors (`weights`: trainable parameters in
`named_parameters` order; `buffers`: floating-point buffers such as BatchNorm statistics) and
subclasses Flower's message-based `Strategy`. Subclasses say what a sampled client receives
(`train_content`), how a reply is read (`parse_reply`) and how accepted replies become the next
global model (`aggregate`); this class records every message in the accountant and rejects
replies that are malformed, non-finite or from clients it did not ask.

Every client may lie. Decisions on what a reply must be (anything else is a counted rejection
with its reason, whatever the exception; nothing in a reply can end the run):
- A reply is matched to the train message it answers by `reply_to_message_id`, not by the node it
  claims to come from: a SuperLink error reply ("Node Unavailable") comes from the SuperLink's own
  node id, and a node has no say in which partition its reply counts for.
- It holds only the records its strategy reads (`reply_records`), each array record only its
  `values` array, and a `metrics` record with only the keys the strategy reads; integers that
  must be integers (store and model versions) are integers, not 1.5 or NaN.
- `num-examples` must equal the size of the partition the server assigned (the server derives
  every partition from the config): a client cannot buy itself weight in the mean. The weight
  used is the server's count.
- `train-loss` is a finite, non-negative number; it is only reported, never aggregated; so are
  `local-steps` and `train-seconds` when present.
- With `max-update-norm` > 0, the L2 norm of the reply's change from the model it was sent (over
  the values the client sends back) must not exceed it. Off by default: no bound suits every model
  and learning rate. This bounds how far one client can move the mean in a round; it is not
  Byzantine-robust aggregation (a client within the bound still shifts the mean by up to
  bound x its share of the examples, every round, and colluding clients add up).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcmd import task
from fedcmd.accountant import VolumeAccountant
from fedcmd.aggregation import ExactMean, RefusedValues
from fedcmd.checkpoint import CheckpointError, array_entry, by_round, entry, load_part, within
from fedcmd.codecs import CodecError, describe, with_error_feedback
from fedcmd.config import client_keys
from fedcmd.sampling import sample_cohort
from fedcmd.wire import (
    PAYLOAD_KEYS,
    ReplyError,
    all_finite,
    codec_rng,
    encoded_record,
    make_codec,
    read_buffers,
    read_encoded,
    read_vector,
    vector_record,
)

log = logging.getLogger("fedcmd")


def shown(value: Any, limit: int = 60) -> str:
    """A client's value for a log line or a rejection reason, cut short (a list may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def read_int(metrics: MetricRecord, key: str) -> int:
    """Metric `key`, which must be an integer (MetricRecord keeps int and float apart)."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReplyError(f"metric '{key}' must be an integer, got {shown(value)}")
    return value


def read_number(metrics: MetricRecord, key: str) -> float:
    """Metric `key`, which must be one finite number."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ReplyError(f"metric '{key}' must be a finite number, got {shown(value)}")
    return float(value)


def change_norm(pairs: Iterable[tuple[np.ndarray, np.ndarray]], chunk: int = 1 << 16) -> float:
    """L2 norm of (returned - sent) over all pairs, in float64 (float32 squares overflow near 1e19),
    a chunk at a time (no copy of a whole vector)."""
    total = 0.0
    for returned, sent in pairs:
        for lo in range(0, returned.size, chunk):
            diff = returned[lo : lo + chunk].astype(np.float64) - sent[lo : lo + chunk]
            total += float(np.dot(diff, diff))
    return float(np.sqrt(total))


@dataclass(frozen=True)
class Broadcast:
    """A round's downlink payloads under a lossy `codec-down`: the encoded change of the global
    weights that turns model version `version - 1` into `version` (key -> the codec's arrays)."""

    version: int
    arrays: dict[str, dict[str, np.ndarray]]


@dataclass
class RoundLog:
    sampled: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (node id, why discovery refused its claim)
    train_loss: float = float("nan")
    train_seconds: float = 0.0  # sum over accepted replies of the clients' own optimizer-step time


# Metrics every client sends: its example count (checked), and figures that are only reported
# (train loss; optimizer steps made and the seconds they took, clients/common.py).
REPORTED_METRICS = ("num-examples", "train-loss", "local-steps", "train-seconds")


class FedcmdStrategy(Strategy):
    """Base of fedcmd's strategies; see the module docstring."""

    name = "base"
    # What a reply may hold: records (besides `metrics`) and metric keys beyond REPORTED_METRICS.
    reply_records: tuple[str, ...] = ("weights", "buffers")
    reply_metrics: tuple[str, ...] = ()
    # Whether this class's own protocol tracks which global model each client holds (APF does);
    # if not, the base class does it when a lossy `codec-down` needs it (`sync_head`).
    own_model_versions = False

    def __init__(
        self,
        weights: np.ndarray,
        buffers: np.ndarray,
        config: dict[str, Any],
        accountant: VolumeAccountant | None = None,
    ) -> None:
        self.weights = np.asarray(weights, dtype=np.float32).copy()
        self.buffers = np.asarray(buffers, dtype=np.float32).copy()
        self.config = config
        self.accountant = accountant if accountant is not None else VolumeAccountant()
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id
        self.partition_of: dict[int, int] = {}  # Flower node id -> partition id
        self.rounds: dict[int, RoundLog] = {}
        # Set by the server when clients keep local-training state: the run's token and where
        # clients keep copies of that state for resumed runs (clients/common.py); sent with the config.
        self.run_info: dict[str, str] = {}
        # The wire codecs (module docstring of fedcmd.codecs; docs/protocols.md, "Wire codecs").
        self.codec_up, self.codec_down = make_codec(config, "up"), make_codec(config, "down")
        self.broadcast: Broadcast | None = None
        self.down_residual: np.ndarray | None = None  # topk downlink error feedback, over the weights
        self.held: dict[int, int] = {}  # partition -> model version it holds (lossy downlink)
        self.sent_version: dict[int, int] = {}  # partition -> model version sent this round

    def prepare(self) -> None:
        """Derive now, when the server starts, what the first round would otherwise pay for: the data
        partitions (replies' example counts are checked against them) and the model's tensor offsets."""
        task.partitions(self.config)
        self._offsets(0, self.weights.size)

    # ----- what subclasses define -------------------------------------------------------------
    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        """The records of partition `partition_id`'s train message in `server_round` (the base class
        adds `config`, sends it and counts it): the model or what the client lacks of it, as the
        strategy's protocol module says (`fedcmd/protocols/<name>.py`). Dense payloads go through
        `dense_record` (the downlink codec) and `sync_head`."""
        raise NotImplementedError

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> Any:
        """The strategy's typed update (a NamedTuple of its own) read from a reply's records, after the
        base class checked the metrics shared by all strategies; raise `ReplyError` saying what is
        wrong, and change nothing. Dense payloads are read through `read_values` (the uplink codec)."""
        raise NotImplementedError

    def accumulators(self, server_round: int, max_examples: int) -> dict[str, ExactMean]:
        """The means the round's accepted replies are added to as they arrive, by the name of the
        update field (of `parse_reply`'s NamedTuple) each one averages; built before the first reply
        from the model sent (`mean_over`, `buffer_mean`). `max_examples`: the round's clients' examples
        together. A field that is None in an update is not added."""
        raise NotImplementedError

    def aggregate(self, server_round: int, means: dict[str, ExactMean]) -> None:
        """Turn the means (at least one reply added to each) into the next global model
        (`self.weights`, `self.buffers`, which may be written in place); under a lossy `codec-down`,
        end with `publish`. Pop each mean once read: its accumulator is 8 bytes per value."""
        raise NotImplementedError

    def update_pairs(self, update: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """(values a reply returned, the values of the model sent that they replace), for the
        `max-update-norm` check; called before `aggregate`, while the global model is the one sent."""
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

    # ----- aggregation (fedcmd.aggregation) ------------------------------------------------------
    def _offsets(self, which: int, size: int) -> np.ndarray:
        """Tensor start offsets of the weights (0) or buffers (1) of the configured model; one
        segment when the vectors are not that model's (a strategy built on bare vectors, in tests)."""
        if not hasattr(self, "_layout_offsets"):
            try:
                layouts = task.layouts(self.config)
                self._layout_offsets = tuple(np.asarray(layout.offsets, dtype=np.int64) for layout in layouts)
            except Exception:  # no model to lay out: every vector is one segment
                self._layout_offsets = (np.zeros(1, np.int64), np.zeros(1, np.int64))
        offsets = self._layout_offsets[which]
        return offsets if offsets[-1] == size else np.zeros(1, np.int64)

    def mean_over(self, positions: np.ndarray | slice, max_examples: int, *, each: bool = False) -> ExactMean:
        """A mean of replies' values for `self.weights[positions]` (ascending indices or a slice), one
        grid per tensor (per value with `each`, for a few scattered weights such as CMD's references)."""
        offsets = self._offsets(0, self.weights.size)
        return ExactMean.over(self.weights, positions, offsets, max_examples, each=each)

    def buffer_mean(self, max_examples: int) -> dict[str, ExactMean]:
        """{"buffers": the mean of the replies' buffers}, or {} for a model without buffers."""
        if not self.buffers.size:
            return {}
        offsets = self._offsets(1, self.buffers.size)
        return {"buffers": ExactMean.over(self.buffers, slice(None), offsets, max_examples)}

    # ----- payloads shared by the messages of a round -------------------------------------------
    def shared(self, key: Any, build: Callable[[], Any]) -> Any:
        """`build()` once per round for `key`: every client that needs the same bytes gets the same
        record object (built, and sized by the accountant's sizer, once). Emptied when the round's
        replies are aggregated, so nothing outlives its round."""
        payloads = self.__dict__.setdefault("_payloads", {})
        if key not in payloads:
            payloads[key] = build()
        return payloads[key]

    # ----- shared mechanics ------------------------------------------------------------------
    def cohort(self, server_round: int) -> np.ndarray:
        c = self.config
        return sample_cohort(c["num-clients"], c["fraction-train"], c["seed"], server_round)

    def claim_refusal(self, node_id: int, partition_id: Any, live_nodes: set[int]) -> str | None:
        """Why node `node_id` may not serve `partition_id` (None: it may). Without a key binding the
        server cannot tell a restarted node from an impostor, so the first live node keeps it."""
        if isinstance(partition_id, bool) or not isinstance(partition_id, int):
            return f"partition id must be an integer, got {shown(partition_id)}"
        if not 0 <= partition_id < self.config["num-clients"]:
            return f"partition id {partition_id} is outside [0, {self.config['num-clients']})"
        holder = self.node_of.get(partition_id)
        if holder is not None and holder != node_id and holder in live_nodes:
            return f"partition {partition_id} is already served by live node {holder}"
        return None

    def register_node(self, node_id: int, partition_id: int) -> None:
        """Map a node to its data partition; a node that reconnects under a new id replaces the old."""
        old = self.node_of.get(partition_id)
        if old is not None and old != node_id:
            self.partition_of.pop(old, None)
            self.client_reset(partition_id)
        self.node_of[partition_id] = node_id
        self.partition_of[node_id] = partition_id

    def forget_node(self, node_id: int) -> None:
        """A node left: whatever comes back for its partition may have lost its state."""
        partition_id = self.partition_of.pop(node_id, None)
        if partition_id is not None and self.node_of.get(partition_id) == node_id:
            del self.node_of[partition_id]
            self.client_reset(partition_id)

    def client_reset(self, partition_id: int) -> None:
        """A partition's client may have lost its state (new node, resumed run): assume nothing of it."""
        self.held.pop(partition_id, None)
        self.on_node_changed(partition_id)

    def client_config(self, server_round: int) -> ConfigRecord:
        values = {key: self.config[key] for key in client_keys(self.name)}
        values.update(self.run_info)
        values["server-round"] = server_round
        return ConfigRecord(values)

    # ----- the wire codecs ---------------------------------------------------------------------
    def read_values(self, content: RecordDict, key: str, length: int, sent: Callable[[], np.ndarray]) -> np.ndarray:
        """A reply's `length` values of record `key`, where the server sent the values `sent()`: as
        they came (codec-up none: a read-only view of the reply's bytes, no copy), or the sent values
        plus the decoded change (both sides hold them exactly; `sent` is only called then)."""
        if self.codec_up.lossless:  # finiteness is checked where the values are added (`_add_update`)
            return read_vector(content, key, length, view=True, finite=False)
        values = sent() + read_encoded(content, key, length, self.codec_up)
        if not np.isfinite(values).all():
            raise ReplyError(f"'{key}': the decoded change overflows float32")
        return values

    def read_buffer_values(self, content: RecordDict) -> np.ndarray:
        """The reply's buffers (through the uplink codec like any dense values), or none for a
        model without buffers."""
        if not self.buffers.size:
            return read_buffers(content, 0)
        return self.read_values(content, "buffers", self.buffers.size, lambda: self.buffers)

    def publish(self, server_round: int, before: np.ndarray, positions: dict[str, np.ndarray | slice]) -> None:
        """After aggregation, under a lossy `codec-down`: encode the change of the global weights at
        `positions` (record key -> weight indices, ascending, or a slice) once for the round, and make the global
        weights what every client decodes: before + decode(encode(change)). The server's model is
        thereby exactly the one its clients rebuild. topk keeps the server's residual (error feedback).
        Clients that acknowledged model version `server_round - 1` get these bytes in the next round
        (`sync_head`); the others get the model's values as they are, in float32."""
        if self.codec_down.lossless:
            return
        arrays = {}
        for key, index in positions.items():
            change = self.weights[index] - before[index]
            rng = codec_rng(self.config, server_round, "down", -1, key)
            if self.codec_down.name == "topk":
                if self.down_residual is None:
                    self.down_residual = np.zeros(self.weights.size, dtype=np.float32)
                arrays[key], decoded, self.down_residual[index] = with_error_feedback(
                    self.codec_down, change, self.down_residual[index], rng
                )
            else:
                arrays[key] = self.codec_down.encode(change, rng)
                decoded = self.codec_down.decode(arrays[key], change.size)
            self.weights[index] = before[index] + decoded
        self.broadcast = Broadcast(server_round, arrays)

    def broadcast_for(self, server_round: int, held_version: int | None) -> Broadcast | None:
        """The broadcast a client holding `held_version` can apply in `server_round` (None: none can)."""
        b = self.broadcast
        if b is None or b.version != server_round - 1 or held_version != b.version - 1:
            return None
        return b

    def sync_head(self, server_round: int, partition_id: int) -> tuple[ConfigRecord | None, Broadcast | None]:
        """For strategies without model versions of their own (FedAvg, CMD), under a lossy
        `codec-down`: the message's `sync` record and the broadcast it carries. `delta`: the client
        holds the previous model version and adds the decoded change; `full`: the values as they
        are (first contact, missed rounds, a rejected reply, a new node). (None, None) otherwise."""
        if self.codec_down.lossless or self.own_model_versions:
            return None, None
        version = server_round - 1
        b = self.broadcast_for(server_round, self.held.get(partition_id))
        self.sent_version[partition_id] = version
        return ConfigRecord({"model-version": version, "kind": "delta" if b else "full"}), b

    def dense_record(self, key: str, values: np.ndarray, broadcast: Broadcast | None) -> ArrayRecord:
        """Record `key` of a train message: the broadcast's payload, or the values in float32."""
        return encoded_record(broadcast.arrays[key]) if broadcast is not None else vector_record(values)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None, grid: Grid
    ) -> Iterable[Message]:
        self.sent_version.clear()
        self.__dict__.get("_payloads", {}).clear()
        log_ = self.rounds.setdefault(server_round, RoundLog())
        log_.sampled = [int(p) for p in self.cohort(server_round)]
        messages = []
        # The messages themselves: the grid gives them their ids when it sends them, and replies are
        # matched by those ids. Emptied by aggregate_train, so never in a checkpoint.
        self.outbox = {server_round: {}}
        outbox = self.outbox[server_round]
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
            outbox[pid] = msg
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read, check and add each reply as it arrives (`replies` may be a stream: each reply is
        dropped once added), then make the next global model from the means.

        Nothing depends on the order replies arrive in: the means are exact (`fedcmd.aggregation`),
        figures summed over replies are summed with `math.fsum` (exactly rounded), and the round's
        lists and volume rows are sorted by partition at the end."""
        log_ = self.rounds.setdefault(server_round, RoundLog())
        outbox = getattr(self, "outbox", {}).pop(server_round, {})
        self.__dict__.get("_payloads", {}).clear()  # the round's shared payloads are sent
        # The grid gave the messages their ids when it sent them; their contents are its to drop now.
        asked = {m.metadata.message_id: (p, m.metadata.dst_node_id) for p, m in outbox.items()}
        asked.pop("", None)
        sent, outbox = list(outbox), None
        max_examples = sum(self.examples_of(pid) for pid in sent)
        means = self.accumulators(server_round, max_examples) if sent else {}
        answered: set[int] = set()
        losses, seconds = [], []
        first_row = len(self.accountant.rows)
        for reply in replies:
            pid, node = asked.get(reply.metadata.reply_to_message_id, (None, None))
            if pid is None or pid in answered:
                log.warning(
                    "round %d: ignoring a reply (from node %s) that answers no train message of this "
                    "round, or one already answered",
                    server_round,
                    reply.metadata.src_node_id,
                )
                continue
            answered.add(pid)
            self.accountant.record_message(server_round, pid, "up", reply)
            try:
                update, examples, loss, spent = self.read_reply(server_round, pid, reply, node)
                self._add_update(means, update, int(examples))
            except Exception as err:  # whatever a reply makes fail (TypeError, ...), the reply is at fault
                reason = str(err) if isinstance(err, ReplyError) else f"unreadable reply: {type(err).__name__}: {err}"
                reason = reason[:300] + " ..." if len(reason) > 300 else reason
                log.warning("round %d: rejected reply of client %d: %s", server_round, pid, reason)
                log_.rejected.append((pid, reason))
                self.held.pop(pid, None)
                self.on_reply_rejected(server_round, pid)
                continue
            losses.append(loss)
            seconds.append(spent)
            log_.accepted.append(pid)
            if pid in self.sent_version:  # the reply stated the model version it was sent (read_reply)
                self.held[pid] = self.sent_version[pid]
            self.on_reply_accepted(server_round, pid, update)
            reply = update = None  # before the next reply arrives: one reply held at a time
        for pid in sorted(set(log_.sent) - answered):
            log_.rejected.append((pid, "no reply before the round timeout"))
        # The round's records in partition order, whatever order the replies came in.
        log_.accepted.sort()
        log_.rejected.sort(key=lambda item: item[0])
        self.accountant.rows[first_row:] = sorted(self.accountant.rows[first_row:], key=lambda row: row.client)
        log_.train_seconds += math.fsum(seconds)
        if log_.accepted:
            self.aggregate(server_round, means)
            log_.train_loss = math.fsum(losses) / len(losses)
        else:
            log.warning("round %d: no usable reply; the global model is unchanged", server_round)
        means.clear()
        # The global model is `weights` and `buffers` (fedcmd.server reads them): no copy of it per round.
        return None, MetricRecord({"accepted": len(log_.accepted)})

    @staticmethod
    def _add_update(means: dict[str, ExactMean], update: Any, examples: int) -> None:
        """Add an update's vectors to the round's means, all or none (ReplyError naming the vector that
        was refused); a float vector no mean takes must still be finite."""
        added = []
        try:
            for key, values in update._asdict().items():
                if key in means and values is not None:
                    means[key].add(values, examples)
                    added.append((key, values))
                elif isinstance(values, np.ndarray) and values.dtype.kind == "f" and not all_finite(values):
                    raise ReplyError(f"'{key}' holds NaN or Inf")
        except RefusedValues as err:
            for key, values in added:
                means[key].remove(values, examples)
            raise ReplyError(f"'{key}': {err}") from None
        except BaseException:
            for key, values in added:
                means[key].remove(values, examples)
            raise

    def read_reply(
        self, server_round: int, partition_id: int, reply: Message, node_id: int
    ) -> tuple[Any, float, float, float]:
        """(update, number of examples, train loss, the client's optimizer-step seconds) of a reply,
        or ReplyError saying what is wrong."""
        if reply.has_error():
            raise ReplyError("client error: " + str(reply.error.reason))
        if reply.metadata.src_node_id != node_id:
            raise ReplyError(f"reply comes from node {reply.metadata.src_node_id}, the message went to {node_id}")
        content = reply.content
        unexpected = sorted(set(content) - {*self.reply_records, "metrics"})
        if unexpected:
            raise ReplyError(f"reply holds records this strategy does not read: {shown(unexpected)}")
        metrics = content.get("metrics")
        if not isinstance(metrics, MetricRecord):
            raise ReplyError("reply has no 'metrics' MetricRecord")
        syncs = partition_id in self.sent_version
        unexpected = sorted(set(metrics) - {*REPORTED_METRICS, *self.reply_metrics, *(("model-version",) * syncs)})
        if unexpected:
            raise ReplyError(f"reply holds metrics this strategy does not read: {shown(unexpected)}")
        if syncs and read_int(metrics, "model-version") != self.sent_version[partition_id]:
            raise ReplyError(
                f"client holds model version {metrics['model-version']}, expected {self.sent_version[partition_id]}"
            )
        expected = self.examples_of(partition_id)
        examples = read_number(metrics, "num-examples")
        if examples != expected:
            raise ReplyError(
                f"'num-examples' is {shown(metrics['num-examples'])}, "
                f"but partition {partition_id} holds {expected} examples"
            )
        loss = read_number(metrics, "train-loss")
        if loss < 0:
            raise ReplyError(f"'train-loss' is negative ({loss})")
        reported = {key: read_number(metrics, key) for key in ("local-steps", "train-seconds") if key in metrics}
        if any(value < 0 for value in reported.values()):
            raise ReplyError(f"a reported figure is negative: {reported}")
        update = self.parse_reply(server_round, partition_id, content)
        bound = self.config["max-update-norm"]
        if bound:
            norm = change_norm(self.update_pairs(update))
            if not norm <= bound:
                raise ReplyError(f"the reply changes the model by {norm:.4g} (L2), above max-update-norm = {bound}")
        return update, float(expected), loss, reported.get("train-seconds", 0.0)

    def examples_of(self, partition_id: int) -> int:
        """Size of a partition as the server derives it from the config (cached per process)."""
        return len(task.partitions(self.config)[partition_id])

    # Central evaluation happens on the server (fedcmd.server); no client-side evaluation rounds.
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("strategy %s: %d weights, %d buffer values", self.name, self.weights.size, self.buffers.size)

    # ----- checkpoints (fedcmd.checkpoint) ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The strategy's state as a tree of JSON values and arrays; a subclass adds its own parts.

        Nothing per client or per node: a resumed run's clients are all new (`load_checkpoint`),
        so held model versions and acknowledgements start empty, as after `client_reset`. Nor what
        lives within one round (messages sent, versions sent): a checkpoint is taken between rounds.
        """
        b = self.broadcast
        return {
            "weights": self.weights,
            "buffers": self.buffers,
            "accountant": self.accountant.state_dict(),
            "rounds": [
                [
                    r,
                    {
                        **vars(log_),
                        "rejected": [list(x) for x in log_.rejected],
                        "refused": [list(x) for x in log_.refused],
                    },
                ]
                for r, log_ in self.rounds.items()
            ],
            "run_info": dict(self.run_info),
            "broadcast": None if b is None else {"version": b.version, "arrays": b.arrays},
            "down_residual": self.down_residual,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a `state_dict` into this strategy, freshly built from the checkpoint's config;
        CheckpointError naming what does not fit (shapes and dtypes against the model, the codecs)."""
        weights = array_entry(state, "weights", np.float32, self.weights.shape)
        buffers = array_entry(state, "buffers", np.float32, self.buffers.shape)
        load_part(state, "accountant", self.accountant.load_state_dict)
        rounds = by_round(state, "rounds", read_round_log)
        run_info = entry(state, "run_info", dict)
        if not all(isinstance(v, str) for v in run_info.values()):
            raise CheckpointError(f"values must be strings, got {shown(run_info)}", ("run_info",))
        broadcast = self._read_broadcast(state)
        if entry(state, "down_residual", object) is None:
            residual = None
        elif self.codec_down.name == "topk":
            residual = array_entry(state, "down_residual", np.float32, self.weights.shape)
        else:
            raise CheckpointError(f"a downlink residual, but codec-down is {self.codec_down.name}", ("down_residual",))
        self.weights, self.buffers, self.rounds, self.run_info = weights.copy(), buffers.copy(), rounds, dict(run_info)
        self.broadcast, self.down_residual = broadcast, None if residual is None else residual.copy()

    def _read_broadcast(self, state: Mapping[str, Any]) -> Broadcast | None:
        value = entry(state, "broadcast", object)
        if value is None:
            return None
        with within("broadcast"):
            if self.codec_down.lossless:
                raise CheckpointError(f"a broadcast, but codec-down is {self.codec_down.name}")
            version, payloads = entry(value, "version", int), entry(value, "arrays", dict)
            if not set(payloads) <= set(PAYLOAD_KEYS):
                raise CheckpointError(f"payload keys must be among {PAYLOAD_KEYS}, got {shown(sorted(payloads))}")
            for key, arrays in payloads.items():
                try:  # a payload the downlink codec decodes, to at most the model's size
                    length = describe(arrays)[0] if isinstance(arrays, Mapping) else -1
                    if not 0 <= length <= self.weights.size:
                        raise CodecError(f"decodes to {length} values, the model has {self.weights.size}")
                    self.codec_down.decode(arrays, length)
                except CodecError as err:
                    raise CheckpointError(f"not a {self.codec_down.name} payload: {err}", (key,)) from err
        return Broadcast(version, {key: dict(arrays) for key, arrays in payloads.items()})


def read_round_log(state: Any) -> RoundLog:
    """A `RoundLog` from its checkpointed form (`FedcmdStrategy.state_dict`)."""

    def ids(key: str) -> list[int]:
        values = entry(state, key, list)
        if not all(type(v) is int for v in values):
            raise CheckpointError(f"must be a list of integers, got {shown(values)}", (key,))
        return values

    def reasons(key: str) -> list[tuple[int, str]]:
        values = entry(state, key, list)
        if not all(isinstance(v, list) and len(v) == 2 and type(v[0]) is int and isinstance(v[1], str) for v in values):
            raise CheckpointError(f"must be a list of [id, reason], got {shown(values)}", (key,))
        return [(v[0], v[1]) for v in values]

    return RoundLog(
        ids("sampled"),
        ids("sent"),
        ids("accepted"),
        reasons("rejected"),
        reasons("refused"),
        entry(state, "train_loss", float),
        entry(state, "train_seconds", float),
    )
