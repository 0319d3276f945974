"""Checkpoints: a run interrupted and resumed ends exactly where an uninterrupted run does; a checkpoint
is JSON and arrays without pickle, and one that does not fit the run is refused, naming what is wrong."""

import csv
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedcmd.checkpoint import (
    ARRAY,
    CHECKPOINT_NAME,
    LEGACY_NAME,
    Checkpoint,
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
    split_arrays,
)
from fedcmd.cli import main
from fedcmd.client_app import app as client_app
from fedcmd.config import SetupError
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.server import check_out_dir

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
    extra = rows[start : start + 2 * num_nodes]
    return rows[:start] + rows[start + 2 * num_nodes :], extra


def assert_resumed_matches(resumed, whole, first_round, num_nodes):
    (m_res, v_res, rej_res), (m_whole, v_whole, rej_whole) = results(resumed), results(whole)
    rows, discovery = split_rediscovery(v_res, first_round, num_nodes)
    assert rows == v_whole  # every volume row of the run, to the byte
    assert [(r["direction"], r["category"], r["values"]) for r in discovery] == [
        ("down", "metadata", "0"),
        ("up", "metadata", "0"),
    ] * num_nodes
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
    original = grid.replies

    def send(messages):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == str(at_round):
            raise Crash(f"server killed in round {at_round}")
        return original(messages)

    grid.replies = send
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
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == [
        CHECKPOINT_NAME,
        "checkpoint.round-2.npz",
    ]
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
    config = dict(
        small_config,
        **{
            "strategy": "cmd",
            "num-server-rounds": 7,
            "cmd-warmup": 2,
            "cmd-every": 1,
            "cmd-fraction": 0.2,
            "cmd-modes": 3,
            "cmd-samples": 200,
            "local-epochs": 1,
        },
    )
    whole = run_inprocess(config, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "cut", progress=False, grid=crashing_grid(4, at_round=5))
    assert load_checkpoint(tmp_path / "cut", config).strategy.version >= 2
    cut = run_inprocess(config, tmp_path / "cut", progress=False, grid=fresh_grid(4), resume=True)
    assert cut["replies_rejected"] == 0  # no client refused a delta it could not apply
    model_figures = lambda out: [
        {k: m[k] for k in ("accuracy", "loss", "train_loss", "accepted")} for m in results(out)[0]
    ]
    assert model_figures(tmp_path / "cut") == model_figures(tmp_path / "whole")
    assert cut["final_accuracy"] == whole["final_accuracy"]
    assert cut["embedding_events"] == whole["embedding_events"]
    # Catching up costs coefficient bytes the uninterrupted run did not spend, in round 5 only.
    coeff = lambda out, rnd: sum(
        int(r["values"])
        for r in read_csv(out / "volume.csv")
        if r["category"] == "coefficients" and int(r["round"]) == rnd
    )
    assert coeff(tmp_path / "cut", 5) > coeff(tmp_path / "whole", 5)
    assert coeff(tmp_path / "cut", 6) == coeff(tmp_path / "whole", 6)


def test_aggressive_apf_resumes_with_restarted_clients(small_config, tmp_path):
    """A-APF's controller (with its random-freeze generator) comes back from the checkpoint as it was."""
    config = dict(
        small_config, **{"strategy": "a-apf", "num-server-rounds": 7, "apf-threshold": 0.3, "local-epochs": 1}
    )
    whole = run_inprocess(config, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        run_inprocess(config, tmp_path / "cut", progress=False, grid=crashing_grid(4, at_round=5))
    cut = run_inprocess(config, tmp_path / "cut", progress=False, grid=fresh_grid(4), resume=True)
    assert whole["frozen_fraction_mean"] > 0  # the controller's state shaped the run
    assert cut["replies_rejected"] == 0
    accuracy = lambda out: [m["accuracy"] for m in results(out)[0]]
    assert accuracy(tmp_path / "cut") == accuracy(tmp_path / "whole")
    assert cut["frozen_fraction_mean"] == whole["frozen_fraction_mean"]


# ----- the format: JSON and arrays, no pickle; what does not fit is refused, naming it -----------------
def small_run(tmp_path_factory, **keys):
    """A checkpointed 3-round run (the last round's checkpoint), small enough to build once per module."""
    from fedcmd.config import resolve

    config = resolve(
        {
            "dataset": "synthetic",
            "synthetic-train-size": 200,
            "synthetic-test-size": 50,
            "model": "mlp",
            "num-clients": 2,
            "num-server-rounds": 3,
            "local-epochs": 1,
            "batch-size": 16,
            **keys,
        }
    )
    out = tmp_path_factory.mktemp(keys["strategy"])
    run_inprocess(config, out, progress=False)
    return config, out


@pytest.fixture(scope="module")
def cmd_run(tmp_path_factory):
    # events from round 1 on, and a lossy downlink: a broadcast in the checkpoint
    return small_run(
        tmp_path_factory,
        strategy="cmd",
        **{
            "cmd-warmup": 1,
            "cmd-every": 1,
            "cmd-fraction": 0.2,
            "cmd-modes": 2,
            "cmd-samples": 100,
            "codec-down": "int8",
        },
    )


@pytest.fixture(scope="module")
def apf_run(tmp_path_factory):
    # topk downlink: a broadcast and the server's residual
    return small_run(tmp_path_factory, strategy="a-apf", **{"apf-threshold": 0.3, "codec-down": "topk"})


def array_names(tree):
    if isinstance(tree, dict):
        return {tree[ARRAY]} if ARRAY in tree else set().union(*map(array_names, tree.values()))
    return set().union(*map(array_names, tree)) if isinstance(tree, list) else set()


def test_a_checkpoint_is_json_and_arrays_without_pickle(cmd_run):
    config, out = cmd_run
    doc = json.loads((out / CHECKPOINT_NAME).read_text())
    assert (doc["format"], doc["fedcmd_strategy"], doc["server_round"], doc["config"]) == (2, "cmd", 3, config)
    with np.load(out / doc["arrays"], allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert not any(a.dtype.hasobject for a in arrays.values())
    assert str(arrays.pop("checkpoint-token")) == doc["token"]
    assert array_names(doc) == set(arrays)  # every array is named by the json, and only those
    assert {"weights", "accountant", "rounds", "broadcast", "online", "schedule", "events"} <= set(doc["strategy"])
    assert arrays["strategy/events/event_of"].max() >= 1 and doc["strategy"]["broadcast"] is not None


@pytest.mark.parametrize("run", ["cmd_run", "apf_run"])
def test_a_loaded_strategy_gives_back_the_state_it_was_loaded_from(run, request):
    config, out = request.getfixturevalue(run)
    doc = json.loads((out / CHECKPOINT_NAME).read_text())
    with np.load(out / doc["arrays"], allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    tree, again = split_arrays({"strategy": load_checkpoint(out, config).strategy.state_dict()})
    assert json.dumps(tree["strategy"]) == json.dumps(doc["strategy"])  # NaN included
    assert set(again) == {k for k in arrays if k.startswith("strategy/")}
    for key, value in again.items():
        assert value.dtype == arrays[key].dtype and np.array_equal(value, arrays[key]), key


def tampered(run, folder, edit_json=None, edit_arrays=None):
    """A copy of a run's folder, its checkpoint edited."""
    config, out = run
    shutil.copytree(out, folder)
    doc = json.loads((folder / CHECKPOINT_NAME).read_text())
    if edit_arrays is not None:
        with np.load(folder / doc["arrays"], allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        edit_arrays(arrays)
        np.savez(folder / doc["arrays"], **arrays)
    if edit_json is not None:
        edit_json(doc)
        (folder / CHECKPOINT_NAME).write_text(json.dumps(doc))
    return folder


def shorten(key):
    return lambda arrays: arrays.update({key: arrays[key][:-1]})


def delete(*keys):
    def edit(tree):
        for key in keys[:-1]:
            tree = tree[key]
        del tree[keys[-1]]

    return edit


@pytest.mark.parametrize(
    "edit_json, edit_arrays, says",
    [
        (None, shorten("strategy/weights"), r"strategy\.weights: has shape \(\d+,\), expected \(\d+,\)"),
        (
            None,
            lambda a: a.update({"strategy/events/event_of": a["strategy/events/event_of"].astype(np.int64)}),
            r"strategy\.events\.event_of: must be uint8, got int64",
        ),
        (
            None,
            lambda a: a.update({"strategy/online/a": np.zeros(3)}),
            r"strategy\.online: state\['a'\] has shape \(3,\)",
        ),
        (
            None,
            lambda a: a["strategy/events/event_of"].__setitem__(0, 200),
            r"strategy\.events\.event_of: event numbers must lie in \[0, \d+\]",
        ),
        (
            None,
            lambda a: a["strategy/events/event_of"].__setitem__(
                np.flatnonzero(a["strategy/events/event_of"] == 0)[-1], 1
            ),
            r"strategy\.events\.event_of: (the events' weights are not the ones the online statistics froze"
            r"|a reference weight is embedded)",
        ),
        (
            lambda d: d["strategy"]["events"].update(index=[]),
            None,
            r"strategy\.events: an event log in the format of an older fedcmd .* start a new run",
        ),
        (
            None,
            lambda a: a["strategy/accountant/direction"].__setitem__(0, "side"),
            r"strategy\.accountant\.direction: unknown values \['side'\]",
        ),
        (
            None,
            delete("strategy/events/event_of"),
            "refers to an array 'strategy/events/event_of' that the array file does not hold",
        ),
        (None, lambda a: a.update({"checkpoint-token": np.array("0" * 32)}), "their tokens differ"),
        (lambda d: d.update(format=3), None, r"is not a fedcmd checkpoint of format 2 \(its format is 3\)"),
        (delete("strategy", "rounds"), None, r"strategy\.rounds: missing"),
        (delete("strategy", "online", "n_observed"), None, r"strategy\.online: state is missing \['n_observed'\]"),
        (delete("rng"), None, r"damaged: rng: missing"),
        (
            lambda d: d["strategy"].update(rounds=d["strategy"]["rounds"][:-1]),
            None,
            r"strategy\.rounds: logs rounds \[1, 2\]\.\.\., expected 1\.\.3",
        ),
        (lambda d: d.update(fedcmd_strategy="fedavg"), None, "holds a 'fedavg' strategy, the config builds 'cmd'"),
        (lambda d: d.update(arrays="../elsewhere.npz"), None, r"arrays: must name a file checkpoint\.round-<r>\.npz"),
    ],
)
def test_a_tampered_checkpoint_is_refused_naming_the_problem(cmd_run, tmp_path, edit_json, edit_arrays, says):
    config, _ = cmd_run
    folder = tampered(cmd_run, tmp_path / "copy", edit_json, edit_arrays)
    with pytest.raises(CheckpointError, match="cannot resume") as err:
        load_checkpoint(folder, config)
    assert re.search(says, str(err.value)), str(err.value)


class WritesAFile:
    """A pickle that, when loaded, creates a file: what loading a pickle someone hands you can do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pickle_is_refused_unread(cmd_run, tmp_path):
    config, _ = cmd_run
    marker = tmp_path / "pickle-was-loaded"
    payload = pickle.dumps(WritesAFile(marker))
    # in place of the arrays
    folder = tampered(cmd_run, tmp_path / "npz")
    (folder / json.loads((folder / CHECKPOINT_NAME).read_text())["arrays"]).write_bytes(payload)
    with pytest.raises(CheckpointError, match="is not readable without pickle"):
        load_checkpoint(folder, config)
    # a checkpoint of an older fedcmd, alone in its folder
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / LEGACY_NAME).write_bytes(payload)
    with pytest.raises(CheckpointError, match="checkpoint of an older fedcmd format .* start a new run"):
        load_checkpoint(folder, config)
    with pytest.raises(SetupError, match=r"holds a checkpointed run \(checkpoint.pkl\)"):
        check_out_dir(folder, resume=False, overwrite=False)
    assert not marker.exists()
    pickle.loads(payload)  # the payload was a real one
    assert marker.exists()


def test_a_crash_before_the_json_is_renamed_leaves_the_previous_checkpoint(cmd_run, tmp_path, monkeypatch):
    config, _ = cmd_run
    folder = tampered(cmd_run, tmp_path / "copy")
    before = {p.name: p.read_bytes() for p in checkpoint_files(folder)}
    checkpoint = load_checkpoint(folder, config)
    replace = os.replace

    def crash_at_the_commit(src, dst):
        if Path(dst).name == CHECKPOINT_NAME:
            raise Crash("killed while saving")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_the_commit)
    with pytest.raises(Crash):
        save_checkpoint(folder, Checkpoint(config, 4, checkpoint.strategy, checkpoint.metrics, 1.0))
    monkeypatch.undo()
    assert {p.name for p in checkpoint_files(folder)} == {*before, "checkpoint.round-4.npz", CHECKPOINT_NAME + ".tmp"}
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert load_checkpoint(folder, config).server_round == 3
    save_checkpoint(folder, Checkpoint(config, 3, checkpoint.strategy, checkpoint.metrics, 1.0))
    assert [p.name for p in checkpoint_files(folder)] == [CHECKPOINT_NAME, "checkpoint.round-3.npz"]
