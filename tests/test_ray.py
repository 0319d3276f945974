"""One real run on Flower's simulation engine (Ray): same strategy and ClientApp as in-process."""

import json

from fedcmd.engine import run_ray


def test_fedavg_on_ray_matches_the_accounting(small_config, tmp_path):
    config = dict(small_config, **{"num-server-rounds": 2})
    summary = run_ray(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["rounds"] == 2 and summary["replies_rejected"] == 0
    assert summary["floats_up"] == summary["floats_down"] == 61706 * 4 * 2
    assert summary["final_accuracy"] > 0.5
