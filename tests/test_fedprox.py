"""FedProx: its declaration reaches the config and the clients, its proximal term is the paper's,
mu = 0 is FedAvg exactly, and mu > 0 keeps a client's local model nearer the global one."""

import json

import numpy as np
import pytest
import torch
from helpers import read_csv
from torch import nn

from clients.common import train_locally
from clients.fedprox import proximal_term
from fedcmd import task
from fedcmd.config import ConfigError, client_keys, load_config, resolve
from fedcmd.engine import run_inprocess


def test_fedprox_is_a_strategy_with_its_key_checked_and_sent_to_its_clients_only():
    config = resolve({"strategy": "fedprox", "fedprox-mu": 0.5})
    assert config["fedprox-mu"] == 0.5 and resolve({})["fedprox-mu"] == 0.1
    assert "fedprox-mu" in client_keys("fedprox") and "fedprox-mu" not in client_keys("fedavg")
    with pytest.raises(ConfigError, match="'fedprox-mu'.*non-negative"):
        load_config(None, ["strategy=fedprox", "fedprox-mu=-1"])


def test_the_proximal_term_is_half_mu_times_the_squared_distance_and_its_gradient_mu_times_the_gap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    params = list(model.parameters())
    global_weights = np.random.default_rng(0).normal(size=sum(p.numel() for p in params)).astype(np.float32)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gap = flat - torch.from_numpy(global_weights)
    term = proximal_term(0.3, global_weights)(model)
    assert float(term) == pytest.approx(0.15 * float(gap @ gap), rel=1e-6)
    term.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(grads, 0.3 * gap, atol=1e-6)
    with pytest.raises(ValueError, match="5 global weights"):
        proximal_term(1.0, np.zeros(5, dtype=np.float32))(model)


def test_mu_zero_is_fedavg_float_for_float(small_config, tmp_path):
    config = dict(small_config, **{"num-server-rounds": 2})
    fedavg = run_inprocess(config, tmp_path / "fedavg", progress=False)
    fedprox = run_inprocess(
        dict(config, strategy="fedprox", **{"fedprox-mu": 0.0}), tmp_path / "fedprox", progress=False
    )
    assert fedprox["strategy"] == "fedprox" and fedprox["fedprox_mu"] == 0.0
    rows = [
        [(r["accuracy"], r["train_loss"]) for r in read_csv(tmp_path / name / "metrics.csv")]
        for name in ("fedavg", "fedprox")
    ]
    assert rows[0] == rows[1] and fedavg["final_accuracy"] == fedprox["final_accuracy"]


def test_the_term_keeps_the_local_model_near_the_global_one(small_config):
    config = dict(small_config, **{"server-round": 1})
    weight_layout, buffer_layout = task.layouts(config)
    model = task.new_model(config)
    start, buffers = weight_layout.flatten(model), buffer_layout.flatten(model)
    distance = {}
    for mu in (0.0, 1.0, 10.0):
        penalty = proximal_term(mu, start) if mu else None
        trained, _, metrics = train_locally(config, 0, start, buffers, penalty=penalty)
        distance[mu] = float(np.linalg.norm(trained - start))
        assert np.isfinite(metrics["train-loss"])
    assert distance[10.0] < distance[1.0] < distance[0.0]


def test_a_fedprox_run_trains_and_reports_its_mu(small_config, tmp_path):
    summary = run_inprocess(dict(small_config, strategy="fedprox", **{"fedprox-mu": 1.0}), tmp_path, progress=False)
    assert summary["strategy"] == "fedprox" and summary["fedprox_mu"] == 1.0
    assert summary["replies_rejected"] == 0 and summary["volume_ratio"] == 1.0
    assert summary["final_accuracy"] > 0.5  # learnable synthetic data: far above chance (0.1)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
