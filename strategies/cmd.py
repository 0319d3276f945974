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

from typing import Any, NamedTuple

import numpy as np
from flwr.app import RecordDict

from fedcmd import task
from fedcmd.accountant import fedavg_floats
from fedcmd.checkpoint import CheckpointError, array_entry, by_round, entry, load_part
from fedcmd.cmd import EmbeddingSchedule, OnlineCMD  # noqa: F401
from fedcmd.protocols.cmd import REPLY_METRICS, EmbeddingEvent, encode_events, mode_dtype, rebuild_embedded
from fedcmd.wire import ReplyError, read_vector, vector_record
from strategies.base import FedcmdStrategy, Reply, read_int, shown, weighted_mean


class CMDUpdate(NamedTuple):
    """A CMD client's reply: its non-embedded, non-reference weights (in the store's order), its M
    reference weights (None before the first embedding event), its buffers, and the coefficient
    store version it holds."""

    weights: np.ndarray
    references: np.ndarray | None
    buffers: np.ndarray
    store_version: int


class CMD(FedcmdStrategy):
    """Federated embedded CMD, server side (module docstring): FedAvg until the warm-up ends, then
    embedding events by `EmbeddingSchedule`, each client's coefficient store kept current by deltas."""

    name = "cmd"
    reply_records = ("weights", "references", "buffers")
    reply_metrics = REPLY_METRICS

    def __init__(self, weights, buffers, config, accountant=None) -> None:
        super().__init__(weights, buffers, config, accountant)
        n = self.weights.size
        self.n_modes = config["cmd-modes"]
        self.online = OnlineCMD(
            n,
            self.n_modes,
            config["cmd-warmup"],
            n_samples=config["cmd-samples"],
            seed=config["seed"],
            tensor_sizes=task.layouts(config)[0].tensor_sizes,
        )
        self.schedule = EmbeddingSchedule(
            config["cmd-fraction"], config["cmd-every"], of_remaining=config["cmd-of-remaining"]
        )
        self.online.observe(self.weights)
        self.events: list[EmbeddingEvent] = []
        self.embedded = np.zeros(n, dtype=bool)
        self.reference_index = np.zeros(0, dtype=np.int64)
        self.acked: dict[int, int] = {}  # partition id -> acknowledged store version
        self.sent: dict[tuple[int, int], int] = {}  # (round, partition) -> version sent
        self.event_rounds: list[int] = []  # round after which each event happened
        self.references_held = False  # set once embedding has stopped at the cap
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
        content = encode_events(
            self.events[from_version:],
            self.weights.size,
            from_version,
            self.version,
            self.reference_index,
            self.n_modes,
        )
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

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> CMDUpdate:
        held = read_int(content["metrics"], "store-version")
        if held != self.sent[(server_round, partition_id)]:
            raise ReplyError(
                f"client holds coefficient store version {held}, expected {self.sent[(server_round, partition_id)]}"
            )
        weights = self.read_values(content, "weights", self.weights[self.free_index])
        if not self.version and "references" in content:
            raise ReplyError("'references' sent before any weight was embedded")
        references = read_vector(content, "references", self.reference_index.size) if self.version else None
        return CMDUpdate(weights, references, self.read_buffer_values(content), held)

    def update_pairs(self, update: CMDUpdate) -> list[tuple[np.ndarray, np.ndarray]]:
        pairs = [(update.weights, self.weights[self.free_index]), (update.buffers, self.buffers)]
        if update.references is not None:
            pairs.append((update.references, self.weights[self.reference_index]))
        return pairs

    def on_reply_accepted(self, server_round: int, partition_id: int, update: CMDUpdate) -> None:
        self.acked[partition_id] = update.store_version

    def on_node_changed(self, partition_id: int) -> None:
        # A node that reconnects under a new id may have lost its state: resend it everything.
        self.acked.pop(partition_id, None)

    def on_reply_rejected(self, server_round: int, partition_id: int) -> None:
        # The client's store is unknown (it may have refused the delta, or been reset): resend it all.
        # Clients skip events they already hold, so this costs bytes, never correctness.
        self.acked.pop(partition_id, None)

    def aggregate(self, server_round: int, replies: list[Reply]) -> None:
        counts = [r.examples for r in replies]
        theta = self.weights.copy()
        theta[self.free_index] = weighted_mean([r.update.weights for r in replies], counts)
        if self.version and not self.references_held:
            theta[self.reference_index] = weighted_mean([r.update.references for r in replies], counts)
            rebuild_embedded(theta, self.embedded_index, self.emb_a, self.emb_b, self.emb_mode, self.reference_index)
        if self.buffers.size:
            self.buffers = weighted_mean([r.update.buffers for r in replies], counts)
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
        event = EmbeddingEvent(
            new,
            np.asarray(self.online.a[new], dtype=np.float32),
            np.asarray(self.online.b[new], dtype=np.float32),
            np.asarray(self.online.modes[new]).astype(mode_dtype(self.n_modes)),
        )
        self.events.append(event)
        self.event_rounds.append(server_round)
        self.embedded[new] = True
        self._refresh_layout()
        rebuild_embedded(self.weights, self.embedded_index, self.emb_a, self.emb_b, self.emb_mode, self.reference_index)

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

        events = {
            "sizes": np.array([e.index.size for e in self.events], dtype=np.int64),
            "index": parts("index", np.int64),
            "a": parts("a", np.float32),
            "b": parts("b", np.float32),
            "mode": parts("mode", mode_dtype(self.n_modes)),
            "rounds": list(self.event_rounds),
        }
        return {
            **super().state_dict(),
            "online": self.online.state_dict(),
            "schedule": self.schedule.state_dict(),
            "events": events,
            "references_held": self.references_held,
            "paper_floats": [[r, v] for r, v in self.paper_floats.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        load_part(state, "online", self.online.load_state_dict)
        load_part(state, "schedule", self.schedule.load_state_dict)
        if self.online.ready:
            self.reference_index = np.asarray(self.online.reference_index, dtype=np.int64)
        load_part(state, "events", self._load_events)
        if self.online.ready and not np.array_equal(self.online.frozen_mask, self.embedded):
            raise CheckpointError("the events' weights are not the ones the online statistics froze", ("events",))
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
            event = index[start : start + size]
            if event.min() < 0 or event.max() >= n or (np.diff(event) <= 0).any():
                raise CheckpointError(f"each event's weights must be ascending indices in [0, {n})", ("index",))
            embedded[event] = True
        if int(embedded.sum()) != total or embedded[self.reference_index].any():
            raise CheckpointError("a weight is embedded twice, or a reference weight is embedded", ("index",))
        if total and int(mode.max()) >= modes:
            raise CheckpointError(f"modes must lie in [0, {modes})", ("mode",))
        self.events = [
            EmbeddingEvent(index[i : i + k], a[i : i + k], b[i : i + k], mode[i : i + k]) for i, k in zip(starts, sizes)
        ]
        self.event_rounds, self.embedded = list(rounds), embedded
        self._refresh_layout()

    # ----- reporting ---------------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, float]:
        return {
            "embedded_fraction": float(self.embedded.mean()),
            "store_version": self.version,
            "paper_floats": self.paper_floats.get(server_round, float("nan")),
        }

    def summary_extra(self) -> dict[str, Any]:
        paper = float(sum(self.paper_floats.values()))
        # Eq. 16 counts weights only, so its reference is FedAvg's weights (no buffers).
        reference = fedavg_floats(self.weights.size, [len(self.rounds[r].sampled) for r in sorted(self.rounds)])
        return {
            "paper_floats": paper,
            "paper_volume_ratio": paper / reference if reference else float("nan"),
            "embedded_fraction": float(self.embedded.mean()),
            "embedding_events": self.version,
            "cmd_modes": self.n_modes,
            "cmd_warmup": self.config["cmd-warmup"],
            "cmd_every": self.config["cmd-every"],
            "cmd_fraction": self.config["cmd-fraction"],
            "cmd_of_remaining": self.config["cmd-of-remaining"],
            "cmd_max_embedded": self.config["cmd-max-embedded"],
            "cmd_embedded_training": self.config["cmd-embedded-training"],
        }
