"""APF / A-APF end to end through the real strategy and ClientApp code, in process.

The invariant: every sampled client, after applying its message and before training, holds
exactly the server's global model, whatever it missed (not sampled, message lost, reply lost,
state wiped, node restarted). Recorded on the client side where the rebuilt vector enters
`train_locally`, and on the server side when the message is built.
"""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from helpers import read_csv

import clients.apf
import strategies.apf
from clients.apf import SyncedModel, SyncError
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.protocols.apf import pack_mask
from fedcmd.sampling import sample_cohort
from fedcmd.wire import vector_record

N = 61706  # LeNet-5 on 1x28x28


@pytest.fixture
def recorder(monkeypatch):
    """Server weights and mask when each message is built; client weights going into training and
    coming out of it."""
    server, client = {}, {}
    build = strategies.apf.APF.train_content

    def train_content(self, server_round, partition_id):
        server[(server_round, partition_id)] = (self.weights.copy(), self.mask.active.copy())
        return build(self, server_round, partition_id)

    train_locally = clients.apf.train_locally

    def recording_train_locally(config, partition_id, weights, buffers, step_hook=None, **kwargs):
        out = train_locally(config, partition_id, weights, buffers, step_hook=step_hook, **kwargs)
        client[(config["server-round"], partition_id)] = (weights.copy(), out[0].copy())
        return out

    monkeypatch.setattr(strategies.apf.APF, "train_content", train_content)
    monkeypatch.setattr(clients.apf, "train_locally", recording_train_locally)
    return server, client


class LossyGrid(LocalGrid):
    """Drops the replies of (round, partition) pairs in `lose_replies` after the client ran."""

    def __init__(self, *args, lose_replies=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.lose_replies = set(lose_replies)

    def replies(self, messages):
        messages = list(messages)
        pids = {
            m.metadata.dst_node_id: self.contexts[m.metadata.dst_node_id].node_config["partition-id"]
            for m in messages
            if m.metadata.dst_node_id in self.contexts
        }
        replies = list(super().replies(messages))
        return [
            r
            for r in replies
            if not (
                r.metadata.group_id.isdigit()
                and (int(r.metadata.group_id), pids[r.metadata.src_node_id]) in self.lose_replies
            )
        ]


# Without weight decay some weights never move on this data, so catch-ups list what changed
# (`explicit`); with it every active weight moves and resending a client's own mask (`derived`) or
# the whole model (`full`) is cheaper.
@pytest.mark.parametrize(
    "strategy, check_every, weight_decay, kinds",
    [("apf", 1, 0.0, ("full", "explicit")), ("a-apf", 2, 1e-3, ("full", "derived"))],
)
def test_sampled_clients_hold_the_global_model_through_failures(
    small_config, tmp_path, recorder, strategy, check_every, weight_decay, kinds
):
    rounds, clients_ = 9, 10
    config = dict(
        small_config,
        **{
            "strategy": strategy,
            "num-clients": clients_,
            "fraction-train": 0.4,
            "num-server-rounds": rounds,
            "apf-check-every": check_every,
            "apf-threshold": 0.5,  # a high T freezes many scalars within a few rounds
            "weight-decay": weight_decay,
        },
    )
    cohorts = {r: [int(p) for p in sample_cohort(clients_, 0.4, config["seed"], r)] for r in range(1, rounds + 1)}
    # Events on the cohorts of seed 0 (round: clients): 1: 0 1 3 4, 2: 0 2 7 8, 3: 4 5 8 9, 4: 4 5 7 9,
    # 5: 2 4 7 8, 6: 0 1 3 7, 7: 2 3 5 8, 8: 0 1 5 7, 9: 1 2 4 6.
    lost_message = {(2, 0), (5, 2)}  # never reaches the client
    lost_reply = {(3, 8), (6, 3)}  # the client applied it and trained; the reply is lost
    wiped = (4, 4)  # same node, state gone (acknowledged in round 3): SyncError expected
    restarted = (7, 5)  # the node comes back under a new id with an empty state
    for server_round, pid in lost_message | lost_reply | {wiped, restarted}:
        assert pid in cohorts[server_round]

    def fail(server_round, pid, kind):
        if kind != "train":
            return False
        if (server_round, pid) == wiped:
            grid.contexts[grid.node_of(pid)].state = RecordDict()
        if (server_round, pid) == restarted:
            grid.restart(pid)
            return True
        return (server_round, pid) in lost_message

    grid = LossyGrid(client_app, clients_, fail=fail, lose_replies=lost_reply)
    server, client = recorder
    summary = run_inprocess(config, tmp_path, progress=False, grid=grid)

    # Every client that trained held exactly the server's model of that moment.
    assert len(client) > 20
    for key, (held, trained) in client.items():
        weights, active = server[key]
        assert np.abs(held - weights).max() <= 1e-6, key
        assert np.array_equal(trained[~active], held[~active]), f"frozen scalars moved on client {key}"
    # Every message that reached a client with usable state was trained on; the wiped one was refused.
    reached = set(server) - lost_message - {restarted, wiped}
    assert set(client) == reached
    rejections = read_csv(tmp_path / "rejections.csv")
    reasons = {(int(r["round"]), int(r["client"])): r["reason"] for r in rejections}
    assert "SyncError" in reasons[wiped] and "holds no synchronised model" in reasons[wiped]
    assert set(reasons) == lost_message | lost_reply | {wiped, restarted}
    # The paths the test is meant to cover were taken, and freezing happened.
    metrics = read_csv(tmp_path / "metrics.csv")[1:]
    assert max(float(m["frozen_fraction"]) for m in metrics) > 0.05
    assert all(summary[f"sync_{kind}"] > 0 for kind in kinds), summary
    assert summary["masks_sent"] > 0 and summary["mask_bytes"] > 0
    # The wiped and the restarted clients are sent everything the next time they are sampled.
    volume = read_csv(tmp_path / "volume.csv")
    for later, pid in ((5, 4), (8, 5)):
        assert (later, pid) in client
        down = [
            r
            for r in volume
            if (int(r["round"]), int(r["client"])) == (later, pid)
            and r["direction"] == "down"
            and r["category"] == "weights"
        ]
        assert [int(r["values"]) for r in down] == [N]
    assert np.isfinite(summary["final_accuracy"])


def test_only_active_values_travel_and_known_masks_are_left_out(small_config, tmp_path, recorder):
    # Full participation, a check every 2 rounds; weight decay moves every weight, so the values a
    # client needs are exactly those active in the previous round (the `derived` catch-up).
    rounds = 6
    config = dict(
        small_config,
        **{
            "strategy": "apf",
            "num-server-rounds": rounds,
            "apf-check-every": 2,
            "apf-threshold": 0.5,
            "weight-decay": 1e-3,
        },
    )
    summary = run_inprocess(config, tmp_path, progress=False)
    metrics = {int(m["round"]): m for m in read_csv(tmp_path / "metrics.csv")[1:]}
    active = {r: int(m["active_weights"]) for r, m in metrics.items()}
    assert active[1] == active[2] == N and min(active.values()) < N  # frozen weights in rounds 3..6
    for r, m in metrics.items():
        assert float(m["frozen_fraction"]) == pytest.approx(1 - active[r] / N)
        assert float(m["paper_floats"]) == 2 * 4 * active[r]

    rows = read_csv(tmp_path / "volume.csv")
    weights = [r for r in rows if r["category"] == "weights"]
    assert len(weights) == 2 * 4 * rounds  # one weights array per message, up and down
    for r in weights:
        rnd = int(r["round"])
        expected = active[rnd] if r["direction"] == "up" else (N if rnd == 1 else active[rnd - 1])
        assert int(r["values"]) == expected, r
        assert int(r["raw_bytes"]) == 4 * expected
    # The new mask goes to every client once after each check (after rounds 2 and 4), never again.
    masks = [r for r in rows if r["category"] == "masks"]
    assert sorted({int(r["round"]) for r in masks}) == [3, 5]
    assert all(r["direction"] == "down" and int(r["raw_bytes"]) == (N + 7) // 8 for r in masks)
    assert len(masks) == 2 * 4
    assert summary["sync_derived"] == 4 * (rounds - 1) and summary["sync_full"] == 4
    assert summary["masks_sent"] == 8 and summary["mask_bytes"] == 8 * ((N + 7) // 8)

    # Paper-style and measured figures side by side: here they differ only by the masks and by the
    # down direction lagging one round (values of round r-1's mask).
    paper = sum(2 * 4 * a for a in active.values())
    assert summary["paper_floats"] == paper
    assert summary["paper_volume_ratio"] == pytest.approx(paper / (2 * N * 4 * rounds))
    measured = 4 * (sum(active.values()) + N + sum(active[r] for r in range(1, rounds))) + summary["mask_bytes"] / 4
    assert summary["floats_up"] + summary["floats_down"] == pytest.approx(measured)
    assert summary["measured_volume_ratio"] == pytest.approx(measured / (2 * N * 4 * rounds))
    assert summary["volume_ratio"] == pytest.approx(summary["measured_volume_ratio"])


def test_client_refuses_messages_that_do_not_fit_its_state():
    n = 20
    held = SyncedModel(n)
    held.weights, held.model_version, held.mask_version = np.zeros(n, np.float32), 3, 2
    held.active = np.arange(n) % 2 == 0

    def message(kind, values, **head):
        base = {"model-version": 5, "mask-version": 2, "catch-up": kind, "from-version": 3}
        return RecordDict({"apf": ConfigRecord({**base, **head}), "weights": vector_record(values)})

    with pytest.raises(SyncError, match="mask version 1"):
        held.apply(message("derived", np.ones(10, np.float32), **{"base-mask-version": 1}))
    with pytest.raises(SyncError, match="holds version 3"):
        held.apply(message("derived", np.ones(10, np.float32), **{"base-mask-version": 2, "from-version": 4}))
    with pytest.raises(SyncError, match="without sending it"):
        held.apply(message("full", np.ones(n, np.float32), **{"mask-version": 3}))
    # A derived catch-up writes the held mask's positions; a new mask replaces the held one.
    update = message("derived", np.ones(10, np.float32), **{"base-mask-version": 2, "mask-version": 3})
    update["masks"] = ArrayRecord({"active": pack_mask(np.arange(n) < 5)})
    held.apply(update)
    assert held.weights.tolist() == [float(i % 2 == 0) for i in range(n)]
    assert held.active.tolist() == [i < 5 for i in range(n)]
    assert (held.model_version, held.mask_version) == (5, 3)
