"""One real run on Flower's simulation engine (Ray): federated CMD, the most stateful client code
(coefficient stores persist in each node's context across rounds)."""

import csv
import json

import numpy as np
import pytest

from fedcmd.engine import run_inprocess, run_ray

pytestmark = pytest.mark.slow  # real Ray / deployment / flwr run: `make test-fast` leaves it out


def test_cmd_on_ray_embeds_and_clients_keep_their_stores(small_config, tmp_path):
    config = dict(
        small_config,
        **{
            "strategy": "cmd",
            "num-server-rounds": 4,
            "cmd-warmup": 1,
            "cmd-every": 1,
            "cmd-fraction": 0.3,
            "cmd-samples": 300,
        },
    )
    summary = run_ray(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # events after rounds 2 and 3 reach the clients in rounds 3 and 4; a store that did not persist
    # in a node's context would refuse the second delta and show up here as a rejected reply
    assert summary["rounds"] == 4 and summary["replies_rejected"] == 0
    assert summary["embedding_events"] >= 2 and summary["volume_ratio"] < 1.0
    assert summary["final_accuracy"] > 0.5


@pytest.mark.parametrize("strategy", ("fedavg", "cmd", "apf", "a-apf"))
def test_short_rounds_on_ray_match_the_in_process_run(small_config, tmp_path, strategy):
    """local-steps with Adam state kept: every node continues its batch stream and its optimizer
    across rounds on Ray exactly as in process (same global models round by round)."""
    config = dict(
        small_config,
        **{
            "strategy": strategy,
            "num-server-rounds": 3,
            "local-steps": 5,
            "optimizer": "adam",
            "lr": 0.002,
            "optimizer-state": "keep",
            "cmd-warmup": 1,
            "cmd-every": 1,
            "cmd-fraction": 0.3,
            "cmd-samples": 300,
        },
    )
    on_ray = run_ray(config, tmp_path / "ray", progress=False)
    in_process = run_inprocess(config, tmp_path / "inp", progress=False)
    assert on_ray["replies_rejected"] == 0 and on_ray["rounds"] == 3
    assert on_ray["final_accuracy"] == in_process["final_accuracy"]
    accuracy = lambda out: [(row["accuracy"], row["train_loss"]) for row in csv.DictReader(open(out / "metrics.csv"))]
    assert accuracy(tmp_path / "ray") == accuracy(tmp_path / "inp")
    (token,) = (tmp_path / "ray" / "client-state").iterdir()
    with np.load(token / "partition-0.round-3.npz") as state:
        assert list(state["position"]) == [2, 40, 3]  # 3 rounds x 5 steps x 16 = 240 draws: 2 passes of 100, then 40
