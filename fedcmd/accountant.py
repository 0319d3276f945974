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
import json
from collections import defaultdict
from dataclasses import astuple, dataclass, fields
from functools import lru_cache
from pathlib import Path

import flwr.app.message.array as flower_array
import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.serde_utils import error_to_proto, metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_object import no_object_id_recompute

from fedcmd.checkpoint import CheckpointError, array_entry
from fedcmd.codecs import describe
from fedcmd.wire import array_view

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
COLUMN_DTYPES = {
    "round": np.int64,
    "client": np.int64,
    "direction": str,
    "category": str,
    "values": np.int64,
    "floats": np.float64,
    "raw_bytes": np.int64,
    "wire_bytes": np.int64,
}


def wire_size(obj) -> int:
    """Bytes of an inflatable object (Message, record, Array) as Flower serialises it."""
    if isinstance(obj, Message):
        return message_bytes(obj)[0]
    # Without the context every parent's deflate recomputes its children's ids (hashing their
    # bodies again): measured 4.5x slower on a LeNet-5 model message.
    with no_object_id_recompute():
        return len(obj.deflate()) + sum(objects_below(obj, {}).values())


ID_CHARS = 64  # an object id is a sha256 hex digest


def deflated_length(obj, body_bytes: int, children: int) -> int:
    """`len(obj.deflate())` for an object (or the name of its class) whose body is `body_bytes` long
    and which has `children` distinct children, without their ids: Flower's header is "<class>
    <comma-joined child ids> <body length>" (`add_header_to_object_body`), and every id is
    `ID_CHARS` long."""
    ids = children * (ID_CHARS + 1) - 1 if children else 0
    return (
        len(obj if isinstance(obj, str) else type(obj).__qualname__)
        + 2 * len(HEAD_VALUE_DIVIDER)
        + ids
        + len(str(body_bytes))
        + len(HEAD_BODY_DIVIDER)
        + body_bytes
    )


@lru_cache(maxsize=256)
def _record_dict_body(names: tuple[str, ...]) -> int:
    """Length of a RecordDict's body, `json.dumps({name: child id})`: it depends on the names only."""
    return len(json.dumps(dict.fromkeys(names, "0" * ID_CHARS)))


def message_bytes(message: Message) -> tuple[int, dict[str, int]]:
    """(serialised bytes of `message`, those of each array record's tree by key), each distinct
    object counted once, as Flower sends it.

    The sum is the one of `get_all_nested_objects(message)`'s deflated sizes, computed without
    hashing what has no arrays: Flower identifies an object by the hash of its deflated bytes,
    and a parent's bytes hold its children's ids, so deflating a message hashes every record in
    it. But a parent's size depends only on how many distinct children it has (each id is 64
    characters), and two records are one object exactly when their deflated bytes are equal.
    So the message and its RecordDict are measured from their bodies (the Message's: its
    metadata, message id blanked, and error; the RecordDict's: its names and one id each), and
    every record is deflated once, with no id; below an array record (Arrays, ArrayChunks, which
    may repeat, also across records) objects are counted by id, the ids its deflate computed.
    """
    metadata = metadata_to_proto(message.metadata)
    metadata.message_id = ""  # not part of the object (`Message.deflate`)
    error = error_to_proto(message.error) if message.has_error() else None
    body = ProtoMessage(metadata=metadata, error=error).ByteSize()
    if not message.has_content():
        return deflated_length(message, body, 0), {}
    content = message.content
    records: dict[bytes, int] = {}  # distinct records by deflated bytes: equal bytes, one object
    with_arrays = []
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            with_arrays.append((key, record))
        else:  # no children, no ids
            deflated = record.deflate()
            records[deflated] = len(deflated)
    below: dict[tuple, int] = {}  # distinct objects below the array records, by content
    arrays: dict[str, int] = {}
    if with_arrays:
        chunks = ChunkClasses()
        for key, record in with_arrays:
            record_key, record_size, tree = array_record_tree(record, chunks)
            records[record_key] = record_size
            arrays[key] = record_size + sum(tree.values())
            below.update(tree)
    record_dict = deflated_length(content, _record_dict_body(tuple(content)), len(records))
    total = deflated_length(message, body, 1) + record_dict + sum(records.values()) + sum(below.values())
    return total, arrays


class ChunkClasses:
    """Numbers the distinct contents of array chunks in one message: two chunks are one object to
    Flower exactly when their bytes are equal (an object's id is the hash of its bytes). Equal bytes
    are found by comparing the chunks that share a length and their first and last 64 bytes, not by
    hashing everything (what Flower's ids cost: ~1 ms per MB)."""

    def __init__(self) -> None:
        self.seen: dict[tuple, list[tuple[memoryview, int]]] = {}
        self.count = 0

    def of(self, data: memoryview) -> int:
        key = (len(data), bytes(data[:64]), bytes(data[-64:]))
        candidates = self.seen.setdefault(key, [])
        for other, number in candidates:
            if _equal_bytes(data, other):
                return number
        self.count += 1
        candidates.append((data, self.count))
        return self.count


def _equal_bytes(a: memoryview, b: memoryview) -> bool:
    whole = len(a) // 8 * 8
    if not np.array_equal(np.frombuffer(a[:whole], np.uint64), np.frombuffer(b[:whole], np.uint64)):
        return False
    return bytes(a[whole:]) == bytes(b[whole:])


def array_record_tree(record: ArrayRecord, chunks: ChunkClasses) -> tuple[tuple, int, dict[tuple, int]]:
    """(a key equal for records Flower sends as one object, the record's deflated size, the sizes of
    the distinct objects below it by key): what `deflate` and the objects' ids give, computed from
    lengths and byte comparisons (`ChunkClasses`), never hashing or copying an array's data.

    Flower's forms: an ArrayChunk is a header and its slice of the Array's .npy bytes (slices of
    `FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`); an Array's body is the JSON of its dtype, shape, stype and,
    per slice, the position of its chunk among the Array's distinct chunks; an ArrayRecord's body is
    the JSON of {name: array id}, and each header lists the object's distinct children's ids."""
    chunk_bytes = flower_array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # read now: an environment variable sets it
    tree: dict[tuple, int] = {}
    array_keys = []
    for array in record.values():
        data = memoryview(array.data)
        numbers = [chunks.of(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]
        for i, number in zip(range(0, len(data), chunk_bytes), numbers):
            tree[("chunk", number)] = deflated_length("ArrayChunk", len(data[i : i + chunk_bytes]), 0)
        distinct = list(dict.fromkeys(numbers))
        body = json.dumps(
            {
                "dtype": array.dtype,
                "shape": array.shape,
                "stype": array.stype,
                "arraychunk_ids": [distinct.index(n) for n in numbers],
            }
        ).encode("utf-8")
        array_key = ("array", body)  # equal bodies hold equal chunk positions; the chunks themselves:
        array_key = (*array_key, tuple(distinct))
        tree[array_key] = deflated_length("Array", len(body), len(distinct))
        array_keys.append(array_key)
    body = len(json.dumps(dict.fromkeys(record.keys(), "0" * ID_CHARS)).encode("utf-8"))
    distinct_arrays = len(set(array_keys))
    record_key = ("record", tuple(record.keys()), tuple(array_keys))
    return record_key, deflated_length("ArrayRecord", body, distinct_arrays), tree


def objects_below(obj, sizes: dict[str, int]) -> dict[str, int]:
    """Object id -> deflated bytes of each distinct object below `obj`, whose ids are known (it
    was deflated in this `no_object_id_recompute()` context); `sizes` remembers them by id (an
    id is the hash of the object's deflated bytes: one id, one size)."""
    out: dict[str, int] = {}
    stack = list((obj.children or {}).items())  # an explicit stack: deep Array chunk trees, no recursion
    while stack:
        child_id, child = stack.pop()
        if child_id in out:
            continue
        if child_id not in sizes:
            sizes[child_id] = len(child.deflate())
        out[child_id] = sizes[child_id]
        stack.extend((child.children or {}).items())
    return out


def _size(array) -> tuple[int, int]:
    """(values, raw bytes) of an Array; (0, bytes received) for one that does not decode: a
    malformed reply is still traffic."""
    try:
        values = array_view(array)
    except Exception:  # whatever a client's bytes make numpy raise
        return 0, len(array.data)
    return int(values.size), int(values.nbytes)


def _payload_size(record: ArrayRecord) -> tuple[int, int]:
    """(dense values, encoded bytes) of a dense payload, whichever codec encoded it."""
    try:
        arrays = {name: array_view(array) for name, array in record.items()}
    except Exception:  # a client's bytes that do not decode are still traffic
        return 0, sum(len(array.data) for array in record.values())
    return describe(arrays)


class VolumeAccountant:
    """Rows of measured traffic, with totals per round and per run."""

    def __init__(self) -> None:
        self.rows: list[VolumeRow] = []

    def record(
        self,
        server_round: int,
        client: int,
        direction: str,
        category: str,
        *,
        values: int,
        raw_bytes: int,
        wire_bytes: int,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if category not in CATEGORIES and category != METADATA:
            raise ValueError(f"unknown volume category {category!r}")
        self.rows.append(
            VolumeRow(
                int(server_round),
                int(client),
                direction,
                category,
                int(values),
                raw_bytes / 4.0 if category != METADATA else 0.0,
                int(raw_bytes),
                int(wire_bytes),
            )
        )

    def record_message(self, server_round: int, client: int, direction: str, message: Message) -> int:
        """Count one message; returns its serialised size in bytes."""
        total, array_bytes = message_bytes(message)
        counted = 0
        for key, size in array_bytes.items():
            record = message.content[key]
            category = key
            if key not in CATEGORIES or key == "unread":
                if direction == "down":
                    raise ValueError(
                        f"a message to client {client} holds an array record under {key!r}, "
                        f"which the volume accountant does not know (categories: {CATEGORIES})"
                    )
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
        return dict(
            floats_up=up["floats"],
            floats_down=down["floats"],
            bytes_up=up["wire_bytes"],
            bytes_down=down["wire_bytes"],
            raw_bytes_up=up["raw_bytes"],
            raw_bytes_down=down["raw_bytes"],
        )

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
                acc.rows.append(
                    VolumeRow(
                        int(rec["round"]),
                        int(rec["client"]),
                        rec["direction"],
                        rec["category"],
                        int(rec["values"]),
                        float(rec["floats"]),
                        int(rec["raw_bytes"]),
                        int(rec["wire_bytes"]),
                    )
                )
        return acc

    def state_dict(self) -> dict[str, np.ndarray]:
        """The rows as column arrays, for checkpoints (every round: read by attribute, not with
        `dataclasses.astuple`, which deep-copies each row and made this 0.3 s per round once
        discovering 10,000 nodes had left 20,000 rows)."""
        return {
            name: np.asarray([getattr(r, name) for r in self.rows], dtype=dtype)
            for name, dtype in COLUMN_DTYPES.items()
        }

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
