"""Checkpoints: a run interrupted and resumed ends exactly where an uninterrupted run does."""

import csv

import pytest

from fedcmd.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from fedcmd.cli import main
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess

# Columns that must agree to the last digit (timings may not).
SAME = ("round", "accuracy", "loss", "train_loss", "sampled", "accepted", "rejected", "mb_cumulative")


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def results(out):
    metrics = [{k: row[k] for k in SAME} for row in read_csv(out / "metrics.csv")]
    return metrics, read_csv(out / "volume.csv"), read_csv(out / "rejections.csv")


def split_rediscovery(rows, first_round, num_nodes):
    """(rows without the discovery a resumed run does first, those discovery rows).

    A resumed server knows no node: its first round starts by asking every node for its partition
    (a query down and a reply up per node, metadata only), traffic the uninterrupted run did not have.
    """
    start = next(i for i, r in enumerate(rows) if int(r["round"]) == first_round)
    extra = rows[start:start + 2 * num_nodes]
    return rows[:start] + rows[start + 2 * num_nodes:], extra


def assert_resumed_matches(resumed, whole, first_round, num_nodes):
    (m_res, v_res, rej_res), (m_whole, v_whole, rej_whole) = results(resumed), results(whole)
    rows, discovery = split_rediscovery(v_res, first_round, num_nodes)
    assert rows == v_whole  # every volume row of the run, to the byte
    assert [(r["direction"], r["category"], r["values"]) for r in discovery] == \
        [("down", "metadata", "0"), ("up", "metadata", "0")] * num_nodes
    assert rej_res == rej_whole
    extra_mb = sum(int(r["wire_bytes"]) for r in discovery) / 1e6
    for a, b in zip(m_res, m_whole):
        assert {k: a[k] for k in SAME if k != "mb_cumulative"} == {k: b[k] for k in SAME if k != "mb_cumulative"}
        shift = extra_mb if int(a["round"]) >= first_round else 0.0
        assert float(a["mb_cumulative"]) == pytest.approx(float(b["mb_cumulative"]) + shift, abs=1e-9)
    assert len(m_res) == len(m_whole)


def fresh_grid(num_nodes):
    """A grid whose nodes have new ids and empty state, as after restarting every SuperNode."""
    grid = LocalGrid(client_app, num_nodes)
    for pid in range(num_nodes):
        grid.restart(pid)
    return grid


class Crash(RuntimeError):
    pass


def crashing_grid(num_nodes, at_round):
    """A grid whose server side dies when round `at_round` sends its training messages."""
    grid = LocalGrid(client_app, num_nodes)
    original = grid.send_and_receive

    def send(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == str(at_round):
            raise Crash(f"server killed in round {at_round}")
        return original(messages, timeout=timeout)

    grid.send_and_receive = send
    return grid


@pytest.fixture
def config(small_config):
    # Partial participation, so that resumed cohorts are checked too.
    return dict(small_config, **{"num-server-rounds": 4, "fraction-train": 0.5, "local-epochs": 1})


def test_crash_then_resume_gives_the_uninterrupted_result(config, tmp_path):
    run_inprocess(config, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "cut", progress=False, grid=crashing_grid(4, at_round=3))
    assert load_checkpoint(tmp_path / "cut", config).server_round == 2
    assert not (tmp_path / "cut" / "summary.json").exists()
    summary = run_inprocess(config, tmp_path / "cut", progress=False, grid=fresh_grid(4), resume=True)
    assert [m["round"] for m in results(tmp_path / "cut")[0]] == ["0", "1", "2", "3", "4"]
    assert_resumed_matches(tmp_path / "cut", tmp_path / "whole", first_round=3, num_nodes=4)
    assert summary["rounds"] == 4 and summary["replies_rejected"] == 0


def test_a_finished_run_extended_by_resume_matches_the_longer_run(config, tmp_path):
    run_inprocess(config, tmp_path / "whole", progress=False)
    run_inprocess(dict(config, **{"num-server-rounds": 2}), tmp_path / "short", progress=False)
    run_inprocess(config, tmp_path / "short", progress=False, resume=True)
    assert_resumed_matches(tmp_path / "short", tmp_path / "whole", first_round=3, num_nodes=4)


def test_checkpoint_holds_the_run_without_stale_node_maps(config, tmp_path):
    run_inprocess(dict(config, **{"num-server-rounds": 2}), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == [CHECKPOINT_NAME,
                                                                                     "checkpoint.round-2.npz"]
    ckpt = load_checkpoint(tmp_path, config)
    assert ckpt.server_round == 2 and [m["round"] for m in ckpt.metrics] == [0, 1, 2]
    assert ckpt.strategy.node_of == {} and ckpt.strategy.partition_of == {}
    assert sorted(ckpt.strategy.rounds) == [1, 2] and ckpt.strategy.accountant.rows
    assert ckpt.config["num-server-rounds"] == 4  # the resuming config, not the stored one


def test_resume_refuses_a_missing_checkpoint_or_a_different_config(config, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, config)
    run_inprocess(dict(config, **{"num-server-rounds": 2}), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="'lr'"):
        load_checkpoint(tmp_path, dict(config, lr=0.01))
    with pytest.raises(CheckpointError, match="past num-server-rounds"):
        load_checkpoint(tmp_path, dict(config, **{"num-server-rounds": 1}))
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path, config)


def test_cli_resume_reports_a_missing_checkpoint(tmp_path, capsys):
    code = main(["run", "--set", 'dataset="synthetic"', "--engine", "inprocess", "--out", str(tmp_path), "--resume"])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_cmd_resumes_after_embedding_events_with_restarted_clients(small_config, tmp_path):
    """The resumed run's clients have empty coefficient stores: the server resends each one everything."""
    config = dict(small_config, **{"strategy": "cmd", "num-server-rounds": 7, "cmd-warmup": 2, "cmd-every": 1,
                                   "cmd-fraction": 0.2, "cmd-modes": 3, "cmd-samples": 200, "local-epochs": 1})
    whole = run_inprocess(config, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "cut", progress=False, grid=crashing_grid(4, at_round=5))
    assert load_checkpoint(tmp_path / "cut", config).strategy.version >= 2
    cut = run_inprocess(config, tmp_path / "cut", progress=False, grid=fresh_grid(4), resume=True)
    assert cut["replies_rejected"] == 0  # no client refused a delta it could not apply
    model_figures = lambda out: [{k: m[k] for k in ("accuracy", "loss", "train_loss", "accepted")}
                                 for m in results(out)[0]]
    assert model_figures(tmp_path / "cut") == model_figures(tmp_path / "whole")
    assert cut["final_accuracy"] == whole["final_accuracy"]
    assert cut["embedding_events"] == whole["embedding_events"]
    # Catching up costs coefficient bytes the uninterrupted run did not spend, in round 5 only.
    coeff = lambda out, rnd: sum(int(r["values"]) for r in read_csv(out / "volume.csv")
                                 if r["category"] == "coefficients" and int(r["round"]) == rnd)
    assert coeff(tmp_path / "cut", 5) > coeff(tmp_path / "whole", 5)
    assert coeff(tmp_path / "cut", 6) == coeff(tmp_path / "whole", 6)


def test_aggressive_apf_resumes_with_restarted_clients(small_config, tmp_path):
    """A-APF's controller (with its random-freeze generator) comes back from the checkpoint as it was."""
    config = dict(small_config, **{"strategy": "a-apf", "num-server-rounds": 7, "apf-threshold": 0.3,
                                   "local-epochs": 1})
    whole = run_inprocess(config, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "cut", progress=False, grid=crashing_grid(4, at_round=5))
    cut = run_inprocess(config, tmp_path / "cut", progress=False, grid=fresh_grid(4), resume=True)
    assert whole["frozen_fraction_mean"] > 0  # the controller's state shaped the run
    assert cut["replies_rejected"] == 0
    accuracy = lambda out: [m["accuracy"] for m in results(out)[0]]
    assert accuracy(tmp_path / "cut") == accuracy(tmp_path / "whole")
    assert cut["frozen_fraction_mean"] == whole["frozen_fraction_mean"]
