"""Federated embedded CMD through the real strategy and ClientApp code, in process."""

import csv

import numpy as np
import pytest

import clients.cmd as cmd_client
from clients.cmd import CoefficientStore, StoreVersionError
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.protocols.cmd import EmbeddingEvent, decode_events, encode_events


@pytest.fixture
def cmd_config(small_config):
    return dict(
        small_config,
        **{
            "strategy": "cmd",
            "num-clients": 10,
            "fraction-train": 0.4,
            "num-server-rounds": 10,
            "cmd-warmup": 3,
            "cmd-every": 1,
            "cmd-fraction": 0.2,
            "cmd-modes": 4,
            "cmd-samples": 300,
            "synthetic-train-size": 1000,
            "local-epochs": 1,
        },
    )


class Recorder:
    """Captures what each client holds after rebuilding, and the server's model at send time."""

    def __init__(self, monkeypatch):
        self.held, self.server = [], {}
        original = cmd_client.train_locally

        def spy(config, partition_id, weights, buffers, step_hook=None, **kwargs):
            self.held.append((config["server-round"], partition_id, weights.copy()))
            return original(config, partition_id, weights, buffers, step_hook, **kwargs)

        monkeypatch.setattr(cmd_client, "train_locally", spy)

    def watch(self, strategy_cls, monkeypatch):
        original = strategy_cls.configure_train

        def configure(strategy, server_round, *args):
            self.server[server_round] = strategy.weights.copy()
            return original(strategy, server_round, *args)

        monkeypatch.setattr(strategy_cls, "configure_train", configure)

    def max_gap(self):
        return max(float(np.abs(w - self.server[r]).max()) for r, _, w in self.held)


def run_with_invariant(config, tmp_path, monkeypatch, fail=None):
    from strategies.cmd import CMD

    rec = Recorder(monkeypatch)
    rec.watch(CMD, monkeypatch)
    grid = LocalGrid(client_app, config["num-clients"], fail=fail)
    summary = run_inprocess(config, tmp_path, progress=False, grid=grid)
    return summary, rec, grid


def test_clients_hold_the_global_model_with_sampling_and_failures(cmd_config, tmp_path, monkeypatch):
    # Client 3 never answers in rounds 5-6; every client misses the replies of round 7 for client 1.
    fail = lambda rnd, pid, kind: kind == "train" and ((pid == 3 and rnd in (5, 6)) or (pid == 1 and rnd == 7))
    summary, rec, _ = run_with_invariant(cmd_config, tmp_path, monkeypatch, fail=fail)
    assert summary["embedding_events"] >= 5 and summary["embedded_fraction"] > 0.5
    assert len(rec.held) > 20
    assert rec.max_gap() <= 1e-6
    assert summary["volume_ratio"] < 1.0


def test_catch_up_after_missed_rounds_sends_each_event_once(cmd_config, tmp_path, monkeypatch):
    summary, rec, grid = run_with_invariant(cmd_config, tmp_path, monkeypatch)
    with open(tmp_path / "volume.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] == "coefficients" and r["direction"] == "down"]
    # Every client that took part after the first event received every embedded pair exactly once.
    per_client = {}
    for r in rows:
        per_client[int(r["client"])] = per_client.get(int(r["client"]), 0) + int(r["values"])
    embedded = round(summary["embedded_fraction"] * summary["num_parameters"])
    stores = [CoefficientStore.load(ctx, summary["num_parameters"]) for ctx in grid.contexts.values()]
    for ctx, store in zip(grid.contexts.values(), stores):
        pid = ctx.node_config["partition-id"]
        if store.version:
            # a, b and mode: 3 values per embedded weight held
            assert per_client[pid] == 3 * int(store.embedded.sum())
    assert max(s.embedded.sum() for s in stores) <= embedded


def test_restarted_client_refuses_a_gap_then_catches_up(cmd_config, tmp_path, monkeypatch):
    from strategies.cmd import CMD

    config = dict(cmd_config, **{"fraction-train": 1.0, "num-clients": 4, "num-server-rounds": 8})
    rec = Recorder(monkeypatch)
    rec.watch(CMD, monkeypatch)
    grid = LocalGrid(client_app, 4)
    # Wipe client 2's store after round 5 without the server knowing (same node id): its next
    # delta starts past version 0, the client must refuse it, and the round after it catches up.
    original = grid.replies

    def send(messages):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == "6" and messages[0].metadata.message_type == "train":
            grid.contexts[grid.node_of(2)].state.pop(cmd_client.STORE_KEY, None)
        return original(messages)

    monkeypatch.setattr(grid, "replies", send)
    run_inprocess(config, tmp_path, progress=False, grid=grid)
    with open(tmp_path / "rejections.csv") as fh:
        rejections = list(csv.DictReader(fh))
    assert [(r["round"], r["client"]) for r in rejections] == [("6", "2")]
    assert "store version" in rejections[0]["reason"] and "missing" in rejections[0]["reason"]
    assert rec.max_gap() <= 1e-6
    assert any(r == 7 and pid == 2 for r, pid, _ in rec.held)


def event(index, n_modes=3):
    index = np.asarray(index, dtype=np.int64)
    return EmbeddingEvent(
        index,
        np.linspace(0.5, 1.5, index.size).astype(np.float32),
        np.arange(index.size, dtype=np.float32),
        (index % n_modes).astype(np.uint8),
    )


def test_store_applies_continuations_skips_repeats_and_refuses_gaps():
    refs = np.array([0, 1, 2])
    events = [event([5, 9, 11]), event([3, 4]), event([20])]
    store = CoefficientStore(30)
    store.apply(*decode_events(encode_events(events[:1], 30, 0, 1, refs, 3), 30))
    assert store.version == 1 and store.embedded.sum() == 3
    with pytest.raises(StoreVersionError, match="missing"):
        store.apply(*decode_events(encode_events(events[2:], 30, 2, 3, refs, 3), 30))
    # a delta that repeats event 0 (the server never got this client's acknowledgement) is fine
    store.apply(*decode_events(encode_events(events, 30, 0, 3, refs, 3), 30))
    assert store.version == 3 and sorted(np.flatnonzero(store.embedded)) == [3, 4, 5, 9, 11, 20]
    assert store.a.dtype == np.float32 and store.mode.dtype == np.uint8
    tampered = [EmbeddingEvent(events[0].index, events[0].a + 1, events[0].b, events[0].mode)] + events[1:]
    with pytest.raises(StoreVersionError, match="differs"):
        store.apply(*decode_events(encode_events(tampered, 30, 0, 3, refs, 3), 30))


def test_events_travel_as_masks_or_indices_whichever_is_smaller():
    refs = np.array([0, 1])
    dense = encode_events([event(np.arange(2, 600), 2)], 1000, 0, 1, refs, 2)
    sparse = encode_events([event([7, 900], 2)], 1000, 0, 1, refs, 2)
    assert "masks" in dense and "indices" in sparse
    for content in (dense, sparse):
        _, _, events, ref = decode_events(content, 1000)
        assert np.array_equal(ref, refs)
    assert np.array_equal(decode_events(sparse, 1000)[2][0].index, [7, 900])


def test_cifar10_resnet18_cmd_config_runs_one_round_on_cifar_shaped_data(tmp_path):
    from fedcmd.config import load_config

    config = load_config(
        "experiments/cifar10_resnet18_cmd.toml",
        [
            "dataset=synthetic",
            "synthetic-shape=3x32x32",
            "synthetic-train-size=64",
            "synthetic-test-size=32",
            "num-clients=2",
            "num-server-rounds=1",
            "batch-size=32",
            "cmd-samples=200",
        ],
    )
    assert config["model"] == "resnet18" and config["strategy"] == "cmd"
    summary = run_inprocess(config, tmp_path, progress=False)
    assert summary["num_parameters"] == 11_173_962 and summary["num_buffer_values"] > 0
    assert summary["rounds"] == 1 and summary["replies_rejected"] == 0


def test_references_are_held_once_embedding_stops_at_the_cap(cmd_config, tmp_path, monkeypatch):
    config = dict(cmd_config, **{"cmd-max-embedded": 0.5})
    summary, rec, grid = run_with_invariant(config, tmp_path, monkeypatch)
    assert rec.max_gap() <= 1e-6
    assert 0.5 <= summary["embedded_fraction"] < 0.8  # embedding stopped at the cap
    with open(tmp_path / "metrics.csv") as fh:
        fractions = {int(r["round"]): float(r["embedded_fraction"]) for r in csv.DictReader(fh) if r["round"] != "0"}
    capped = min(r for r, f in fractions.items() if f >= 0.5)
    refs = next(
        CoefficientStore.load(c, summary["num_parameters"]).reference_index
        for c in grid.contexts.values()
        if c.state.get(cmd_client.STORE_KEY) is not None
    )
    later = [rec.server[r][refs] for r in sorted(rec.server) if r > capped + 1]
    assert len(later) >= 2 and all(np.array_equal(v, later[0]) for v in later)
    # embedded weights follow the held references, so they are constant too; free weights still train
    assert not np.array_equal(rec.server[max(rec.server)], rec.server[capped + 2])
