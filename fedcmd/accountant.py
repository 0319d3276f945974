"""Volume accountant: every message a strategy sends or receives, counted per round, client,
direction and category, in values, float32-equivalents, raw bytes and serialised bytes.

Categories are the keys of the records in a message's RecordDict: a strategy puts the dense model
values under `weights`, CMD reference values under `references`, (a, b, mode) under
`coefficients`, and so on. Everything that is not an array record (config, metrics, the message
envelope) is `metadata`. An array record under any other key is an error in a message the server
sends (a strategy added a payload the accountant would not count); in a reply it is booked as
`unread` (a client sent it; the strategy rejects the reply, but the bytes crossed the wire).

The dense payloads (`weights`, `references`, `buffers`) may be encoded by a wire codec
(`fedcmd.codecs`): their `values` are the dense values the payload carries (what it decodes to)
and their raw bytes the encoded size, so 8 * raw bytes / values is the payload's bits per value.

Serialised bytes are what Flower 1.41 transmits: a message travels as a tree of inflatable
objects (Message, RecordDict, records, Arrays, ArrayChunks), each a header plus a body; the sum of
their deflated sizes is the payload of the gRPC calls that carry the message.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import no_object_id_recompute

from fedcmd.checkpoint import CheckpointError, array_entry
from fedcmd.codecs import describe

PAYLOADS = ("weights", "buffers", "references")  # dense values, possibly codec-encoded
CATEGORIES = (*PAYLOADS, "coefficients", "indices", "masks", "unread")
METADATA = "metadata"
DIRECTIONS = ("up", "down")


@dataclass(frozen=True)
class VolumeRow:
    round: int
    client: int
    direction: str
    category: str
    values: int
    floats: float
    raw_bytes: int
    wire_bytes: int


# The columns of `VolumeAccountant.state_dict`, in VolumeRow's order (str: a numpy unicode array).
COLUMN_DTYPES = {"round": np.int64, "client": np.int64, "direction": str, "category": str, "values": np.int64,
                 "floats": np.float64, "raw_bytes": np.int64, "wire_bytes": np.int64}


def wire_size(obj) -> int:
    """Bytes of an inflatable object (Message, record, Array) as Flower serialises it."""
    # Without the context every parent's deflate recomputes its children's ids (hashing their
    # bodies again): measured 3x slower on a discovery reply, 4.5x on a LeNet-5 model message.
    with no_object_id_recompute():
        return tree_bytes(obj, {})


def tree_bytes(obj, sizes: dict[str, int], object_id: str | None = None) -> int:
    """Serialised bytes of `obj` and everything below it, each distinct object (by object id)
    counted once, as Flower sends it; to be called inside `no_object_id_recompute()`.

    The sum is the one of `get_all_nested_objects(obj)`'s deflated sizes, computed with fewer
    deflates: that function deflates every object once for its id and the sum deflates it again.
    Here the root is deflated once (nothing needs its id; deflating it computes its children's
    ids), and `sizes` (object id -> deflated bytes) remembers every object measured in the same
    context, so a record measured after the message holding it costs no deflate at all. An id is
    the hash of the object's deflated bytes: one id, one size. `object_id` is `obj`'s id where the
    caller knows it (a child's is, once its parent has been deflated).
    """
    if object_id is not None and object_id in sizes:
        total = sizes[object_id]
    else:
        total = len(obj.deflate())
        if object_id is not None:
            sizes[object_id] = total
    seen: set[str] = set()
    below = list((obj.children or {}).items())  # an explicit stack: deep Array chunk trees, no recursion
    while below:
        child_id, child = below.pop()
        if child_id in seen:
            continue
        seen.add(child_id)
        if child_id not in sizes:
            sizes[child_id] = len(child.deflate())
        total += sizes[child_id]
        below.extend((child.children or {}).items())
    return total


def _size(array) -> tuple[int, int]:
    """(values, raw bytes) of an Array; (0, bytes received) for one that does not decode: a
    malformed reply is still traffic."""
    try:
        values = array.numpy()
    except Exception:  # whatever a client's bytes make numpy raise
        return 0, len(array.data)
    return int(values.size), int(values.nbytes)


def _payload_size(record: ArrayRecord) -> tuple[int, int]:
    """(dense values, encoded bytes) of a dense payload, whichever codec encoded it."""
    try:
        arrays = {name: array.numpy() for name, array in record.items()}
    except Exception:  # a client's bytes that do not decode are still traffic
        return 0, sum(len(array.data) for array in record.values())
    return describe(arrays)


class VolumeAccountant:
    """Rows of measured traffic, with totals per round and per run."""

    def __init__(self) -> None:
        self.rows: list[VolumeRow] = []

    def record(self, server_round: int, client: int, direction: str, category: str, *,
               values: int, raw_bytes: int, wire_bytes: int) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if category not in CATEGORIES and category != METADATA:
            raise ValueError(f"unknown volume category {category!r}")
        self.rows.append(VolumeRow(int(server_round), int(client), direction, category, int(values),
                                   raw_bytes / 4.0 if category != METADATA else 0.0,
                                   int(raw_bytes), int(wire_bytes)))

    def record_message(self, server_round: int, client: int, direction: str, message: Message) -> int:
        """Count one message; returns its serialised size in bytes."""
        # One context for the message and its records: ids computed for the message serve the
        # records, and `deflated` spares deflating any object twice (see `tree_bytes`).
        deflated: dict[str, int] = {}
        with no_object_id_recompute():
            total = tree_bytes(message, deflated)
            records = [(key, record, tree_bytes(record, deflated, record.object_id))
                       for key, record in (message.content.items() if message.has_content() else ())
                       if isinstance(record, ArrayRecord)]
        counted = 0
        for key, record, size in records:
            category = key
            if key not in CATEGORIES or key == "unread":
                if direction == "down":
                    raise ValueError(f"a message to client {client} holds an array record under {key!r}, "
                                     f"which the volume accountant does not know (categories: {CATEGORIES})")
                category = "unread"
            counted += size
            if category in PAYLOADS:
                values, raw = _payload_size(record)
            else:
                sizes = [_size(array) for array in record.values()]
                values, raw = sum(v for v, _ in sizes), sum(b for _, b in sizes)
            self.record(server_round, client, direction, category, values=values, raw_bytes=raw, wire_bytes=size)
        # Metadata has no model payload: its cost is only its serialised size.
        self.record(server_round, client, direction, METADATA, values=0, raw_bytes=0, wire_bytes=total - counted)
        return total

    def totals(self, by: tuple[str, ...] = ()) -> dict[tuple, dict[str, float]]:
        """Sums of values, floats, raw and wire bytes, grouped by the named row fields."""
        out: dict[tuple, dict[str, float]] = defaultdict(lambda: dict(values=0, floats=0.0, raw_bytes=0, wire_bytes=0))
        for row in self.rows:
            acc = out[tuple(getattr(row, name) for name in by)]
            acc["values"] += row.values
            acc["floats"] += row.floats
            acc["raw_bytes"] += row.raw_bytes
            acc["wire_bytes"] += row.wire_bytes
        return dict(out)

    def direction_totals(self) -> dict[str, float]:
        """floats_up, floats_down, bytes_up, bytes_down (serialised), raw_bytes_up, raw_bytes_down."""
        t = self.totals(("direction",))
        zero = dict(values=0, floats=0.0, raw_bytes=0, wire_bytes=0)
        up, down = t.get(("up",), zero), t.get(("down",), zero)
        return dict(floats_up=up["floats"], floats_down=down["floats"],
                    bytes_up=up["wire_bytes"], bytes_down=down["wire_bytes"],
                    raw_bytes_up=up["raw_bytes"], raw_bytes_down=down["raw_bytes"])

    def bits_per_value(self) -> dict[str, float]:
        """Payload bits per dense value sent, per direction (32 for float32; NaN without payload)."""
        out = {}
        for direction in DIRECTIONS:
            rows = [r for r in self.rows if r.direction == direction and r.category in PAYLOADS]
            values = sum(r.values for r in rows)
            out[direction] = 8.0 * sum(r.raw_bytes for r in rows) / values if values else float("nan")
        return out

    def round_totals(self) -> dict[int, dict[str, float]]:
        return {key[0]: value for key, value in sorted(self.totals(("round",)).items())}

    def write_csv(self, path: str | Path, *, start: int = 0) -> None:
        """All rows, with the header; with `start` > 0, append rows[start:] to the file instead."""
        with open(path, "a" if start else "w", newline="") as fh:
            writer = csv.writer(fh)
            if not start:
                writer.writerow([f.name for f in fields(VolumeRow)])
            writer.writerows(astuple(row) for row in self.rows[start:])

    @classmethod
    def read_csv(cls, path: str | Path) -> "VolumeAccountant":
        acc = cls()
        with open(path, newline="") as fh:
            for rec in csv.DictReader(fh):
                acc.rows.append(VolumeRow(int(rec["round"]), int(rec["client"]), rec["direction"], rec["category"],
                                          int(rec["values"]), float(rec["floats"]), int(rec["raw_bytes"]),
                                          int(rec["wire_bytes"])))
        return acc

    def state_dict(self) -> dict[str, np.ndarray]:
        """The rows as column arrays, for checkpoints."""
        columns = list(zip(*(astuple(r) for r in self.rows))) if self.rows else [()] * len(COLUMN_DTYPES)
        return {name: np.asarray(col, dtype=dtype) for (name, dtype), col in zip(COLUMN_DTYPES.items(), columns)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Rows from `state_dict`'s columns, checked: dtypes, one length, known directions and categories."""
        columns = {name: array_entry(state, name, dtype, (None,)) for name, dtype in COLUMN_DTYPES.items()}
        if len({col.size for col in columns.values()}) != 1:
            raise CheckpointError(f"columns differ in length: { {k: v.size for k, v in columns.items()} }")
        for name, known in (("direction", DIRECTIONS), ("category", (*CATEGORIES, METADATA))):
            unknown = sorted(set(columns[name].tolist()) - set(known))
            if unknown:
                raise CheckpointError(f"unknown values {unknown[:5]}", (name,))
        self.rows = [VolumeRow(*row) for row in zip(*(columns[name].tolist() for name in COLUMN_DTYPES))]


def fedavg_floats(model_floats: int, cohort_sizes: list[int]) -> float:
    """Floats FedAvg moves with the same cohorts: the full model down to and up from each client."""
    return float(2 * model_floats * sum(cohort_sizes))
