import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
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
    other.load_state(acc.state())
    assert other.rows == acc.rows


def test_rejects_unknown_category_and_direction():
    acc = VolumeAccountant()
    with pytest.raises(ValueError, match="category"):
        acc.record(1, 0, "up", "gradients", values=1, raw_bytes=4, wire_bytes=10)
    with pytest.raises(ValueError, match="direction"):
        acc.record(1, 0, "sideways", "weights", values=1, raw_bytes=4, wire_bytes=10)
