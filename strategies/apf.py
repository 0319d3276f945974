"""Adaptive Parameter Freezing (APF) and Aggressive APF (A-APF), Chen et al. ICDCS 2021, server side.

The freezing control (`fedcmd.apf.FreezingController`) runs on the server, on the GLOBAL model:
after every `apf-check-every` rounds it is fed delta = global now - global at the previous check
and returns the active mask for the rounds up to the next check. Frozen scalars are neither sent
nor aggregated; the server keeps their value, clients hold them (`hold_fixed`) while training.
A-APF (`a-apf`) adds the controller's seeded random freezes of unstable scalars, drawn on the
server only, so no client needs the generator.

Synchronisation protocol (decisions the paper leaves open are marked *):
- A client's state (`clients/apf.py`) is the last synchronised model it received (all N weights),
  the model version that is (the round whose global model it is) and the active mask with its
  version (the number of checks behind it; version 0, before any check, is all-active and is what
  a client with no state holds). The server keeps per client the versions the client last
  acknowledged in an accepted reply.
- In round r every sampled client must end up holding the global model of round r-1. *The
  message carries the current values at a set of positions that covers everything that changed
  since the client's acknowledged model version v, by the cheapest of three encodings (raw
  payload bytes, N weights):
    `derived`  - the positions of the client's own mask, when every round v+1..r-1 used that
                 mask (no check in between): 4|mask| bytes, nothing else; with full participation
                 and no failures this is always the case, and it is the paper's downlink (the
                 values aggregated in the previous round under its mask);
    `explicit` - the positions whose global value changed since round v, as a packed bit mask
                 (N/8 bytes) plus their values: for clients that missed rounds across a check;
    `full`     - the whole model (4N bytes): first contact, or when cheaper.
  Values are absolute, not differences, so sending a superset is harmless (idempotent).
  *Under a lossy `codec-down` there is a fourth, `delta`: for a client that holds the previous
  round's model and mask, the round's broadcast (the codec's encoding of the change at the mask's
  positions, `FedcmdStrategy.publish`), which the client adds to what it holds.
- *The active mask travels as a packed bit mask (N/8 bytes, key `masks/active`) whenever the
  client may not hold the current one. It is left out only when it is truly derivable: the
  client acknowledged the current mask version (e.g. full participation between checks when
  `apf-check-every` > 1), or the mask is version 0. Clients do not run the controller themselves
  (that would cost them 20 bytes of state per scalar and requires seeing the global model at every
  check), so after each check every client receives the new mask once.
- *A reply states the model and mask versions the client holds; one that differs from what was
  sent is rejected. After an error or rejected reply the server forgets the client (full model
  next time), as when its node leaves or changes. A lost reply (timeout) needs nothing: the
  versions a client holds only grow, so the acknowledged ones are a lower bound, and every
  encoding chosen from them is right for any state between them and the current one (values are
  absolute; a client that holds a newer mask than acknowledged can only be offered `derived` or
  no mask when no check happened in between, i.e. when its mask is the same one).
- Buffers (BatchNorm statistics) are not parameters APF freezes: they travel densely both ways,
  as in FedAvg.
- Volume, side by side: `paper_floats` per round is 2 |C| |active| (active weights up and down
  per sampled client, masks free); the accountant measures the real bytes, catch-up values,
  masks and metadata included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedcmd.accountant import fedavg_floats
from fedcmd.aggregation import ExactMean
from fedcmd.apf import FreezingController
from fedcmd.checkpoint import CheckpointError, array_entry, by_round, checked, entry, load_part, within
from fedcmd.protocols.apf import ACTIVE, CATCH_UP_KINDS, CHANGED, HEAD, MASKS, REPLY_METRICS, SyncHead, pack_mask
from fedcmd.wire import ReplyError, vector_record
from strategies.base import FedcmdStrategy, read_int, shown


@dataclass(frozen=True)
class RoundMask:
    """An active mask and its version (checks run before it was in force)."""

    version: int
    active: np.ndarray  # bool, read-only
    index: np.ndarray  # int64 positions of the active scalars, ascending


@dataclass(frozen=True)
class Acked:
    """What a client held after its last accepted reply."""

    model_version: int
    mask_version: int


class APFUpdate(NamedTuple):
    """An APF client's reply: its active weights (ascending positions of the mask sent), its
    buffers, and the model and mask versions it now holds."""

    weights: np.ndarray
    buffers: np.ndarray
    held: Acked


class APF(FedcmdStrategy):
    """APF, server side (module docstring): the freezing controller on the global model, each
    client brought to the current model by the cheapest catch-up."""

    name = "apf"
    reply_metrics = REPLY_METRICS
    aggressive = False
    own_model_versions = True  # a lossy codec-down's broadcast is one more catch-up kind, `delta`

    def __init__(self, weights, buffers, config, accountant=None) -> None:
        super().__init__(weights, buffers, config, accountant)
        n = self.weights.size
        self.check_every = config["apf-check-every"]
        self.controller = FreezingController(
            n,
            alpha=config["apf-alpha"],
            threshold=config["apf-threshold"],
            tighten_at=config["apf-tighten-at"],
            aggressive=self.aggressive,
            seed=config["seed"],
            rounds_per_check=self.check_every,
            random_freeze_periods=config["apf-random-freeze-periods"],
        )
        self.at_last_check = self.weights.copy()
        self.changed_in = np.zeros(n, dtype=np.int32)  # last round whose aggregation changed each scalar
        self.mask = self._mask_now()  # in force for the round being configured
        self.previous_mask: RoundMask | None = None  # in force during the last completed round
        self.acked: dict[int, Acked] = {}
        self.sent: dict[int, Acked] = {}  # partition -> versions sent this round
        self.paper_floats: dict[int, float] = {}
        self.catch_ups: dict[int, Counter] = {}  # round -> catch-up kind counts, "mask" too
        self.round_figures: dict[int, dict[str, float]] = {}
        self._rows_seen = 0
        self._changed_since: dict[int, np.ndarray] = {}  # per-round cache: model version -> positions

    def _mask_now(self) -> RoundMask:
        active = self.controller.active_mask
        return RoundMask(self.controller.n_checks, active, np.flatnonzero(active))

    # ----- messages ----------------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        if self.controller.n_checks != self.mask.version:
            self.mask = self._mask_now()
        self._changed_since.clear()
        self.sent.clear()
        self.catch_ups[server_round] = Counter()
        cohort = len(self.cohort(server_round))
        self.paper_floats[server_round] = 2.0 * cohort * self.mask.index.size
        return super().configure_train(server_round, arrays, config, grid)

    def _catch_up(self, server_round: int, partition_id: int) -> tuple[str, np.ndarray | None]:
        """The cheapest encoding that brings this client to the current global model, and the
        positions it sends (None: the whole model)."""
        n = self.weights.size
        acked = self.acked.get(partition_id)
        options = {"full": (4 * n, None)}
        if acked is not None:
            v = acked.model_version
            if v not in self._changed_since:
                self._changed_since[v] = np.flatnonzero(self.changed_in > v)
            changed = self._changed_since[v]
            options["explicit"] = ((n + 7) // 8 + 4 * changed.size, changed)
            if self.previous_mask is not None and acked.mask_version == self.previous_mask.version:
                options["derived"] = (4 * self.previous_mask.index.size, self.previous_mask.index)
                broadcast = self.broadcast_for(server_round, v)  # only under a lossy codec-down
                if broadcast is not None:
                    size = sum(a.nbytes for a in broadcast.arrays["weights"].values())
                    options["delta"] = (size, self.previous_mask.index)
        kind = min(options, key=lambda k: (options[k][0], CATCH_UP_KINDS.index(k)))
        return kind, options[kind][1]

    def _client_may_lack_mask(self, partition_id: int) -> bool:
        acked = self.acked.get(partition_id)
        if acked is None:
            return self.mask.version != 0  # a client with no state holds version 0 (all active)
        return acked.mask_version != self.mask.version

    def train_content(self, server_round: int, partition_id: int) -> RecordDict:
        kind, index = self._catch_up(server_round, partition_id)
        acked = self.acked.get(partition_id)
        head = SyncHead(
            kind,
            server_round - 1,
            self.mask.version,
            acked.model_version if kind != "full" else -1,
            acked.mask_version if kind in ("derived", "delta") else None,
        )
        if index is None:  # the whole model, in float32: the same bytes for every such client
            weights = self.shared("weights", lambda: self.dense_record("weights", self.weights, None))
        else:
            weights = self.dense_record("weights", self.weights[index], self.broadcast if kind == "delta" else None)
        content = RecordDict({HEAD: head.record(), "weights": weights})
        masks = {}
        if kind == "explicit":
            changed = np.zeros(self.weights.size, dtype=bool)
            changed[index] = True
            masks[CHANGED] = pack_mask(changed)
        if self._client_may_lack_mask(partition_id):
            masks[ACTIVE] = pack_mask(self.mask.active)
            self.catch_ups[server_round]["mask"] += 1
        if masks:
            content[MASKS] = ArrayRecord(masks)
        if self.buffers.size:
            content["buffers"] = self.shared("buffers", lambda: vector_record(self.buffers))
        self.catch_ups[server_round][kind] += 1
        self.sent[partition_id] = Acked(server_round - 1, self.mask.version)
        return content

    def parse_reply(self, server_round: int, partition_id: int, content: RecordDict) -> APFUpdate:
        sent = self.sent[partition_id]
        metrics = content["metrics"]
        held = Acked(read_int(metrics, "model-version"), read_int(metrics, "mask-version"))
        if held != sent:
            raise ReplyError(f"client holds model/mask versions {held}, expected {sent}")
        index = self.mask.index
        weights = self.read_values(content, "weights", index.size, lambda: self.weights[index])
        return APFUpdate(weights, self.read_buffer_values(content), held)

    def update_pairs(self, update: APFUpdate) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(update.weights, self.weights[self.mask.index]), (update.buffers, self.buffers)]

    def on_reply_accepted(self, server_round: int, partition_id: int, update: APFUpdate) -> None:
        self.acked[partition_id] = update.held

    def on_reply_rejected(self, server_round: int, partition_id: int) -> None:
        # The client's state is unknown (it may have refused the message, or lost its state).
        self.acked.pop(partition_id, None)

    def on_node_changed(self, partition_id: int) -> None:
        self.on_reply_rejected(0, partition_id)

    # ----- aggregation and the stability check -------------------------------------------------
    def accumulators(self, server_round: int, max_examples: int) -> dict[str, ExactMean]:
        return {"weights": self.mean_over(self.mask.index, max_examples), **self.buffer_mean(max_examples)}

    def aggregate(self, server_round: int, means: dict[str, ExactMean]) -> None:
        before = self.weights.copy()
        means.pop("weights").mean_into(self.weights, self.mask.index)
        self.publish(server_round, before, {"weights": self.mask.index})
        self.changed_in[self.weights != before] = server_round
        if "buffers" in means:
            means.pop("buffers").mean_into(self.buffers)

    def aggregate_train(self, server_round, replies):
        result = super().aggregate_train(server_round, replies)
        self.previous_mask = self.mask
        self.round_figures[server_round] = self._measure(server_round)
        if server_round % self.check_every == 0:
            self.controller.check(self.weights - self.at_last_check)
            self.at_last_check = self.weights.copy()
        return result

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state, the controller's, the model at the last check, the round each scalar
        last changed in, the masks in force, and the per-round figures."""

        def mask(m: RoundMask | None) -> dict[str, Any] | None:
            return None if m is None else {"version": m.version, "active": m.active}

        return {
            **super().state_dict(),
            "controller": self.controller.state_dict(),
            "at_last_check": self.at_last_check,
            "changed_in": self.changed_in,
            "mask": mask(self.mask),
            "previous_mask": mask(self.previous_mask),
            "paper_floats": [[r, v] for r, v in self.paper_floats.items()],
            "catch_ups": [[r, dict(c)] for r, c in self.catch_ups.items()],
            "round_figures": [[r, dict(f)] for r, f in self.round_figures.items()],
            "rows_seen": self._rows_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        n = self.weights.size
        load_part(state, "controller", self.controller.load_state_dict)
        at_last_check = array_entry(state, "at_last_check", np.float32, (n,))
        changed_in = array_entry(state, "changed_in", np.int32, (n,))
        mask = self._read_mask(state, "mask")
        if mask is None:
            raise CheckpointError("missing", ("mask",))
        if mask.version == self.controller.n_checks and not np.array_equal(mask.active, self.controller.active_mask):
            raise CheckpointError(
                f"version {mask.version} differs from the controller's mask of that version", ("mask",)
            )
        self.at_last_check, self.changed_in = at_last_check.copy(), changed_in.copy()
        self.mask, self.previous_mask = mask, self._read_mask(state, "previous_mask")
        self.paper_floats = by_round(state, "paper_floats", float)
        self.catch_ups = by_round(state, "catch_ups", read_catch_ups)
        self.round_figures = by_round(state, "round_figures", read_figures)
        self._rows_seen = entry(state, "rows_seen", int)
        if not 0 <= self._rows_seen <= len(self.accountant.rows):
            raise CheckpointError(
                f"{self._rows_seen} is not within the accountant's {len(self.accountant.rows)} rows", ("rows_seen",)
            )

    def _read_mask(self, state: dict[str, Any], key: str) -> RoundMask | None:
        value = entry(state, key, object)
        if value is None:
            return None
        with within(key):
            version = entry(value, "version", int)
            active = array_entry(value, "active", np.bool_, (self.weights.size,)).copy()
            if not 0 <= version <= self.controller.n_checks:
                raise CheckpointError(
                    f"version {version} is not within the controller's {self.controller.n_checks} checks"
                )
        active.flags.writeable = False
        return RoundMask(version, active, np.flatnonzero(active))

    # ----- reporting ---------------------------------------------------------------------------
    def _measure(self, server_round: int) -> dict[str, float]:
        """The round's mask and measured traffic: payload floats (weights, buffers and masks, as
        float32 equivalents), serialised bytes, and the mask bytes among them."""
        rows = [r for r in self.accountant.rows[self._rows_seen :] if r.round == server_round]
        self._rows_seen = len(self.accountant.rows)
        active = self.previous_mask.index.size
        return {
            "frozen_fraction": 1.0 - active / self.weights.size,
            "active_weights": active,
            "measured_floats": float(sum(r.floats for r in rows)),
            "measured_bytes": float(sum(r.wire_bytes for r in rows)),
            "mask_bytes": float(sum(r.raw_bytes for r in rows if r.category == "masks")),
        }

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Figures of the round just run: `frozen_fraction` is the share of weights frozen (neither
        sent nor aggregated) during it; `mask_version` and `apf_threshold` are after its check."""
        kinds = self.catch_ups.get(server_round, Counter())
        return {
            **self.round_figures.get(server_round, {}),
            "paper_floats": self.paper_floats.get(server_round, float("nan")),
            "mask_version": self.controller.n_checks,
            "apf_threshold": self.controller.threshold,
            **{f"sync_{k}": kinds[k] for k in CATCH_UP_KINDS},
            "masks_sent": kinds["mask"],
        }

    def summary_extra(self) -> dict[str, Any]:
        cohorts = [len(self.rounds[r].sampled) for r in sorted(self.rounds)]
        reference = fedavg_floats(self.weights.size, cohorts)  # the paper counts weights only
        paper = float(sum(self.paper_floats.values()))
        measured = sum(f["measured_floats"] for f in self.round_figures.values())
        kinds = sum(self.catch_ups.values(), Counter())
        frozen = [f["frozen_fraction"] for f in self.round_figures.values()]
        return {
            "paper_floats": paper,
            "paper_volume_ratio": paper / reference if reference else float("nan"),
            "measured_volume_ratio": measured / fedavg_floats(self.weights.size + self.buffers.size, cohorts)
            if reference
            else float("nan"),
            "mask_bytes": float(sum(f["mask_bytes"] for f in self.round_figures.values())),
            "frozen_fraction_mean": float(np.mean(frozen)) if frozen else 0.0,
            "frozen_fraction_next": float(self.controller.frozen_fraction),
            "apf_checks": self.controller.n_checks,
            "apf_threshold_final": self.controller.threshold,
            **{f"sync_{k}": int(kinds[k]) for k in CATCH_UP_KINDS},
            "masks_sent": int(kinds["mask"]),
            "apf_check_every": self.check_every,
            "apf_aggressive": self.aggressive,
            "apf_random_freeze_periods": self.config["apf-random-freeze-periods"],
        }


def read_catch_ups(value: Any) -> Counter:
    """A round's catch-up kind counts (and "mask": masks sent), from their checkpointed form."""
    counts = checked(value, dict)
    if not set(counts) <= {*CATCH_UP_KINDS, "mask"} or not all(type(v) is int and v >= 0 for v in counts.values()):
        raise CheckpointError(f"must count kinds among {CATCH_UP_KINDS} and 'mask', got {shown(counts)}")
    return Counter(counts)


def read_figures(value: Any) -> dict[str, float]:
    """A round's measured figures (`APF._measure`), from their checkpointed form."""
    figures = checked(value, dict)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values()):
        raise CheckpointError(f"must map names to numbers, got {shown(figures)}")
    return figures


class AggressiveAPF(APF):
    """A-APF: APF plus seeded random freezes of unstable scalars (`apf-random-freeze-periods`)."""

    name = "a-apf"
    aggressive = True
