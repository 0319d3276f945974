"""Federated embedded CMD (ICLR 2024, section 4, Eqs. 13-16), server side.

Protocol (decisions the paper leaves open are marked *):
- Warm-up: rounds 1..F are FedAvg. The server observes the global model after round 0 (the
  initial model) and after every round; at F it fits CMD (`fedcmd.cmd.OnlineCMD`).
- After warm-up the online statistics are updated with each new global model, and every L rounds
  `EmbeddingSchedule` embeds P% of the weights. An embedding event freezes (a_i, b_i) of its
  weights; the server sets those weights to a_i * r_m(t) + b_i from then on.
- The server keeps an append-only log of embedding events; the coefficient-store *version* of a
  party is the number of events it holds. *Each client's acknowledged version is kept per client;
  every train message carries the events [acked, current) of that client, so a client that was not
  sampled, failed or timed out gets what it lacks the next time it is contacted.
- *Which weights an event embeds travels as a bit mask over the N weights (N/8 bytes) or as
  int32 indices, whichever is smaller for the message; the coefficients follow in ascending
  index order: a and b as float32, the mode as uint8 (uint16 beyond 256 modes). The reference
  indices travel once, with the first event.
- Dense values: once any weight is embedded, a message carries `weights` (non-embedded,
  non-reference weights in ascending index order, an order both sides derive from their store)
  and `references` (the M reference weights). Embedded weights are never sent, either way.
- *A reply must state the store version the client holds; a reply whose version is not the one
  sent is rejected. After any rejected or lost reply the server assumes nothing about that client
  beyond its last acknowledged version; the client skips events it already holds (checking they
  match), so nothing is applied twice.
- *Embedding stops once `cmd-max-embedded` of the weights are embedded (the last event may pass
  the cap by at most one event's worth). Measured on Fashion-MNIST/LeNet-5: accuracy held while up
  to ~93% of the weights were embedded and fell by about a point as embedding passed 95%.
- *With `frozen` local training, once embedding has stopped the reference weights are held too
  (clients keep them fixed, the server stops aggregating them): without this, reference drift
  amplified by large |a_i| made one of three seeds collapse (88.8% -> 66%) after the cap.
- *Wire codecs (`codec-up`, `codec-down`) apply to the dense `weights` and `buffers` only:
  coefficients, masks, indices and the M reference weights stay exact. A reference's error is
  every weight tied to it rebuilt wrong, amplified by |a_i| (up to ~30 here): with int8 on the
  references too, seed 0 of the Table 3 setting ended 1.2 points below FedAvg. Under a lossy
  `codec-down` the round's broadcast is made after the round's embedding event, over the weights
  still sent densely; the online CMD statistics see the aggregate before that encoding.
- Volume: the accountant measures real bytes; `paper_floats` per round is Eq. 16's count,
  2|C|(N - embedded) + 2|C|(newly embedded), which ignores masks, modes and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedcmd import task
from fedcmd.checkpoint import CheckpointError, array_entry, by_round, entry, load_part
from fedcmd.cmd import EmbeddingSchedule, OnlineCMD  # noqa: F401
from strategies.base import FedcmdStrategy, ReplyError, read_int, read_vector, shown, vector_record, weighted_mean


def mode_dtype(n_modes: int) -> np.dtype:
    return np.dtype(np.uint8) if n_modes <= 256 else np.dtype(np.uint16)


@dataclass(frozen=True)
class EmbeddingEvent:
    index: np.ndarray   # int64, ascending
    a: np.ndarray       # float32
    b: np.ndarray       # float32
    mode: np.ndarray    # uint8 / uint16


def encode_events(events: list[EmbeddingEvent], n_params: int, from_version: int, to_version: int,
                  reference_index: np.ndarray, n_modes: int) -> RecordDict:
    """The records that carry `events` (the log's entries from_version..to_version-1)."""
    content = RecordDict()
    content["cmd"] = ConfigRecord({"from-version": from_version, "to-version": to_version, "n-modes": n_modes})
    if not events:
        return content
    content["coefficients"] = ArrayRecord({
        "a": Array(np.concatenate([e.a for e in events])),
        "b": Array(np.concatenate([e.b for e in events])),
        "mode": Array(np.concatenate([e.mode for e in events]).astype(mode_dtype(n_modes))),
    })
    counts = np.array([e.index.size for e in events], dtype=np.int64)
    mask_bytes = len(events) * ((n_params + 7) // 8)
    if mask_bytes <= 4 * int(counts.sum()):
        masks = np.zeros((len(events), n_params), dtype=bool)
        for row, event in enumerate(events):
            masks[row, event.index] = True
        content["masks"] = ArrayRecord({"values": Array(np.packbits(masks, axis=1))})
    else:
        content["indices"] = ArrayRecord({"values": Array(np.concatenate([e.index for e in events]).astype(np.int32)),
                                          "counts": Array(counts.astype(np.int32))})
    if from_version == 0:  # a client's first events: it learns the reference weights too
        if "indices" not in content:
            content["indices"] = ArrayRecord()
        content["indices"]["reference-index"] = Array(reference_index.astype(np.int64))
    return content


def decode_events(content: RecordDict, n_params: int) -> tuple[int, int, list[EmbeddingEvent], np.ndarray | None]:
    """(from_version, to_version, events, reference_index or None) from a train message."""
    head = content["cmd"]
    from_version, to_version = int(head["from-version"]), int(head["to-version"])
    n_events = to_version - from_version
    if n_events == 0:
        return from_version, to_version, [], None
    coeff = content["coefficients"]
    a, b, mode = coeff["a"].numpy(), coeff["b"].numpy(), coeff["mode"].numpy()
    if "masks" in content:
        packed = content["masks"]["values"].numpy()
        masks = np.unpackbits(packed, axis=1, count=n_params).astype(bool)
        indices = [np.flatnonzero(row) for row in masks]
    else:
        flat = content["indices"]["values"].numpy().astype(np.int64)
        counts = content["indices"]["counts"].numpy()
        indices = np.split(flat, np.cumsum(counts)[:-1])
    if len(indices) != n_events:
        raise ValueError(f"coefficient delta announces {n_events} events but carries {len(indices)}")
    events, start = [], 0
    for index in indices:
        stop = start + index.size
        events.append(EmbeddingEvent(index.astype(np.int64), a[start:stop], b[start:stop], mode[start:stop]))
        start = stop
    if start != a.size:
        raise ValueError(f"coefficient delta has {a.size} coefficients for {start} embedded weights")
    reference_index = None
    if "indices" in content and "reference-index" in content["indices"]:
        reference_index = content["indices"]["reference-index"].numpy().astype(np.int64)
    return from_version, to_version, events, reference_index


def rebuild_embedded(theta: np.ndarray, embedded_index: np.ndarray, a: np.ndarray, b: np.ndarray,
                     mode: np.ndarray, reference_index: np.ndarray) -> None:
    """theta[i] = a_i * theta[ref(mode_i)] + b_i for embedded i, in float32 (server and client alike)."""
    theta[embedded_index] = a * theta[reference_index[mode.astype(np.int64)]] + b


class CMD(FedcmdStrategy):
    name = "cmd"
    reply_records = ("weights", "references", "buffers")
    reply_metrics = ("store-version",)

    def __init__(self, weights, buffers, config, accountant=None) -> None:
        super().__init__(weights, buffers, config, accountant)
        n = self.weights.size
        self.n_modes = config["cmd-modes"]
        self.online = OnlineCMD(n, self.n_modes, config["cmd-warmup"], n_samples=config["cmd-samples"],
                                seed=config["seed"], tensor_sizes=task.layouts(config)[0].tensor_sizes)
        self.schedule = EmbeddingSchedule(config["cmd-fraction"], config["cmd-every"],
                                          of_remaining=config["cmd-of-remaining"])
        self.online.observe(self.weights)
        self.events: list[EmbeddingEvent] = []
        self.embedded = np.zeros(n, dtype=bool)
        self.reference_index = np.zeros(0, dtype=np.int64)
        self.acked: dict[int, int] = {}            # partition id -> acknowledged store version
        self.sent: dict[tuple[int, int], int] = {}  # (round, partition) -> version sent
        self.event_rounds: list[int] = []          # round after which each event happened
        self.references_held = False               # set once embedding has stopped at the cap
        self.paper_floats: dict[int, float] = {}
        self._refresh_layout()

    # ----- layout derived from the store -------------------------------------------------------
    @property
    def version(self) -> int:
        return len(self.events)

    def _refresh_layout(self) -> None:
        self.embedded_index = np.flatnonzero(self.embedded)
        free = ~self.embedded
        if self.version:
            free[self.reference_index] = False
        self.free_index = np.flatnonzero(free)
        if self.version:
            order = np.argsort(np.concatenate([e.index for e in self.events]), kind="stable")
            self.emb_a = np.concatenate([e.a for e in self.events])[order]
            self.emb_b = np.concatenate([e.b for e in self.events])[order]
            self.emb_mode = np.concatenate([e.mode for e in self.events])[order]

    # ----- messages ----------------------------------------------------------------------------
    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        if server_round not in self.paper_floats:
            self._count_paper_floats(server_round)
        from_version = self.acked.get(partition_id, 0)
        content = encode_events(self.events[from_version:], self.weights.size, from_version, self.version,
                                self.reference_index, self.n_modes)
        content["cmd"]["hold-references"] = self.references_held
        head, broadcast = self.sync_head(server_round, partition_id)
        if head is not None:
            content["sync"] = head
        content["weights"] = self.dense_record("weights", self.weights[self.free_index], broadcast)
        if self.version:
            content["references"] = vector_record(self.weights[self.reference_index])  # exact (see docstring)
        if self.buffers.size:
            content["buffers"] = vector_record(self.buffers)
        self.sent[(server_round, partition_id)] = self.version
        return content

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> Any:
        held = read_int(content["metrics"], "store-version")
        if held != self.sent[(server_round, partition_id)]:
            raise ReplyError(f"client holds coefficient store version {held}, "
                             f"expected {self.sent[(server_round, partition_id)]}")
        weights = self.read_values(content, "weights", self.weights[self.free_index])
        if not self.version and "references" in content:
            raise ReplyError("'references' sent before any weight was embedded")
        references = read_vector(content, "references", self.reference_index.size) if self.version else None
        return weights, references, self.read_buffer_values(content), held

    def update_pairs(self, update: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        weights, references, buffers, _ = update
        pairs = [(weights, self.weights[self.free_index]), (buffers, self.buffers)]
        return pairs + ([(references, self.weights[self.reference_index])] if references is not None else [])

    def on_reply_accepted(self, server_round: int, partition_id: int, update: Any) -> None:
        self.acked[partition_id] = update[3]

    def on_node_changed(self, partition_id: int) -> None:
        # A node that reconnects under a new id may have lost its state: resend it everything.
        self.acked.pop(partition_id, None)

    def on_reply_rejected(self, server_round: int, partition_id: int) -> None:
        # The client's store is unknown (it may have refused the delta, or been reset): resend it all.
        # Clients skip events they already hold, so this costs bytes, never correctness.
        self.acked.pop(partition_id, None)

    def aggregate(self, server_round: int, updates: list[tuple[int, Any]]) -> None:
        counts = [n for _, (n, _) in updates]
        theta = self.weights.copy()
        theta[self.free_index] = weighted_mean([u[0] for _, (_, u) in updates], counts)
        if self.version and not self.references_held:
            theta[self.reference_index] = weighted_mean([u[1] for _, (_, u) in updates], counts)
            rebuild_embedded(theta, self.embedded_index, self.emb_a, self.emb_b, self.emb_mode, self.reference_index)
        if self.buffers.size:
            self.buffers = weighted_mean([u[2] for _, (_, u) in updates], counts)
        before, self.weights = self.weights, theta
        self._advance_cmd(server_round)
        # The broadcast covers the weights the next messages send densely (after this round's event).
        self.publish(server_round, before, {"weights": self.free_index})

    def _advance_cmd(self, server_round: int) -> None:
        self.online.observe(self.weights)
        if not self.online.ready:
            return
        if not self.reference_index.size:
            self.reference_index = np.asarray(self.online.reference_index, dtype=np.int64)
        if self.embedded_index.size >= self.config["cmd-max-embedded"] * self.weights.size:
            # Embedding stops at the cap. With "frozen" training the references are held from then on
            # too: a reference's own gradient says nothing of the weights tied to it, and its drift,
            # amplified by |a_i| (up to ~30 here), destabilised training late in runs.
            self.references_held = self.config["cmd-embedded-training"] == "frozen"
            return
        new = np.asarray(self.schedule.step(self.online), dtype=np.int64)
        if not new.size:
            return
        new = np.sort(new)
        event = EmbeddingEvent(new, np.asarray(self.online.a[new], dtype=np.float32),
                               np.asarray(self.online.b[new], dtype=np.float32),
                               np.asarray(self.online.modes[new]).astype(mode_dtype(self.n_modes)))
        self.events.append(event)
        self.event_rounds.append(server_round)
        self.embedded[new] = True
        self._refresh_layout()
        rebuild_embedded(self.weights, self.embedded_index, self.emb_a, self.emb_b, self.emb_mode,
                         self.reference_index)

    def _count_paper_floats(self, server_round: int) -> None:
        cohort = len(self.cohort(server_round))
        newly = sum(e.index.size for e, r in zip(self.events, self.event_rounds) if r == server_round - 1)
        self.paper_floats[server_round] = 2.0 * cohort * (self.weights.size - self.embedded_index.size + newly)

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state, the online statistics and schedule, and the coefficient event log (each
        event's weights, coefficients and modes, concatenated, and the round after which it
        happened); the embedded mask, the reference indices and the layout are rebuilt from them."""
        def parts(name: str, dtype: type) -> np.ndarray:
            return np.concatenate([np.zeros(0, dtype), *(getattr(e, name) for e in self.events)])

        events = {"sizes": np.array([e.index.size for e in self.events], dtype=np.int64),
                  "index": parts("index", np.int64), "a": parts("a", np.float32), "b": parts("b", np.float32),
                  "mode": parts("mode", mode_dtype(self.n_modes)), "rounds": list(self.event_rounds)}
        return {**super().state_dict(), "online": self.online.state_dict(), "schedule": self.schedule.state_dict(),
                "events": events, "references_held": self.references_held,
                "paper_floats": [[r, v] for r, v in self.paper_floats.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        load_part(state, "online", self.online.load_state_dict)
        load_part(state, "schedule", self.schedule.load_state_dict)
        if self.online.ready:
            self.reference_index = np.asarray(self.online.reference_index, dtype=np.int64)
        load_part(state, "events", self._load_events)
        schedule_mask = state["schedule"]["embedded_mask"]
        if (self.online.ready and not np.array_equal(self.online.frozen_mask, self.embedded)) or \
                (schedule_mask.size and not np.array_equal(schedule_mask, self.embedded)):
            raise CheckpointError("the events' weights are not the ones the online statistics and the schedule "
                                  "froze", ("events",))
        self.references_held = entry(state, "references_held", bool)
        self.paper_floats = by_round(state, "paper_floats", float)

    def _load_events(self, state: dict[str, Any]) -> None:
        n, modes = self.weights.size, self.reference_index.size
        sizes = array_entry(state, "sizes", np.int64, (None,))
        total = int(sizes.sum())
        index = array_entry(state, "index", np.int64, (total,))
        a, b = (array_entry(state, key, np.float32, (total,)) for key in ("a", "b"))
        mode = array_entry(state, "mode", mode_dtype(self.n_modes), (total,))
        rounds = entry(state, "rounds", list)
        if len(rounds) != sizes.size or not all(type(r) is int for r in rounds) or rounds != sorted(set(rounds)):
            raise CheckpointError(f"must be {sizes.size} increasing rounds, got {shown(rounds)}", ("rounds",))
        if sizes.size and not self.online.ready:
            raise CheckpointError("embedding events before the CMD fit of the online statistics")
        if (sizes < 1).any():
            raise CheckpointError("an event embeds no weight", ("sizes",))
        embedded = np.zeros(n, dtype=bool)
        starts = np.cumsum(sizes) - sizes
        for start, size in zip(starts, sizes):
            event = index[start:start + size]
            if event.min() < 0 or event.max() >= n or (np.diff(event) <= 0).any():
                raise CheckpointError(f"each event's weights must be ascending indices in [0, {n})", ("index",))
            embedded[event] = True
        if int(embedded.sum()) != total or embedded[self.reference_index].any():
            raise CheckpointError("a weight is embedded twice, or a reference weight is embedded", ("index",))
        if total and int(mode.max()) >= modes:
            raise CheckpointError(f"modes must lie in [0, {modes})", ("mode",))
        self.events = [EmbeddingEvent(index[i:i + k], a[i:i + k], b[i:i + k], mode[i:i + k])
                       for i, k in zip(starts, sizes)]
        self.event_rounds, self.embedded = list(rounds), embedded
        self._refresh_layout()

    # ----- reporting ---------------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, float]:
        return {"embedded_fraction": float(self.embedded.mean()), "store_version": self.version,
                "paper_floats": self.paper_floats.get(server_round, float("nan"))}

    def summary_extra(self) -> dict[str, Any]:
        paper = float(sum(self.paper_floats.values()))
        cohorts = [len(self.rounds[r].sampled) for r in sorted(self.rounds)]
        reference = 2.0 * self.weights.size * sum(cohorts)
        return {"paper_floats": paper, "paper_volume_ratio": paper / reference if reference else float("nan"),
                "embedded_fraction": float(self.embedded.mean()), "embedding_events": self.version,
                "cmd_modes": self.n_modes, "cmd_warmup": self.config["cmd-warmup"],
                "cmd_every": self.config["cmd-every"], "cmd_fraction": self.config["cmd-fraction"],
                "cmd_of_remaining": self.config["cmd-of-remaining"],
                "cmd_max_embedded": self.config["cmd-max-embedded"],
                "cmd_embedded_training": self.config["cmd-embedded-training"]}
