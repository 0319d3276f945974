"""End-to-end FedAvg through the real strategy and ClientApp code, in process."""

import json

import numpy as np
from helpers import read_csv

from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess


def test_fedavg_run_writes_outputs_and_counts_exact_weight_bytes(small_config, tmp_path):
    summary = run_inprocess(small_config, tmp_path, progress=False)
    for name in ("config.toml", "metrics.csv", "volume.csv", "summary.json", "partitions.csv", "run.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    n, clients, rounds = 61706, 4, 3
    assert summary["num_parameters"] == n
    rows = read_csv(tmp_path / "volume.csv")
    weight_raw = sum(int(r["raw_bytes"]) for r in rows if r["category"] == "weights")
    assert weight_raw == 2 * n * 4 * clients * rounds
    assert summary["floats_up"] == summary["floats_down"] == n * clients * rounds
    assert summary["volume_ratio"] == 1.0
    meta = [r for r in rows if r["category"] == "metadata"]
    assert meta and all(int(r["raw_bytes"]) == 0 and int(r["wire_bytes"]) > 0 for r in meta)
    assert summary["bytes_up"] > n * 4 * clients * rounds  # serialised bytes include headers
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [int(m["round"]) for m in metrics] == [0, 1, 2, 3]
    assert float(metrics[-1]["accuracy"]) > 0.5  # learnable synthetic data: far above chance (0.1)
    parts = read_csv(tmp_path / "partitions.csv")
    assert sum(int(p["num_samples"]) for p in parts) == 400


def test_same_seeds_give_identical_accuracy(small_config, tmp_path):
    a = run_inprocess(small_config, tmp_path / "a", progress=False)
    b = run_inprocess(small_config, tmp_path / "b", progress=False)
    acc_a = [r["accuracy"] for r in read_csv(tmp_path / "a" / "metrics.csv")]
    acc_b = [r["accuracy"] for r in read_csv(tmp_path / "b" / "metrics.csv")]
    assert acc_a == acc_b and a["final_accuracy"] == b["final_accuracy"]


def test_failed_and_malformed_replies_are_rejected_and_counted(small_config, tmp_path):
    config = dict(small_config, **{"num-server-rounds": 2})
    grid = LocalGrid(client_app, 4, fail=lambda rnd, pid, kind: kind == "train" and rnd == 1 and pid == 2)
    summary = run_inprocess(config, tmp_path, progress=False, grid=grid)
    rejections = read_csv(tmp_path / "rejections.csv")
    assert [(r["round"], r["client"]) for r in rejections] == [("1", "2")]
    assert "timeout" in rejections[0]["reason"]
    assert summary["replies_rejected"] == 1
    assert np.isfinite(summary["final_accuracy"])
