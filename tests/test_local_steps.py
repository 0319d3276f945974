"""Short rounds: `local-steps` from a persistent batch stream, optimizers whose state lives on in the
node (`optimizer-state = keep`), `eval-every`, and resume with all of it, bit for bit."""

import math

import numpy as np
import pytest
import torch
from helpers import read_csv

import clients.common as common
from clients.common import LocalTrainingState
from fedcmd import task
from fedcmd.client_app import app as client_app
from fedcmd.config import ConfigError, resolve
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.training import BatchStream

STRATEGIES = ("fedavg", "cmd", "apf", "a-apf")


@pytest.fixture
def config(small_config):
    # 100 samples per client, batches of 16: 7 steps a round wrap each pass after 6.25 steps
    return dict(
        small_config,
        **{"local-steps": 7, "optimizer": "adam", "lr": 0.002, "optimizer-state": "keep", "num-server-rounds": 4},
    )


class BatchSpy:
    """Records the index batches every client trains on, by (round, partition)."""

    def __init__(self, monkeypatch):
        self.batches = {}
        original = common.run_steps

        def run_steps(model, x, y, batches, optimiser, step_hook=None, penalty=None):
            batches = list(batches)
            result = original(model, x, y, batches, optimiser, step_hook, penalty)
            self.last = [b.clone() for b in batches]
            return result

        original_train = common.train_locally

        def train_locally(config, partition_id, *args, **kwargs):
            out = original_train(config, partition_id, *args, **kwargs)
            self.batches[(config["server-round"], partition_id)] = self.last
            return out

        monkeypatch.setattr(common, "run_steps", run_steps)
        for module in ("clients.fedavg", "clients.cmd", "clients.apf"):
            monkeypatch.setattr(f"{module}.train_locally", train_locally)


# ----- the stream itself -------------------------------------------------------------------------
def test_stream_draws_each_sample_once_per_pass_and_continues_from_its_position():
    stream = BatchStream(50, 8, seed=3, partition_id=1)
    drawn = torch.cat(list(stream.take(25)))  # 200 draws = 4 passes of 50
    assert drawn.numel() == 200
    for p in range(4):
        assert sorted(drawn[50 * p : 50 * (p + 1)].tolist()) == list(range(50))
    assert stream.position == (4, 0)
    # A stream rebuilt from a stored position continues exactly where the first one was.
    first = BatchStream(50, 8, seed=3, partition_id=1)
    head = torch.cat(list(first.take(9)))
    rest = torch.cat(list(BatchStream(50, 8, 3, 1, *first.position).take(16)))
    assert torch.equal(torch.cat([head, rest]), drawn)
    # Passes are new permutations, and partitions get their own.
    assert not torch.equal(drawn[:50], drawn[50:100])
    assert not torch.equal(torch.cat(list(BatchStream(50, 8, 3, 2).take(6))), drawn[:48])


def test_stream_refuses_a_position_outside_a_pass():
    with pytest.raises(ValueError, match="outside a pass"):
        BatchStream(10, 4, 0, 0, pass_index=0, offset=10)


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="'optimizer'"):
        resolve({"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="'optimizer-state'"):
        resolve({"optimizer-state": "sometimes"})
    with pytest.raises(ConfigError, match="'local-steps'"):
        resolve({"local-steps": -1})
    with pytest.raises(ConfigError, match="'eval-every'"):
        resolve({"eval-every": 0})


# ----- in a federated run ------------------------------------------------------------------------
def test_exactly_k_steps_per_round_and_the_stream_continues_across_rounds(config, tmp_path, monkeypatch):
    spy = BatchSpy(monkeypatch)
    summary = run_inprocess(config, tmp_path, progress=False)
    assert summary["replies_rejected"] == 0
    n = 100  # samples per client
    for pid in range(4):
        rounds = [spy.batches[(r, pid)] for r in range(1, 5)]
        assert [len(b) for b in rounds] == [7] * 4  # exactly local-steps optimizer steps
        assert all(len(batch) == 16 for b in rounds for batch in b)
        drawn = torch.cat([batch for b in rounds for batch in b])  # positions in the training set
        # one stream across the rounds: exactly the sequence a single stream draws, no restart per round
        stream = torch.cat(list(BatchStream(n, 16, config["seed"], pid).take(28)))
        assert torch.equal(drawn, task.client_index(config, pid)[stream])
        for p in range(len(drawn) // n):
            assert len(set(drawn[p * n : (p + 1) * n].tolist())) == n  # no sample twice within a pass


def test_adam_state_is_kept_or_reset_as_configured(config, tmp_path):
    for mode, steps in (("keep", 4 * 7), ("reset", 7)):
        grid = LocalGrid(client_app, 4)
        run_inprocess(dict(config, **{"optimizer-state": mode}), tmp_path / mode, progress=False, grid=grid)
        for context in grid.contexts.values():
            state = LocalTrainingState.load(context)
            assert state.position == (4, 48)  # 4 rounds x 7 steps x 16 = 448 draws = 4 passes of 100, then 48
            if mode == "keep":
                assert float(state.optimizer["0/step"]) == steps
                assert {k.split("/")[1] for k in state.optimizer} == {"step", "exp_avg", "exp_avg_sq"}
            else:
                assert state.optimizer == {}  # nothing kept: each round's optimizer starts afresh


def test_kept_adam_state_changes_the_training(config, tmp_path):
    keep = run_inprocess(config, tmp_path / "keep", progress=False)
    run_inprocess(dict(config, **{"optimizer-state": "reset"}), tmp_path / "reset", progress=False)
    again = run_inprocess(config, tmp_path / "again", progress=False)
    assert keep["final_accuracy"] == again["final_accuracy"]
    losses = lambda out: [row["train_loss"] for row in read_csv(out / "metrics.csv")][1:]
    assert losses(tmp_path / "keep") == losses(tmp_path / "again")
    assert losses(tmp_path / "keep")[1:] != losses(tmp_path / "reset")[1:]  # round 1 is the same either way
    assert losses(tmp_path / "keep")[0] == losses(tmp_path / "reset")[0]


def test_eval_every_evaluates_every_k_rounds_and_the_last(config, tmp_path):
    summary = run_inprocess(dict(config, **{"num-server-rounds": 5, "eval-every": 2}), tmp_path, progress=False)
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["round"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r["accuracy"] != "" for r in rows] == [True, False, True, False, True, True]
    assert all(r["train_loss"] != "" for r in rows[1:])
    assert summary["final_accuracy"] == float(rows[-1]["accuracy"])
    assert not math.isnan(summary["best_accuracy"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_with_local_steps(config, tmp_path, strategy, monkeypatch):
    spy = BatchSpy(monkeypatch)
    extra = {"cmd-warmup": 1, "cmd-every": 1, "cmd-fraction": 0.3, "cmd-samples": 200} if strategy == "cmd" else {}
    summary = run_inprocess(dict(config, strategy=strategy, **extra), tmp_path, progress=False)
    assert summary["replies_rejected"] == 0 and summary["rounds"] == 4
    assert {len(b) for b in spy.batches.values()} == {7} and len(spy.batches) == 16
    if strategy == "cmd":
        assert summary["embedding_events"] >= 2


# ----- resume --------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


def grid_crashing_after_clients_trained(num_nodes, at_round):
    """The server dies once round `at_round`'s clients have trained (and stored their new state),
    before it aggregates: the resumed run must not use the state those clients wrote in that round."""
    grid = LocalGrid(client_app, num_nodes)
    original = grid.replies

    def send(messages):
        messages = list(messages)
        replies = list(original(messages))
        if messages and messages[0].metadata.group_id == str(at_round):
            raise Crash(f"server killed in round {at_round}")
        return replies

    grid.replies = send
    return grid


@pytest.mark.parametrize("strategy", ("fedavg", "apf"))
def test_resume_with_adam_and_local_steps_is_bit_identical(config, tmp_path, strategy):
    config = dict(config, strategy=strategy, **{"num-server-rounds": 5, "fraction-train": 0.5})
    # same-length folder names: the state folder's path travels in each message's config
    whole = run_inprocess(config, tmp_path / "a", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "b", progress=False, grid=grid_crashing_after_clients_trained(4, 3))
    fresh = LocalGrid(client_app, 4)
    for pid in range(4):
        fresh.restart(pid)  # new node ids, empty node state
    cut = run_inprocess(config, tmp_path / "b", progress=False, grid=fresh, resume=True)
    model = lambda out: [
        {k: r[k] for k in ("round", "accuracy", "loss", "train_loss", "accepted")}
        for r in read_csv(out / "metrics.csv")
    ]
    assert model(tmp_path / "b") == model(tmp_path / "a")
    assert cut["final_accuracy"] == whole["final_accuracy"] and cut["replies_rejected"] == 0
    if strategy == "fedavg":  # APF's restarted clients get the whole model at their first contact instead
        payload = lambda out: [
            (r["round"], r["client"], r["direction"], r["category"], r["values"])
            for r in read_csv(out / "volume.csv")
            if r["category"] != "metadata"
        ]
        assert payload(tmp_path / "b") == payload(tmp_path / "a")


def test_resume_without_the_client_state_files_is_not_silently_identical(config, tmp_path):
    """The files are what makes resume exact: without them the clients restart their streams."""
    import shutil

    config = dict(config, **{"num-server-rounds": 4})
    run_inprocess(config, tmp_path / "a", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "b", progress=False, grid=grid_crashing_after_clients_trained(4, 3))
    shutil.rmtree(tmp_path / "b" / "client-state")
    run_inprocess(config, tmp_path / "b", progress=False, grid=LocalGrid(client_app, 4), resume=True)
    loss = lambda out: [r["train_loss"] for r in read_csv(out / "metrics.csv")]
    assert loss(tmp_path / "b")[:3] == loss(tmp_path / "a")[:3]
    assert loss(tmp_path / "b")[3:] != loss(tmp_path / "a")[3:]


def test_a_client_keeps_only_its_last_two_state_files(config, tmp_path):
    run_inprocess(config, tmp_path, progress=False)
    (token,) = [p for p in (tmp_path / "client-state").iterdir()]
    names = sorted(p.name for p in token.iterdir())
    assert names == sorted(f"partition-{k}.round-{r}.npz" for k in range(4) for r in (3, 4))
    with np.load(token / "partition-0.round-4.npz") as arrays:
        assert list(arrays["position"]) == [4, 48, 4]  # pass, offset, round it was written in
