import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def small_config():
    """A few seconds' federated run on generated data of Fashion-MNIST's shape."""
    from fedcmd.config import resolve

    return resolve(
        {
            "dataset": "synthetic",
            "synthetic-train-size": 400,
            "synthetic-test-size": 200,
            "model": "lenet5",
            "num-clients": 4,
            "num-server-rounds": 3,
            "batch-size": 16,
            "local-epochs": 2,
            "lr": 0.05,
            "momentum": 0.9,
        }
    )
