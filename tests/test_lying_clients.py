"""Clients that lie (issue 13): whatever a client sends in a train or discovery reply, the run
completes, the reply is a counted rejection (or a refused claim) with its reason, and the global
model is the one the run makes without that client's replies. Ends with a fuzz test."""

import logging
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from helpers import read_csv

from fedcmd.binding import write_binding
from fedcmd.checkpoint import load_checkpoint
from fedcmd.client_app import app as client_app
from fedcmd.deploy import make_node_key
from fedcmd.engine import LocalGrid, _wire, run_inprocess


class TamperingGrid(LocalGrid):
    """A LocalGrid whose replies pass through `tamper(kind, round, partition, node, reply, message)`,
    which returns the reply to deliver (a new one, or None for no reply). Records where every train
    message went."""

    def __init__(self, num_nodes, tamper=None, **kwargs):
        super().__init__(client_app, num_nodes, **kwargs)
        self.tamper = tamper
        self.train_sent = []  # (round, partition, node)

    def replies(self, messages):
        messages = list(messages)
        replies = list(super().replies(messages))
        by_id = {m.metadata.message_id: m for m in messages}
        for msg in messages:
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id in self.contexts:
                pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                self.train_sent.append((int(msg.metadata.group_id), pid, msg.metadata.dst_node_id))
        delivered = []
        for reply in replies:
            msg = by_id[reply.metadata.reply_to_message_id]
            node = msg.metadata.dst_node_id
            kind, group = msg.metadata.message_type, msg.metadata.group_id
            rnd = int(group) if group.isdigit() else int(group.rsplit("-", 1)[1])
            if self.tamper is not None:
                reply = self.tamper(kind, rnd, self.contexts[node].node_config["partition-id"], node, reply, msg)
            if reply is not None:
                reply = _wire(reply)
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                delivered.append(reply)
        return delivered


def replace(reply, msg, **records):
    """A copy of `reply` (answering `msg`) with records replaced (None: removed)."""
    content = RecordDict({k: v for k, v in reply.content.items() if k not in records})
    for key, value in records.items():
        if value is not None:
            content[key] = value
    return Message(content, reply_to=msg)


def lie_about(key, bad):
    """A lie that sets metric `key` to `bad` (bound here, not to a loop's variables)."""
    return lambda r, m: with_metrics(r, m, **{key.replace("-", "_"): bad})


def with_metrics(reply, msg, drop=(), **values):
    metrics = {k: v for k, v in reply.content["metrics"].items() if k not in drop}
    metrics.update({k.replace("_", "-"): v for k, v in values.items()})
    return replace(reply, msg, metrics=MetricRecord(metrics))


def final_model(out, config):
    strategy = load_checkpoint(out, config).strategy
    return strategy.weights.copy(), strategy.buffers.copy()


def run(config, out, tamper=None, fail=None, num_nodes=None):
    grid = TamperingGrid(num_nodes or config["num-clients"], tamper=tamper, fail=fail)
    summary = run_inprocess(config, out, progress=False, grid=grid)
    return summary, grid


def assert_same_model(out_a, out_b, config):
    for a, b in zip(final_model(out_a, config), final_model(out_b, config)):
        assert np.array_equal(a, b)


STRATEGY_KEYS = {
    "fedavg": {},
    "cmd": {"cmd-warmup": 1, "cmd-every": 1, "cmd-fraction": 0.3, "cmd-modes": 2, "cmd-samples": 100},
    "apf": {"apf-threshold": 0.3},
    "a-apf": {"apf-threshold": 0.3},
}


@pytest.fixture
def config(small_config):
    return dict(small_config, **{"model": "mlp", "local-epochs": 1, "num-server-rounds": 3})


def config_for(config, strategy, **extra):
    return dict(config, strategy=strategy, **STRATEGY_KEYS[strategy], **extra)


def tampered_run_matches_dropped(config, tmp_path, lies):
    """Run with `lies` ({(round, partition): reply -> reply}) and with those replies dropped; the
    models must agree and every lie must be rejected. Returns the rejection reasons of the lies."""

    def tamper(kind, rnd, pid, node, reply, msg):
        lie = lies.get((rnd, pid)) if kind == "train" else None
        return lie(reply, msg) if lie else reply

    summary, _ = run(config, tmp_path / "lied", tamper=tamper)
    dropped, _ = run(config, tmp_path / "dropped", fail=lambda rnd, pid, kind: kind == "train" and (rnd, pid) in lies)
    assert_same_model(tmp_path / "lied", tmp_path / "dropped", config)
    assert dropped["replies_rejected"] == len(lies)
    reasons = {(int(r["round"]), int(r["client"])): r["reason"] for r in read_csv(tmp_path / "lied" / "rejections.csv")}
    assert set(reasons) == set(lies)
    assert summary["replies_rejected"] == len(lies)
    return reasons


# ----- item 2: num-examples is the server's to know --------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "cmd", "apf"])
def test_num_examples_must_equal_the_partition_size(config, tmp_path, strategy):
    config = config_for(config, strategy)
    lies = {
        (1, 1): lambda r, m: with_metrics(r, m, num_examples=1e12),
        (2, 2): lambda r, m: with_metrics(r, m, num_examples=float("inf")),
        (2, 3): lambda r, m: with_metrics(r, m, num_examples=[100.0, 100.0]),
        (3, 0): lambda r, m: with_metrics(r, m, num_examples=99.0),
    }  # partitions hold 100
    reasons = tampered_run_matches_dropped(config, tmp_path, lies)
    assert "partition 1 holds 100 examples" in reasons[(1, 1)] and "1000000000000.0" in reasons[(1, 1)]
    assert "finite number" in reasons[(2, 2)] and "finite number" in reasons[(2, 3)]
    assert "99.0" in reasons[(3, 0)]


# ----- item 3: huge finite values ---------------------------------------------------------------------
def test_max_update_norm_refuses_huge_finite_values(config, tmp_path):
    config = config_for(config, "fedavg", **{"max-update-norm": 5.0})

    def set_weights(change):
        def lie(reply, msg):
            values = reply.content["weights"]["values"].numpy().copy()
            change(values)
            return replace(reply, msg, weights=ArrayRecord({"values": Array(values)}))

        return lie

    lies = {
        (1, 1): set_weights(lambda v: v.__setitem__(7, 1e30)),
        (2, 2): set_weights(lambda v: v.fill(np.finfo(np.float32).max)),
        (3, 3): set_weights(lambda v: v.__iadd__(0.05)),
    }  # small per value, ~11 in L2 over 50,890
    reasons = tampered_run_matches_dropped(config, tmp_path, lies)
    assert all("above max-update-norm = 5.0" in why for why in reasons.values())
    # Honest replies stay far below the bound here: nothing else was rejected (checked above), and
    # the bound is not silently on by default.
    from fedcmd.config import DEFAULTS

    assert DEFAULTS["max-update-norm"] == 0.0


# ----- item 4: any exception in reading a reply is a rejection ----------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "cmd", "apf"])
def test_replies_that_break_the_parser_are_rejections(config, tmp_path, strategy):
    config = config_for(config, strategy, **{"num-server-rounds": 4})
    garbage = ArrayRecord({"values": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not npy")})
    lies = {
        (1, 0): lambda r, m: with_metrics(r, m, train_loss=[0.1, 0.2]),
        (2, 1): lambda r, m: replace(r, m, weights=garbage),
        (3, 2): lambda r, m: with_metrics(r, m, train_loss=float("nan")),
    }
    version_keys = {"cmd": ["store-version"], "apf": ["model-version", "mask-version"]}.get(strategy, [])
    bad_versions = [float("nan"), float("inf"), [1, 2], 1.5]
    for k, bad in enumerate(bad_versions):
        for key in version_keys:
            lies[(1 + k, 3)] = lie_about(key, bad)
    reasons = tampered_run_matches_dropped(config, tmp_path, lies)
    assert "'weights' is not a numpy array" in reasons[(2, 1)]  # bytes that are no .npy: named, rejected
    for k in range(len(bad_versions) if version_keys else 0):
        assert "must be an integer" in reasons[(1 + k, 3)]


# ----- item 6: replies are matched by the message they answer -----------------------------------------
def test_an_error_reply_from_the_superlink_is_matched_to_its_message(config, tmp_path, caplog):
    def tamper(kind, rnd, pid, node, reply, msg):
        if kind == "train" and (rnd, pid) == (2, 2):
            error = Message(Error(code=2, reason="Node Unavailable"), reply_to=msg)
            error.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node it lost
            return error
        return reply

    with caplog.at_level(logging.WARNING, logger="fedcmd"):
        summary, _ = run(config, tmp_path, tamper=tamper)
    rejections = [(r["round"], r["client"], r["reason"]) for r in read_csv(tmp_path / "rejections.csv")]
    assert rejections == [("2", "2", "client error: Node Unavailable")]
    assert not any("answers no train message" in rec.getMessage() for rec in caplog.records)
    assert summary["replies_rejected"] == 1


def test_a_reply_from_another_node_than_the_message_went_to_is_rejected(config, tmp_path):
    def tamper(kind, rnd, pid, node, reply, msg):
        if kind == "train" and (rnd, pid) == (1, 1):
            reply.metadata.__dict__["_src_node_id"] = node + 1
        return reply

    run(config, tmp_path, tamper=tamper)
    reasons = [r["reason"] for r in read_csv(tmp_path / "rejections.csv")]
    assert len(reasons) == 1 and "comes from node" in reasons[0]


# ----- items 1 and 5: discovery ---------------------------------------------------------------------
DISCOVERY_LIES = {
    "string": lambda r, m: replace(r, m, info=ConfigRecord({"partition-id": "abc"})),
    "nan": lambda r, m: replace(r, m, info=MetricRecord({"partition-id": float("nan")})),
    "float": lambda r, m: replace(r, m, info=MetricRecord({"partition-id": 1.0})),
    "list": lambda r, m: replace(r, m, info=MetricRecord({"partition-id": [0, 1]})),
    "array": lambda r, m: replace(r, m, info=ArrayRecord({"partition-id": Array(np.zeros(1))})),
    "missing key": lambda r, m: replace(r, m, info=MetricRecord({"partition": 1})),
    "no info": lambda r, m: replace(r, m, info=None),
    "bool": lambda r, m: replace(r, m, info=ConfigRecord({"partition-id": True})),
    "error": lambda r, m: Message(Error(code=0, reason="boom"), reply_to=m),
    "out of range": lambda r, m: replace(r, m, info=MetricRecord({"partition-id": 4})),
    "negative": lambda r, m: replace(r, m, info=MetricRecord({"partition-id": -1})),
    "duplicate": lambda r, m: r,  # an honest-looking claim for partition 1, which a live node serves
}


def test_discovery_refuses_claims_that_lie_and_the_run_goes_on(config, tmp_path, caplog):
    grid = TamperingGrid(4)
    impostors = {grid._add_node(1): how for how in DISCOVERY_LIES}  # every impostor says it holds partition 1
    honest = {pid: grid.node_of(pid) for pid in range(4)}

    def tamper(kind, rnd, pid, node, reply, msg):
        return DISCOVERY_LIES[impostors[node]](reply, msg) if kind == "query" and node in impostors else reply

    grid.tamper = tamper
    with caplog.at_level(logging.WARNING, logger="fedcmd"):
        summary = run_inprocess(config, tmp_path / "attacked", progress=False, grid=grid)
    # Every train message of every round went to the honest node of its partition.
    assert {(pid, node) for _, pid, node in grid.train_sent} == set(honest.items())
    assert len(grid.train_sent) == 4 * config["num-server-rounds"]
    refused = [rec.getMessage() for rec in caplog.records if " refused: " in rec.getMessage()]
    for node in impostors:
        assert any(f"node {node} refused" in line for line in refused), impostors[node]
    assert any("already served by live node" in line for line in refused)
    assert any("outside [0, 4)" in line for line in refused)
    assert any("must be an integer" in line for line in refused)
    assert summary["replies_rejected"] == 0
    run(config, tmp_path / "alone")
    assert_same_model(tmp_path / "attacked", tmp_path / "alone", config)


def test_a_partition_bound_to_a_key_refuses_other_keys(config, tmp_path, caplog):
    """With a binding (deploy --auth), a node may serve only the partition its key is bound to, even
    when that partition has no live node (the issue: node 0's key claimed partition 1)."""
    keys = {pid: make_node_key(tmp_path / f"node-{pid}") for pid in range(4)}
    binding = write_binding(
        tmp_path / "binding.json", {pid: key.with_name(key.name + ".pub") for pid, key in keys.items()}
    )
    stranger = make_node_key(tmp_path / "stranger")
    config = dict(config, **{"partition-binding": str(binding)})
    grid = TamperingGrid(4)

    def pem(key):
        from cryptography.hazmat.primitives import serialization

        public = serialization.load_ssh_public_key(key.with_name(key.name + ".pub").read_bytes())
        return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    for pid in (0, 2, 3):
        grid.public_keys[grid.node_of(pid)] = pem(keys[pid])
    del grid.contexts[grid.node_of(1)]  # partition 1's own node is down
    thief = grid._add_node(1)
    grid.public_keys[thief] = pem(keys[0])  # node 0's key, claiming partition 1
    stranger_node = grid._add_node(1)
    grid.public_keys[stranger_node] = pem(stranger)
    keyless = grid._add_node(1)
    with caplog.at_level(logging.WARNING, logger="fedcmd"):
        run_inprocess(config, tmp_path / "run", progress=False, grid=grid)
    assert {pid for _, pid, _ in grid.train_sent} == {0, 2, 3}
    refused = " ".join(rec.getMessage() for rec in caplog.records if " refused: " in rec.getMessage())
    assert f"node {thief} refused: it claims partition 1, but its public key is bound to partition 0" in refused
    assert "is bound to no partition" in refused
    assert f"node {keyless} refused: the node has no readable public key" in refused
    rejections = {(r["round"], r["client"], r["reason"]) for r in read_csv(tmp_path / "run" / "rejections.csv")}
    assert rejections == {(str(rnd), "1", "unreachable: no node holds this partition") for rnd in (1, 2, 3)}
    # The run's refusals table holds each refused node in every round (they are asked again each round).
    refusals = read_csv(tmp_path / "run" / "refusals.csv")
    assert sorted((int(r["round"]), int(r["node"])) for r in refusals) == sorted(
        (rnd, node) for rnd in (1, 2, 3) for node in (thief, stranger_node, keyless)
    )


# ----- fuzz -----------------------------------------------------------------------------------------
# 8 of 10 clients send randomly malformed train replies every round (wrong types, shapes and dtypes,
# non-finite and extreme values, missing and extra records, lying metrics, errors): 1,024 replies over
# the four strategies. Every one is rejected with a reason, the run completes, and the global model
# is, to the bit, the one of the run in which those clients never reply.
BAD = tuple(range(2, 10))
ROUNDS = 32
F32_MAX = float(np.finfo(np.float32).max)


# ----- the mutations: each returns False when it does not apply to this reply ------------------------
def _pick_vector(records, rng):
    """A vector record of the reply, chosen at random (None if none is left)."""
    keys = [k for k in ("weights", "references") if isinstance(records.get(k), ArrayRecord) and "values" in records[k]]
    return keys[rng.integers(len(keys))] if keys else None


def on_values(change):
    def mutate(records, metrics, rng):
        key = _pick_vector(records, rng)
        if key is None:
            return False
        try:
            values = records[key]["values"].numpy().copy()
        except ValueError:  # an earlier mutation corrupted its bytes
            return False
        if values.ndim != 1 or values.size == 0 or values.dtype != np.float32:  # already mangled
            return False
        records[key] = ArrayRecord({"values": Array(np.asarray(change(values, rng)))})
        return True

    return mutate


def at_random(value):
    def change(values, rng):
        values[rng.integers(values.size)] = value
        return values

    return change


def on_record(change):
    def mutate(records, metrics, rng):
        key = _pick_vector(records, rng)
        if key is not None:
            change(records, key)
        return key is not None

    return mutate


def set_metric(key, value):
    def mutate(records, metrics, rng):
        if key not in metrics or (callable(value) and not isinstance(metrics[key], (int, float))):
            return False
        metrics[key] = value(metrics[key]) if callable(value) else value
        return True

    return mutate


def drop_metric(key):
    def mutate(records, metrics, rng):
        return metrics.pop(key, None) is not None

    return mutate


def add_record(key, record):
    def mutate(records, metrics, rng):
        if key in records:
            return False
        records[key] = record
        return True

    return mutate


def corrupt_bytes(records, key):
    records[key] = ArrayRecord(
        {"values": Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"\x93NUMPY?")}
    )


def add_array(records, key):
    records[key] = ArrayRecord({"values": records[key]["values"], "extra": Array(np.zeros(3, dtype=np.float32))})


MUTATIONS = {
    "nan": on_values(at_random(np.nan)),
    "inf": on_values(at_random(np.inf)),
    "-inf": on_values(at_random(-np.inf)),
    "1e30": on_values(at_random(1e30)),
    "-1e30": on_values(at_random(-1e30)),
    "f32max": on_values(at_random(F32_MAX)),
    "-f32max": on_values(at_random(-F32_MAX)),
    "1e10": on_values(at_random(1e10)),
    "all f32max": on_values(lambda v, rng: np.full_like(v, F32_MAX)),
    "shift +10": on_values(lambda v, rng: v + np.float32(10.0)),
    "float64": on_values(lambda v, rng: v.astype(np.float64)),
    "float16": on_values(lambda v, rng: v.astype(np.float16)),
    "int32": on_values(lambda v, rng: v.astype(np.int32)),
    "uint8": on_values(lambda v, rng: v.clip(0, 255).astype(np.uint8)),
    "bool": on_values(lambda v, rng: v.astype(bool)),
    "2-D": on_values(lambda v, rng: v.reshape(1, -1)),
    "0-D": on_values(lambda v, rng: np.float32(v[0])),
    "short": on_values(lambda v, rng: v[:-1]),
    "long": on_values(lambda v, rng: np.append(v, np.float32(0))),
    "empty": on_values(lambda v, rng: v[:0]),
    "doubled": on_values(lambda v, rng: np.concatenate([v, v])),
    "corrupt bytes": on_record(corrupt_bytes),
    "extra array": on_record(add_array),
    "record as metrics": on_record(lambda r, k: r.__setitem__(k, MetricRecord({"values": 1.0}))),
    "record as config": on_record(lambda r, k: r.__setitem__(k, ConfigRecord({"values": "x"}))),
    "record missing": on_record(lambda r, k: r.pop(k)),
    "extra record": add_record("evil", ArrayRecord({"values": Array(np.ones(5, dtype=np.float32))})),
    "extra buffers": add_record("buffers", ArrayRecord({"values": Array(np.ones(5, dtype=np.float32))})),
    "extra references": add_record("references", ArrayRecord({"values": Array(np.ones(2, dtype=np.float32))})),
    "examples 0": set_metric("num-examples", 0.0),
    "examples -40": set_metric("num-examples", -40.0),
    "examples 1e12": set_metric("num-examples", 1e12),
    "examples inf": set_metric("num-examples", np.inf),
    "examples nan": set_metric("num-examples", np.nan),
    "examples +1": set_metric("num-examples", lambda v: v + 1),
    "examples x2": set_metric("num-examples", lambda v: v * 2),
    "examples list": set_metric("num-examples", [40.0]),
    "examples missing": drop_metric("num-examples"),
    "loss nan": set_metric("train-loss", np.nan),
    "loss inf": set_metric("train-loss", np.inf),
    "loss -1": set_metric("train-loss", -1.0),
    "loss list": set_metric("train-loss", [0.5, 0.5]),
    "loss missing": drop_metric("train-loss"),
    "extra metric": lambda records, metrics, rng: metrics.setdefault("evil", 1.0) == 1.0,
    "metrics missing": lambda records, metrics, rng: records.pop("metrics", None) is not None,
    "metrics as config": lambda records, metrics, rng: records.__setitem__("metrics", ConfigRecord({"x": "y"})) or True,
}
for _key in ("store-version", "model-version", "mask-version"):
    MUTATIONS.update(
        {
            f"{_key} +1": set_metric(_key, lambda v: v + 1),
            f"{_key} -1": set_metric(_key, lambda v: v - 1),
            f"{_key} nan": set_metric(_key, np.nan),
            f"{_key} inf": set_metric(_key, np.inf),
            f"{_key} +0.5": set_metric(_key, lambda v: v + 0.5),
            f"{_key} as float": set_metric(_key, float),
            f"{_key} list": set_metric(_key, lambda v: [v, v]),
            f"{_key} missing": drop_metric(_key),
        }
    )
WHOLE = ("error reply", "other sender")


def malformed(reply, msg, node, rng, draw):
    """`reply` with the mutations `draw` (names) applied, skipping those that do not fit it.
    Returns (new reply, names applied)."""
    if draw[0] in WHOLE:
        if draw[0] == "error reply":
            return Message(Error(code=0, reason="ValueError: a client that gave up"), reply_to=msg), [draw[0]]
        reply.metadata.__dict__["_src_node_id"] = node + 7
        return reply, [draw[0]]
    original = reply.content["metrics"]
    records, metrics = dict(reply.content.items()), dict(original)
    applied = [name for name in draw if name not in WHOLE and MUTATIONS[name](records, metrics, rng)]
    if records.get("metrics") is original:
        records["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=msg), applied


def fuzz_config(small_config, strategy):
    return dict(
        small_config,
        strategy=strategy,
        **STRATEGY_KEYS[strategy],
        **{
            "model": "mlp",
            "num-clients": 10,
            "synthetic-train-size": 400,
            "batch-size": 40,
            "local-epochs": 1,
            "num-server-rounds": ROUNDS,
            "max-update-norm": 5.0,
        },
    )


@pytest.mark.parametrize("strategy", ["fedavg", "cmd", "apf", "a-apf"])
def test_malformed_replies_are_all_rejected_and_change_nothing(small_config, tmp_path, strategy):
    config = fuzz_config(small_config, strategy)
    rng = np.random.default_rng(13)
    names = list(MUTATIONS) + list(WHOLE)
    sent = {"count": 0, "kinds": set()}

    def tamper(kind, rnd, pid, node, reply, msg):
        if kind != "train" or pid not in BAD:
            return reply
        draw = [names[sent["count"] % len(names)]] + list(rng.choice(names, size=rng.integers(0, 3)))
        reply, applied = malformed(reply, msg, node, rng, draw)
        if not applied:  # none of the drawn mutations fits this reply (e.g. CMD versions under FedAvg)
            reply, applied = malformed(reply, msg, node, rng, ["examples x2"])
        sent["count"] += 1
        sent["kinds"].add(applied[0])
        return reply

    lied = run_inprocess(config, tmp_path / "lied", progress=False, grid=TamperingGrid(10, tamper=tamper))
    silent_grid = TamperingGrid(10, fail=lambda rnd, pid, kind: kind == "train" and pid in BAD)
    silent = run_inprocess(config, tmp_path / "silent", progress=False, grid=silent_grid)

    assert sent["count"] == ROUNDS * len(BAD) == 256
    assert len(sent["kinds"]) > 40
    rejections = read_csv(tmp_path / "lied" / "rejections.csv")
    assert len(rejections) == sent["count"] == lied["replies_rejected"]
    assert {int(r["client"]) for r in rejections} == set(BAD)
    assert not any("timeout" in r["reason"] for r in rejections)  # read, and refused for what they held
    assert silent["replies_rejected"] == sent["count"]  # the good clients' replies passed every check
    assert lied["rounds"] == ROUNDS
    good_rows = lambda out: [(m["accepted"], m["accuracy"], m["train_loss"]) for m in read_csv(out / "metrics.csv")]
    assert good_rows(tmp_path / "lied") == good_rows(tmp_path / "silent")
    a = load_checkpoint(tmp_path / "lied", config).strategy
    b = load_checkpoint(tmp_path / "silent", config).strategy
    assert np.array_equal(a.weights, b.weights) and np.array_equal(a.buffers, b.buffers)
    assert np.isfinite(a.weights).all()
    if strategy == "cmd":
        assert a.version >= 1  # the fuzz reached rounds with embedded weights and references
