"""One real run on Flower's simulation engine (Ray): federated CMD, the most stateful client code
(coefficient stores persist in each node's context across rounds)."""

import json

from fedcmd.engine import run_ray


def test_cmd_on_ray_embeds_and_clients_keep_their_stores(small_config, tmp_path):
    config = dict(small_config, **{"strategy": "cmd", "num-server-rounds": 4, "cmd-warmup": 1,
                                   "cmd-every": 1, "cmd-fraction": 0.3, "cmd-samples": 300})
    summary = run_ray(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # events after rounds 2 and 3 reach the clients in rounds 3 and 4; a store that did not persist
    # in a node's context would refuse the second delta and show up here as a rejected reply
    assert summary["rounds"] == 4 and summary["replies_rejected"] == 0
    assert summary["embedding_events"] >= 2 and summary["volume_ratio"] < 1.0
    assert summary["final_accuracy"] > 0.5
