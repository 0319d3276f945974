import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcmd.accountant import VolumeAccountant, fedavg_floats, wire_size


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def message(n_weights: int, n_coeff: int = 0) -> Message:
    content = RecordDict({"weights": ArrayRecord({"values": Array(np.ones(n_weights, np.float32))}),
                          "config": ConfigRecord({"lr": 0.1, "dataset": "fashion-mnist"})})
    if n_coeff:
        content["coefficients"] = ArrayRecord({"a": Array(np.ones(n_coeff, np.float32)),
                                              "mode": Array(np.zeros(n_coeff, np.int16))})
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
        rows = {key: flower_wire_bytes(record) for key, record in message.content.items()
                if key in ("weights", "buffers", "references", "coefficients", "indices", "masks")
                and isinstance(record, ArrayRecord)}
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

    grid = LocalGrid(client_app, 3)
    queries = [Message(RecordDict(), dst_node_id=node, message_type="query", group_id="discover-1")
               for node in grid.get_node_ids()]
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
