import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcmd.accountant import VolumeAccountant, fedavg_floats, wire_size


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def message(n_weights: int, n_coeff: int = 0) -> Message:
    content = RecordDict(
        {
            "weights": ArrayRecord({"values": Array(np.ones(n_weights, np.float32))}),
            "config": ConfigRecord({"lr": 0.1, "dataset": "fashion-mnist"}),
        }
    )
    if n_coeff:
        content["coefficients"] = ArrayRecord(
            {"a": Array(np.ones(n_coeff, np.float32)), "mode": Array(np.zeros(n_coeff, np.int16))}
        )
    return Message(content, dst_node_id=7, message_type="train", group_id="1")


def test_values_floats_and_raw_bytes_per_category():
    acc = VolumeAccountant()
    total = acc.record_message(1, 3, "down", message(1000, n_coeff=10))
    rows = {r.category: r for r in acc.rows}
    assert rows["weights"].values == 1000 and rows["weights"].raw_bytes == 4000 and rows["weights"].floats == 1000
    # float32 a (40 B) + int16 mode (20 B) = 60 raw bytes = 15 float32-equivalents
    assert rows["coefficients"].values == 20 and rows["coefficients"].raw_bytes == 60
    assert rows["coefficients"].floats == 15
    assert rows["metadata"].floats == 0 and rows["metadata"].wire_bytes > 0
    # serialised bytes of all categories add up to the whole message, and exceed the raw payload
    assert sum(r.wire_bytes for r in acc.rows) == total == wire_size(message(1000, n_coeff=10))
    assert rows["weights"].wire_bytes > 4000


def test_totals_by_direction_round_and_fedavg_reference():
    acc = VolumeAccountant()
    for rnd in (1, 2):
        for client in (0, 1, 2):
            acc.record_message(rnd, client, "down", message(500))
            acc.record_message(rnd, client, "up", message(500))
    t = acc.direction_totals()
    assert t["floats_up"] == t["floats_down"] == 2 * 3 * 500
    assert t["raw_bytes_up"] == 2 * 3 * 500 * 4
    assert set(acc.round_totals()) == {1, 2}
    assert fedavg_floats(500, [3, 3]) == t["floats_up"] + t["floats_down"]


def test_csv_and_state_round_trip(tmp_path):
    acc = VolumeAccountant()
    acc.record_message(1, 0, "down", message(100, n_coeff=4))
    acc.write_csv(tmp_path / "v.csv")
    assert VolumeAccountant.read_csv(tmp_path / "v.csv").rows == acc.rows
    other = VolumeAccountant()
    other.load_state_dict(acc.state_dict())
    assert other.rows == acc.rows


def test_rejects_unknown_category_and_direction():
    acc = VolumeAccountant()
    with pytest.raises(ValueError, match="category"):
        acc.record(1, 0, "up", "gradients", values=1, raw_bytes=4, wire_bytes=10)
    with pytest.raises(ValueError, match="direction"):
        acc.record(1, 0, "sideways", "weights", values=1, raw_bytes=4, wire_bytes=10)


# --- the bytes booked are Flower's own serialisation of each message --------------------------------


def flower_wire_bytes(obj) -> int:
    """What the accountant booked before it spared deflates (and what Flower pushes): every distinct
    object of the tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

    with no_object_id_recompute():
        return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def flower_rows(message: Message) -> dict[str, int]:
    """Bytes per category as the accountant booked them before: each array record on its own, the rest metadata."""
    rows = {}
    if message.has_content():
        rows = {
            key: flower_wire_bytes(record)
            for key, record in message.content.items()
            if key in ("weights", "buffers", "references", "coefficients", "indices", "masks")
            and isinstance(record, ArrayRecord)
        }
    rows["metadata"] = flower_wire_bytes(message) - sum(rows.values())
    return rows


def booked(message: Message) -> dict[str, int]:
    acc = VolumeAccountant()
    total = acc.record_message(1, 0, "down", message)
    assert total == sum(r.wire_bytes for r in acc.rows)
    return {r.category: r.wire_bytes for r in acc.rows}


def discovery_exchange():
    from fedcmd.client_app import app as client_app
    from fedcmd.engine import LocalGrid
    from fedcmd.server import discovery_queries

    grid = LocalGrid(client_app, 3)
    queries = discovery_queries(grid.get_node_ids(), 1)
    return queries, list(grid.send_and_receive(queries))


def test_discovery_bytes_are_flowers_serialisation():
    queries, replies = discovery_exchange()
    assert len(replies) == 3
    for message in queries + replies:
        assert booked(message) == flower_rows(message) == {"metadata": flower_wire_bytes(message)}
        assert booked(message)["metadata"] == wire_size(message)


def test_model_message_bytes_are_flowers_serialisation():
    shared = Array(np.arange(300, dtype=np.float32))
    twice = message(1000, n_coeff=10)
    # the same array under two names and in two categories: Flower sends it once per message,
    # while each category's row counts it
    twice.content["references"] = ArrayRecord({"r": shared, "s": shared})
    twice.content["indices"] = ArrayRecord({"i": shared, "j": Array(np.arange(7, dtype=np.int64))})
    error = Message(Error(code=0, reason="ValueError: no"), reply_to=discovery_exchange()[0][0])
    for msg in (message(1000, n_coeff=10), twice, error):
        assert booked(msg) == flower_rows(msg)
    assert booked(error) == {"metadata": flower_wire_bytes(error)}


# --- sizes without hashing are Flower's bytes, over many message shapes ------------------------------
# `message_bytes` measures the Message and its RecordDict from their bodies and dedupes records by
# their bytes; every case below is checked against Flower deflating and hashing every object.

# a uint64 of every varint length (1 to 10 bytes), for node, run and task ids
VARINT_EDGES = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21, 2**28, 2**35, 2**42, 2**49, 2**56, 2**63 - 1, 2**64 - 1]
# ASCII, characters JSON escapes, and non-ASCII of 2, 3 and 4 UTF-8 bytes (`json.dumps` writes \\uXXXX)
CHARACTERS = list("abcXYZ09 -_.:/") + ['"', "\\", "\n", "\t", "\x00", "\x7f", "é", "ß", "漢", "😀"]


def pick(rng, options):
    return options[int(rng.integers(0, len(options)))]


def text(rng, longest: int = 12) -> str:
    return "".join(pick(rng, CHARACTERS) for _ in range(int(rng.integers(0, longest + 1))))


def integer(rng, *, unsigned_max: bool = True) -> int:
    value = pick(rng, VARINT_EDGES if unsigned_max else VARINT_EDGES[:-1]) - int(rng.integers(0, 2))
    value = max(value, 0)
    return -value if value <= 2**63 and rng.random() < 0.3 else value


def real(rng) -> float:
    return pick(rng, [0.0, -0.0, 1.0, float("inf"), float("nan"), float(rng.normal() * 10.0 ** rng.integers(-30, 30))])


def config_value(rng):
    """One value of every type a ConfigRecord takes, or a list of them (empty lists too)."""
    listed = rng.random() < 0.4  # a list's ints are all int64 or all uint64: no negatives beside 2**64 - 1
    kinds = [
        lambda: integer(rng, unsigned_max=not listed),
        lambda: real(rng),
        lambda: text(rng),
        lambda: rng.bytes(int(rng.integers(0, 40))),
        lambda: bool(rng.integers(0, 2)),
    ]
    kind = pick(rng, kinds)
    return [kind() for _ in range(int(rng.integers(0, 6)))] if listed else kind()


def metric_value(rng):
    listed = rng.random() < 0.4
    kind = pick(rng, [lambda: integer(rng, unsigned_max=not listed), lambda: real(rng)])
    return [kind() for _ in range(int(rng.integers(0, 6)))] if listed else kind()


def leaf_record(rng):
    if rng.random() < 0.5:
        return ConfigRecord({text(rng): config_value(rng) for _ in range(int(rng.integers(0, 5)))})
    return MetricRecord({text(rng): metric_value(rng) for _ in range(int(rng.integers(0, 5)))})


def array_record(rng) -> ArrayRecord:
    """Arrays of a few dtypes and shapes; with 64-byte chunks, zeros and tiled values repeat chunks."""
    arrays = {}
    for _ in range(int(rng.integers(0, 4))):
        dtype = pick(rng, [np.float32, np.int16, np.int64, np.uint8])
        size = int(rng.integers(0, 120))
        values = pick(
            rng,
            [
                np.zeros(size, dtype),
                np.tile(np.arange(16, dtype=dtype), size // 16 + 1)[:size],
                rng.integers(0, 100, size).astype(dtype),
            ],
        )
        arrays[text(rng) or "a"] = Array(values.reshape(-1, 2) if size % 2 == 0 and rng.random() < 0.3 else values)
    return ArrayRecord(arrays)


def content(rng, *, arrays: bool) -> RecordDict:
    """Random records under random names; some held twice, under two names, or as an equal copy."""

    def name(record) -> str:  # array records under the accountant's categories
        if isinstance(record, ArrayRecord):
            return pick(rng, ["weights", "buffers", "references", "coefficients", "indices", "masks"])
        return text(rng)

    records = {}
    for _ in range(int(rng.integers(0, 5))):
        draw = rng.random()
        if records and draw < 0.2:  # the same record object under another name
            record = records[pick(rng, list(records))]
        elif records and draw < 0.35:  # an equal record built anew
            other = records[pick(rng, list(records))]
            record = type(other)(dict(other))
        else:
            record = array_record(rng) if arrays and draw < 0.7 else leaf_record(rng)
        records[name(record)] = record
    return RecordDict(records)


def random_message(rng, *, arrays: bool = False) -> Message:
    """An instruction or a reply (with content or an error), metadata drawn across varint lengths."""
    query = Message(
        content(rng, arrays=arrays),
        dst_node_id=abs(integer(rng)),
        message_type=pick(rng, ["query", "train", "evaluate", "query.discover", "train.fit"]),
        group_id=text(rng) if rng.random() < 0.8 else None,
        ttl=float(rng.uniform(1.0, 1e6)) if rng.random() < 0.5 else None,
        dst_task_id=abs(integer(rng)) if rng.random() < 0.3 else None,
    )
    query.metadata.__dict__["_message_id"] = text(rng, 40)  # blanked in the object (Message.deflate)
    if rng.random() < 0.4:
        return query
    if rng.random() < 0.3:
        reason = text(rng, 60) if rng.random() < 0.8 else None
        reply = Message(Error(code=abs(integer(rng, unsigned_max=False)), reason=reason), reply_to=query)
    else:
        reply = Message(
            content(rng, arrays=arrays),
            reply_to=query,
            ttl=float(rng.uniform(1.0, 1e3)) if rng.random() < 0.5 else None,
        )
    reply.metadata.__dict__["_message_id"] = text(rng, 40)
    return reply


@pytest.fixture
def random_identity():
    """The sender's run, node and task ids, which Message() reads from TaskIdentity: long varints."""
    names = ("run_id", "node_id", "task_id")
    saved = [getattr(TaskIdentity, name) for name in names]
    for name, value in zip(names, (2**64 - 1, 2**35, 2**14)):
        setattr(TaskIdentity, name, value)
    yield
    for name, value in zip(names, saved):
        setattr(TaskIdentity, name, value)


@pytest.mark.parametrize("seed", range(4))
def test_metadata_messages_sized_without_hashes_are_flowers_bytes(seed, random_identity):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        msg = random_message(rng)
        assert wire_size(msg) == flower_wire_bytes(msg)
        assert booked(msg) == flower_rows(msg)


@pytest.mark.parametrize("seed", range(3))
def test_array_messages_sized_without_hashes_are_flowers_bytes(seed, random_identity, monkeypatch):
    monkeypatch.setattr("flwr.app.message.array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 64)
    rng = np.random.default_rng(100 + seed)
    for _ in range(60):
        msg = random_message(rng, arrays=True)
        assert wire_size(msg) == flower_wire_bytes(msg)
        assert booked(msg) == flower_rows(msg)


def test_equal_records_are_one_object_and_repeated_chunks_one_chunk(monkeypatch):
    monkeypatch.setattr("flwr.app.message.array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 64)
    config = ConfigRecord({"lr": 0.1, "names": ["a", "é"], "blob": b"\x00\x01"})
    alone = Message(RecordDict({"config": config}), dst_node_id=7, message_type="train")
    twice = Message(
        RecordDict({"config": config, "again": ConfigRecord(dict(config))}), dst_node_id=7, message_type="train"
    )
    # one object for Flower; the second name costs only its entry in the RecordDict
    assert len(twice.content.children) == 1
    assert wire_size(twice) == flower_wire_bytes(twice)
    assert wire_size(twice) - wire_size(alone) == len(twice.content.deflate()) - len(alone.content.deflate())
    zeros = Array(np.zeros(256, np.float32))  # after the .npy header, 64-byte chunks of zeros: one object
    chunks = zeros.children
    assert len(zeros.slice_array()) == 18 and len(chunks) == 3
    msg = Message(RecordDict({"weights": ArrayRecord({"values": zeros})}), dst_node_id=7, message_type="train")
    assert booked(msg) == flower_rows(msg)
    assert booked(msg)["weights"] == (
        len(msg.content["weights"].deflate())
        + len(zeros.deflate())
        + sum(len(chunk.deflate()) for chunk in chunks.values())
    )
