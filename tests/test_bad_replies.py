"""Bad replies (wrong length, NaN, Inf, unknown store version) are rejected, logged and counted, and
the global model is the aggregate of the good replies only."""

import logging

import numpy as np
import pytest
from flwr.app import MetricRecord
from helpers import read_csv

import clients.fedavg as fedavg_client
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.wire import vector_record


def corrupt(reply, how):
    """Damage one record of a client's reply the way a faulty or malicious client might."""
    if how == "version":
        metrics = dict(reply["metrics"])
        metrics["store-version"] = metrics["store-version"] + 3
        reply["metrics"] = MetricRecord(metrics)
        return
    key, damage = how.split(":")
    values = reply[key]["values"].numpy().copy()
    if damage == "nan":
        values[values.size // 2] = np.nan
    elif damage == "inf":
        values[-1] = -np.inf
    elif damage == "short":
        values = values[:-1]
    reply[key] = vector_record(values)


class Clients:
    """Wraps a client handler: records every good reply, corrupts the chosen ones."""

    def __init__(self, module, monkeypatch, damage):
        self.damage = damage  # (round, partition) -> how
        self.replies = {}  # round -> [(partition, num examples, values before any damage)]
        original = module.train

        def train(content, context, config, partition_id):
            reply = original(content, context, config, partition_id)
            self.replies.setdefault(config["server-round"], []).append(
                (
                    partition_id,
                    reply["metrics"]["num-examples"],
                    {k: reply[k]["values"].numpy().copy() for k in ("weights", "references") if k in reply},
                )
            )
            how = self.damage.get((config["server-round"], partition_id))
            if how:
                corrupt(reply, how)
            return reply

        monkeypatch.setattr(module, "train", train)

    def good(self, server_round):
        return [pid for pid, _, _ in self.replies[server_round] if (server_round, pid) not in self.damage]

    def mean(self, server_round, key, *, only_good=True):
        """The sample-weighted mean of the replies' `key` values (undamaged), computed here in float64."""
        chosen = [r for r in self.replies[server_round] if not only_good or r[0] in self.good(server_round)]
        total = sum(n * values[key].astype(np.float64) for _, n, values in chosen)
        return (total / sum(n for _, n, _ in chosen)).astype(np.float32)


def test_fedavg_rejects_bad_replies_and_averages_the_good_ones(small_config, tmp_path, monkeypatch, caplog):
    from strategies.fedavg import FedAvg

    config = dict(small_config, **{"num-clients": 6, "num-server-rounds": 2, "local-epochs": 1})
    damage = {(1, 1): "weights:nan", (1, 2): "weights:short", (1, 4): "weights:inf", (2, 0): "weights:short"}
    clients = Clients(fedavg_client, monkeypatch, damage)
    after = {}
    original = FedAvg.aggregate_train

    def aggregate_train(self, server_round, replies):
        result = original(self, server_round, replies)
        after[server_round] = self.weights.copy()
        return result

    monkeypatch.setattr(FedAvg, "aggregate_train", aggregate_train)
    with caplog.at_level(logging.WARNING, logger="fedcmd"):
        summary = run_inprocess(config, tmp_path, progress=False, grid=LocalGrid(client_app, 6))

    rejections = [(r["round"], r["client"], r["reason"]) for r in read_csv(tmp_path / "rejections.csv")]
    assert [(rnd, pid) for rnd, pid, _ in rejections] == [("1", "1"), ("1", "2"), ("1", "4"), ("2", "0")]
    assert "NaN or Inf" in rejections[0][2] and "NaN or Inf" in rejections[2][2]
    assert "expected 61706" in rejections[1][2] and "expected 61706" in rejections[3][2]
    assert summary["replies_rejected"] == 4
    assert sum("rejected reply of client" in rec.getMessage() for rec in caplog.records) == 4
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [(m["accepted"], m["rejected"]) for m in metrics[1:]] == [("3", "3"), ("5", "1")]

    assert clients.good(1) == [0, 3, 5] and clients.good(2) == [1, 2, 3, 4, 5]
    for rnd in (1, 2):
        np.testing.assert_allclose(after[rnd], clients.mean(rnd, "weights"), rtol=1e-6, atol=1e-7)
    # The check can tell: with the damaged clients' values left undamaged, the mean is another model.
    assert not np.allclose(after[1], clients.mean(1, "weights", only_good=False), rtol=1e-6, atol=1e-7)
    # Rejected replies still count as traffic: every sampled client's reply is in the volume table.
    up = {
        (r["round"], r["client"])
        for r in read_csv(tmp_path / "volume.csv")
        if r["direction"] == "up" and r["category"] == "weights"
    }
    assert {("1", "1"), ("1", "2"), ("1", "4")} <= up
    assert np.isfinite(summary["final_accuracy"])


@pytest.fixture
def cmd_config(small_config):
    return dict(
        small_config,
        **{
            "strategy": "cmd",
            "num-clients": 5,
            "num-server-rounds": 6,
            "local-epochs": 1,
            "cmd-warmup": 2,
            "cmd-every": 1,
            "cmd-fraction": 0.2,
            "cmd-modes": 3,
            "cmd-samples": 200,
            "synthetic-train-size": 500,
        },
    )


def test_cmd_rejects_bad_replies_and_the_clients_catch_up(cmd_config, tmp_path, monkeypatch, caplog):
    import clients.cmd as cmd_client
    from strategies.cmd import CMD

    damage = {(4, 1): "version", (4, 2): "references:nan", (4, 3): "weights:short"}
    clients = Clients(cmd_client, monkeypatch, damage)
    aggregated, held, sent_model = {}, [], {}
    original_advance = CMD._advance_cmd

    def advance(self, server_round):
        # The aggregate before this round's embedding event changes the layout.
        aggregated[server_round] = (
            self.weights[self.free_index].copy(),
            self.weights[self.reference_index].copy(),
            self.version,
        )
        return original_advance(self, server_round)

    original_configure = CMD.configure_train

    def configure(self, server_round, *args):
        sent_model[server_round] = self.weights.copy()
        return original_configure(self, server_round, *args)

    original_local = cmd_client.train_locally

    def train_locally(config, partition_id, weights, buffers, step_hook=None, **kwargs):
        held.append((config["server-round"], partition_id, weights.copy()))
        return original_local(config, partition_id, weights, buffers, step_hook, **kwargs)

    monkeypatch.setattr(CMD, "_advance_cmd", advance)
    monkeypatch.setattr(CMD, "configure_train", configure)
    monkeypatch.setattr(cmd_client, "train_locally", train_locally)
    with caplog.at_level(logging.WARNING, logger="fedcmd"):
        summary = run_inprocess(cmd_config, tmp_path, progress=False, grid=LocalGrid(client_app, 5))

    rejections = [(r["round"], r["client"], r["reason"]) for r in read_csv(tmp_path / "rejections.csv")]
    assert [(rnd, pid) for rnd, pid, _ in rejections] == [("4", "1"), ("4", "2"), ("4", "3")]
    assert "store version" in rejections[0][2]
    assert "'references' holds NaN or Inf" in rejections[1][2]
    assert "'weights' has" in rejections[2][2]
    assert summary["replies_rejected"] == 3
    assert sum("rejected reply of client" in rec.getMessage() for rec in caplog.records) == 3

    free, references, version = aggregated[4]
    assert version >= 1  # the damaged round already had embedded weights and references
    assert clients.good(4) == [0, 4]
    np.testing.assert_allclose(free, clients.mean(4, "weights"), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(references, clients.mean(4, "references"), rtol=1e-6, atol=1e-7)
    assert not np.allclose(free, clients.mean(4, "weights", only_good=False), rtol=1e-6, atol=1e-7)
    # Afterwards the rejected clients are resent what they need, and every client holds the server's model.
    assert {(5, pid) for pid in (1, 2, 3)} <= {(rnd, pid) for rnd, pid, _ in held}
    assert max(float(np.abs(w - sent_model[rnd]).max()) for rnd, _, w in held) <= 1e-6
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [m["accepted"] for m in metrics[5:]] == ["5", "5"]
