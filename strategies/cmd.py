"""Federated embedded CMD (ICLR 2024, section 4, Eqs. 13-16), server side.

Protocol (decisions the paper leaves open are marked *):
- Warm-up: rounds 1..F are FedAvg. The server observes the global model after round 0 (the
  initial model) and after every round; at F it fits CMD (`fedcmd.cmd.OnlineCMD`).
- After warm-up the online statistics are updated with each new global model, and every L rounds
  `EmbeddingSchedule` embeds P% of the weights. An embedding event freezes (a_i, b_i) of its
  weights; the server sets those weights to a_i * r_m(t) + b_i from then on.
- The server keeps an append-only log of embedding events; the coefficient-store *version* of a
  party is the number of events it holds. *The log is kept compactly: one event number per weight
  (`event_of`, uint8 until 255 events), and an event's coefficients are the embedded weights' frozen
  (a_i, b_i) in the online statistics, as float32; events are rebuilt from these when a message
  needs them. *Each client's acknowledged version is kept per client;
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
- Server state after warm-up (experiments/benchmarks/cmd_server_state.py): about 31 bytes per
  weight: the global model (float32, 4), the online statistics (a, b float64, mode uint8, frozen
  flag: 18; the frozen flags are the one embedded mask), the schedule's float32 baseline (8) and
  the event numbers (1). During warm-up: the F + 1 float32 snapshots (at least 16 bytes per
  weight), which the fit overwrites with the (a, b) pairs (`OnlineCMD`), so that the fit round,
  like every round, needs an accumulator and one reply beyond the state. A round builds no index
  over the weights: the ones sent densely are walked in place (`fedcmd.aggregation.Free`, the
  compiled loops of `fedcmd.kernels`), and the events a message carries are encoded once per
  client version and dropped once sent. Per-weight passes: adding a reply, placing the means, the
  online update with the embedded weights rebuilt in the same pass, the ranking on event rounds
  (experiments/benchmarks/server_round.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedcmd import kernels, task
from fedcmd.accountant import fedavg_floats
from fedcmd.aggregation import ExactMean, Free, filled, tensor_bounds
from fedcmd.checkpoint import CheckpointError, array_entry, by_round, entry, load_part
from fedcmd.cmd import EmbeddingSchedule, OnlineCMD  # noqa: F401
from fedcmd.protocols.cmd import REPLY_METRICS, EmbeddingEvent, encode_events, mode_dtype
from fedcmd.wire import ReplyError, read_vector, vector_record
from strategies.base import FedcmdStrategy, read_int, shown


class CMDUpdate(NamedTuple):
    """A CMD client's reply: its non-embedded, non-reference weights (in the store's order), its M
    reference weights (None before the first embedding event), its buffers, and the coefficient
    store version it holds."""

    weights: np.ndarray
    references: np.ndarray | None
    buffers: np.ndarray
    store_version: int


def event_dtype(n_events: int) -> np.dtype:
    """The type of the per-weight event numbers 0 .. n_events: uint8 up to 255 events, then wider."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_events <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


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
        # The event log: weight i was embedded by event event_of[i] (1-based; 0: not embedded), after
        # round event_rounds[k - 1]; event_sizes[k - 1] weights each. Coefficients: the online statistics'.
        self.event_of = np.zeros(n, dtype=event_dtype(0))
        self.event_rounds: list[int] = []  # round after which each event happened
        self.event_sizes: list[int] = []
        self.reference_index = np.zeros(0, dtype=np.int64)
        self.acked: dict[int, int] = {}  # partition id -> acknowledged store version
        self.sent: dict[tuple[int, int], int] = {}  # (round, partition) -> version sent
        self.references_held = False  # set once embedding has stopped at the cap
        self.paper_floats: dict[int, float] = {}
        # What a round derives from the log (the free positions, and free_index / embedded_index where asked):
        # built when first needed, dropped when the round's aggregation ends or the log changes.
        self._derived: dict[Any, Any] = {}

    # ----- layout derived from the store -------------------------------------------------------
    @property
    def version(self) -> int:
        return len(self.event_rounds)

    @property
    def n_embedded(self) -> int:
        return sum(self.event_sizes)

    @property
    def embedded(self) -> np.ndarray:
        """bool (N,), read-only: the embedded weights (the online statistics' frozen mask)."""
        if self.online.ready:
            return self.online.frozen_mask
        mask = np.zeros(self.weights.size, dtype=bool)
        mask.flags.writeable = False
        return mask

    def _refresh_layout(self) -> None:
        """Forget what was derived from the log; it is derived again when next needed."""
        self._derived.clear()

    def _derive(self, key: Any, build) -> Any:
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    @property
    def free(self) -> slice | Free:
        """The weights sent densely, in ascending order: all of them before the first event, then the
        non-embedded, non-reference ones, as `Free` positions (walked by the compiled loops: no index
        array is built for them in a round)."""
        if not self.version:
            return slice(None)
        return self._derive("free", lambda: Free(self.online.frozen_mask, np.sort(self.reference_index)))

    @property
    def n_free(self) -> int:
        """How many weights a message sends densely."""
        free = self.free
        if isinstance(free, slice):
            return self.weights.size
        # Counted per tensor, as the round's mean counts them (`Free` keeps the counts: one pass).
        return int(free.counts(tensor_bounds(self._offsets(0, self.weights.size), self.weights.size)).sum())

    def free_values(self, source: np.ndarray) -> np.ndarray:
        """source at the free positions: a new float32 vector of n_free values (source itself before
        the first event, when every weight is free)."""
        free = self.free
        if isinstance(free, slice):
            return source
        out = filled(self.n_free + 1, np.float32)  # one spare slot for the compiled walk
        kernels.gather_free(out, source, free.frozen, free.refs, *free.parts())
        return out[: self.n_free]

    @property
    def free_index(self) -> np.ndarray:
        """The free positions as ascending indices (int32 below 2^31 weights), for the paths that need
        an index (lossy codecs, max-update-norm, tests): built when first asked for, kept until the
        round's aggregation ends."""
        dtype = np.int32 if self.weights.size < 2**31 else np.int64

        def build() -> np.ndarray:
            if not self.version:
                return np.arange(self.weights.size, dtype=dtype)
            free = self.event_of == 0
            free[self.reference_index] = False
            return np.flatnonzero(free).astype(dtype)

        return self._derive("free_index", build)

    @property
    def embedded_index(self) -> np.ndarray:
        """int64, ascending: the embedded weights. Derived, kept until the round's aggregation ends."""
        return self._derive("embedded_index", lambda: np.flatnonzero(self.event_of))

    def events_since(self, version: int) -> list[EmbeddingEvent]:
        """The log's events [version, self.version) as they travel: each event's weights (int64,
        ascending) with their frozen coefficients as float32 and their modes. Built on each call
        (a round builds each client version's records once, `shared`, and keeps only those)."""
        if version >= self.version:
            return []
        index = kernels.members_after(self.event_of, version, sum(self.event_sizes[version:]))
        number = self.event_of[index] if self.version > version + 1 else None
        events = []
        for k in range(version + 1, self.version + 1):
            weights = index if number is None else index[number == k]
            a, b = np.empty(weights.size, np.float32), np.empty(weights.size, np.float32)
            modes = np.empty(weights.size, mode_dtype(self.n_modes))
            kernels.take_coefficients(weights, self.online.a, self.online.b, self.online.modes, a, b, modes)
            events.append(EmbeddingEvent(weights, a, b, modes))
        return events

    def rebuild_embedded(self, theta: np.ndarray, index: np.ndarray | None = None) -> None:
        """theta[i] = a_i * theta[ref(mode_i)] + b_i for every embedded weight i, in place, in float32
        with a_i, b_i as the events carried them (float32 of the frozen coefficients): bit for bit what
        `fedcmd.protocols.cmd.rebuild_embedded` gives a client. One compiled pass over the embedded
        mask (`fedcmd.kernels.rebuild`); no index or coefficient array over the embedded weights.
        With `index`, only the embedded weights at index (an event's)."""
        if not self.version:
            return
        references = theta[self.reference_index]  # references are never embedded: unchanged by the pass
        o = self.online
        if index is None:
            kernels.rebuild(theta, o.a, o.b, o.modes, o.frozen_mask, references)
        else:
            kernels.rebuild_at(theta, index, o.a, o.b, o.modes, references)

    # ----- messages ----------------------------------------------------------------------------
    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        if server_round not in self.paper_floats:
            self._count_paper_floats(server_round)
        from_version = self.acked.get(partition_id, 0)
        content = RecordDict(dict(self.shared(("events", from_version), lambda: self._events_records(from_version))))
        head, broadcast = self.sync_head(server_round, partition_id)
        if head is not None:
            content["sync"] = head
        content["weights"] = self.shared(
            ("weights", broadcast is None),
            lambda: self.dense_record("weights", self.free_values(self.weights), broadcast),
        )
        if self.version:  # exact (see the module docstring)
            content["references"] = self.shared("references", lambda: vector_record(self.weights[self.reference_index]))
        if self.buffers.size:
            content["buffers"] = self.shared("buffers", lambda: vector_record(self.buffers))
        self.sent[(server_round, partition_id)] = self.version
        return content

    def _events_records(self, from_version: int) -> dict:
        """The records that bring a store from `from_version` to the current one (the same for every
        client that holds that version this round)."""
        content = encode_events(
            self.events_since(from_version),
            self.weights.size,
            from_version,
            self.version,
            self.reference_index,
            self.n_modes,
        )
        content["cmd"]["hold-references"] = self.references_held
        return dict(content)

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> CMDUpdate:
        held = read_int(content["metrics"], "store-version")
        if held != self.sent[(server_round, partition_id)]:
            raise ReplyError(
                f"client holds coefficient store version {held}, expected {self.sent[(server_round, partition_id)]}"
            )
        weights = self.read_values(content, "weights", self.n_free, lambda: self.free_values(self.weights))
        if not self.version and "references" in content:
            raise ReplyError("'references' sent before any weight was embedded")
        references = read_vector(content, "references", self.reference_index.size, view=True) if self.version else None
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            # The index arrays a round derives (8 bytes per weight) are not held between rounds; the
            # free positions' counts (a few per tensor) are, until an event changes the mask.
            for key in ("free_index", "embedded_index"):
                self._derived.pop(key, None)

    def accumulators(self, server_round: int, max_examples: int) -> dict[str, ExactMean]:
        means = {"weights": self.mean_over(self.free, max_examples)}
        if self.version and not self.references_held:
            means["references"] = self.mean_over(self.reference_index, max_examples, each=True)
        return {**means, **self.buffer_mean(max_examples)}

    def aggregate(self, server_round: int, means: dict[str, ExactMean]) -> None:
        before = self.weights if self.codec_down.lossless else self.weights.copy()  # publish's reference
        means.pop("weights").mean_into(self.weights, self.free)
        if "references" in means:
            means.pop("references").mean_into(self.weights, self.reference_index)
        if "buffers" in means:
            means.pop("buffers").mean_into(self.buffers)
        self._advance_cmd(server_round)
        # The broadcast covers the weights the next messages send densely (after this round's event).
        if not self.codec_down.lossless:
            self.publish(server_round, before, {"weights": self.free_index})

    def _advance_cmd(self, server_round: int) -> None:
        # The embedded weights follow the new references: rebuilt in the online update's pass.
        self.online.observe(self.weights, rebuild=self.version > 0)
        if not self.online.ready:
            return
        if not self.reference_index.size:
            self.reference_index = np.asarray(self.online.reference_index, dtype=np.int64)
        if self.n_embedded >= self.config["cmd-max-embedded"] * self.weights.size:
            # Embedding stops at the cap. With "frozen" training the references are held from then on
            # too: a reference's own gradient says nothing of the weights tied to it, and its drift,
            # amplified by |a_i| (up to ~30 here), destabilised training late in runs.
            self.references_held = self.config["cmd-embedded-training"] == "frozen"
            return
        new = np.asarray(self.schedule.step(self.online), dtype=np.int64)
        if not new.size:
            return
        self.event_rounds.append(server_round)
        self.event_sizes.append(int(new.size))
        if self.version > np.iinfo(self.event_of.dtype).max:
            self.event_of = self.event_of.astype(event_dtype(self.version))
        self.event_of[new] = self.version
        self._refresh_layout()
        self.rebuild_embedded(self.weights, new)

    def _count_paper_floats(self, server_round: int) -> None:
        cohort = len(self.cohort(server_round))
        newly = sum(size for size, r in zip(self.event_sizes, self.event_rounds) if r == server_round - 1)
        self.paper_floats[server_round] = 2.0 * cohort * (self.weights.size - self.n_embedded + newly)

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state, the online statistics and schedule, and the coefficient event log (each
        weight's event number and the round after which each event happened); the events'
        coefficients are the online statistics' frozen ones, the layout is derived from them."""
        return {
            **super().state_dict(),
            "online": self.online.state_dict(),
            "schedule": self.schedule.state_dict(),
            "events": {"event_of": self.event_of, "rounds": list(self.event_rounds)},
            "references_held": self.references_held,
            "paper_floats": [[r, v] for r, v in self.paper_floats.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        load_part(state, "online", self.online.load_state_dict)
        load_part(state, "schedule", lambda part: self.schedule.load_state_dict(part, self.weights.size))
        last_event = state["schedule"]["last_event"]
        if last_event >= self.online.n_observed or (last_event >= 0) != self.online.ready:
            raise CheckpointError(
                f"the schedule's last event (snapshot {last_event}) does not fit the online statistics "
                f"({self.online.n_observed} snapshots, fitted: {self.online.ready})",
                ("schedule",),
            )
        self.reference_index = (
            np.asarray(self.online.reference_index, dtype=np.int64) if self.online.ready else np.zeros(0, np.int64)
        )
        load_part(state, "events", self._load_events)
        self.references_held = entry(state, "references_held", bool)
        self.paper_floats = by_round(state, "paper_floats", float)
        self._refresh_layout()

    def _load_events(self, state: dict[str, Any]) -> None:
        if "index" in state:
            raise CheckpointError(
                "an event log in the format of an older fedcmd (each event's indices and coefficients); "
                "this version cannot resume it: start a new run"
            )
        rounds = entry(state, "rounds", list)
        if not all(type(r) is int for r in rounds) or rounds != sorted(set(rounds)):
            raise CheckpointError(f"must be increasing rounds, got {shown(rounds)}", ("rounds",))
        n_events = len(rounds)
        event_of = array_entry(state, "event_of", event_dtype(n_events), self.weights.shape)
        if n_events and not self.online.ready:
            raise CheckpointError("embedding events before the CMD fit of the online statistics")
        if event_of.size and int(event_of.max()) > n_events:
            raise CheckpointError(f"event numbers must lie in [0, {n_events}]", ("event_of",))
        sizes = np.bincount(event_of, minlength=n_events + 1)[1:]
        if (sizes < 1).any():
            raise CheckpointError("an event embeds no weight", ("event_of",))
        if event_of[self.reference_index].any():
            raise CheckpointError("a reference weight is embedded", ("event_of",))
        embedded = event_of != 0
        if not np.array_equal(embedded, self.embedded):
            raise CheckpointError("the events' weights are not the ones the online statistics froze", ("event_of",))
        self.event_of, self.event_rounds, self.event_sizes = event_of.copy(), list(rounds), [int(k) for k in sizes]

    # ----- reporting ---------------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, float]:
        return {
            "embedded_fraction": self.n_embedded / self.weights.size,
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
            "embedded_fraction": self.n_embedded / self.weights.size,
            "embedding_events": self.version,
            "cmd_modes": self.n_modes,
            "cmd_warmup": self.config["cmd-warmup"],
            "cmd_every": self.config["cmd-every"],
            "cmd_fraction": self.config["cmd-fraction"],
            "cmd_of_remaining": self.config["cmd-of-remaining"],
            "cmd_max_embedded": self.config["cmd-max-embedded"],
            "cmd_embedded_training": self.config["cmd-embedded-training"],
        }
