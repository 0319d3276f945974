"""The wire codecs through the real strategies and ClientApp, in process (issue 11).

- With every codec on both directions, each client trains from exactly the global model the server
  holds (both sides decode the same bytes), with client sampling and clients that miss rounds
  (they are sent the model as it is, then the broadcast again).
- Encoded payloads are counted at their encoded size; bits per value follow.
- A crash and a resume give the uninterrupted run's models (topk's residuals included).
- Bad encoded replies are rejected, and the global model is the one of the run without them.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from helpers import read_csv

import clients.apf
import clients.cmd
import clients.fedavg
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess
from strategies.apf import APF, AggressiveAPF
from strategies.cmd import CMD
from strategies.fedavg import FedAvg

CLIENTS = {
    "fedavg": (clients.fedavg, FedAvg),
    "cmd": (clients.cmd, CMD),
    "apf": (clients.apf, APF),
    "a-apf": (clients.apf, AggressiveAPF),
}


@pytest.fixture
def codec_config(small_config):
    return dict(
        small_config,
        **{
            "num-clients": 6,
            "fraction-train": 0.5,
            "num-server-rounds": 6,
            "local-epochs": 1,
            "cmd-warmup": 2,
            "cmd-every": 1,
            "cmd-fraction": 0.3,
            "cmd-samples": 300,
            "apf-threshold": 0.3,
            "codec-chunk": 256,
            "topk-fraction": 0.05,
        },
    )


class Recorder:
    """What each client trains from, and the server's global model when it configures each round."""

    def __init__(self, strategy: str, monkeypatch):
        module, cls = CLIENTS[strategy]
        self.held, self.server = [], {}
        original_train, original_configure = module.train_locally, cls.configure_train

        def spy(config, partition_id, weights, buffers, step_hook=None, **kwargs):
            self.held.append((config["server-round"], partition_id, weights.copy()))
            return original_train(config, partition_id, weights, buffers, step_hook, **kwargs)

        def configure(strategy_, server_round, *args):
            self.server[server_round] = strategy_.weights.copy()
            return original_configure(strategy_, server_round, *args)

        monkeypatch.setattr(module, "train_locally", spy)
        monkeypatch.setattr(cls, "configure_train", configure)

    def max_gap(self) -> float:
        return max(float(np.abs(w - self.server[r]).max()) for r, _, w in self.held)


@pytest.mark.parametrize("codec", ("fp16", "bf16", "int8", "topk"))
@pytest.mark.parametrize("strategy", tuple(CLIENTS))
def test_clients_train_from_exactly_the_servers_model(codec_config, tmp_path, monkeypatch, strategy, codec):
    # Client 2 never answers in rounds 3-4: it holds an old model and gets the model as it is.
    fail = lambda rnd, pid, kind: kind == "train" and pid == 2 and rnd in (3, 4)
    config = dict(codec_config, **{"strategy": strategy, "codec-up": codec, "codec-down": codec})
    rec = Recorder(strategy, monkeypatch)
    summary = run_inprocess(config, tmp_path, progress=False, grid=LocalGrid(client_app, 6, fail=fail))
    assert len(rec.held) >= 15
    assert rec.max_gap() == 0.0  # to the bit: both sides decoded the same bytes
    rejected = {(int(r["round"]), int(r["client"])) for r in read_csv(tmp_path / "rejections.csv")}
    assert rejected <= {(3, 2), (4, 2)}
    volume = read_csv(tmp_path / "volume.csv")
    payload = [r for r in volume if r["category"] in ("weights", "references")]
    # Clients sampled in consecutive rounds got the broadcast (encoded), the others the model as it is.
    down = [r for r in payload if r["direction"] == "down" and r["category"] == "weights"]
    assert 0 < sum(int(r["raw_bytes"]) < 4 * int(r["values"]) for r in down) < len(down)
    bits = {"fp16": 16, "bf16": 16, "int8": 8 + 32 / 256}
    if codec in bits:  # the model's own payloads: the broadcast and every reply (a full sync is float32)
        encoded = [r for r in payload if int(r["raw_bytes"]) < 4 * int(r["values"])]
        assert encoded and all(8 * int(r["raw_bytes"]) <= bits[codec] * int(r["values"]) + 64 for r in encoded)
        assert summary["bits_per_value_up"] <= bits[codec] + 0.5
    else:  # 5% of the values in float32 (1.6 bits a value) and their indices
        assert 1.6 < summary["bits_per_value_up"] < 4


def test_topk_keeps_the_k_largest_changes_and_feeds_back_the_rest(codec_config, tmp_path):
    config = dict(
        codec_config, **{"strategy": "fedavg", "fraction-train": 1.0, "codec-up": "topk", "num-server-rounds": 3}
    )
    grid = LocalGrid(client_app, 6)
    run_inprocess(config, tmp_path, progress=False, grid=grid)
    for context in grid.contexts.values():
        residual = context.state["local-training"]["ef/weights"].numpy()
        assert residual.shape == (61706,) and np.isfinite(residual).all() and np.count_nonzero(residual) > 0
    up = [r for r in read_csv(tmp_path / "volume.csv") if r["category"] == "weights" and r["direction"] == "up"]
    k = int(np.ceil(0.05 * 61706))
    # k float32 values plus the index (at most a bitmask of n + 1 bits): far below 4 bytes a value
    assert all(4 * k < int(r["raw_bytes"]) <= 4 * k + 61707 // 8 + 1 for r in up)


def test_resume_with_codecs_matches_the_uninterrupted_run(codec_config, tmp_path):
    from tests.test_checkpoint import crashing_grid, fresh_grid

    for codec in ("int8", "topk"):
        config = dict(
            codec_config, **{"strategy": "cmd", "fraction-train": 1.0, "codec-up": codec, "codec-down": codec}
        )
        whole = run_inprocess(config, tmp_path / f"whole-{codec}", progress=False)
        with pytest.raises(RuntimeError):
            run_inprocess(config, tmp_path / f"cut-{codec}", progress=False, grid=crashing_grid(6, at_round=4))
        cut = run_inprocess(config, tmp_path / f"cut-{codec}", progress=False, grid=fresh_grid(6), resume=True)
        accuracy = lambda out: [(r["accuracy"], r["train_loss"]) for r in read_csv(out / "metrics.csv")]
        assert accuracy(tmp_path / f"cut-{codec}") == accuracy(tmp_path / f"whole-{codec}")
        assert cut["final_accuracy"] == whole["final_accuracy"]


class Tamper:
    """Replaces the weights payload of client 1's replies in rounds 2 and 3 with a bad one."""

    def __init__(self, grid: LocalGrid, how):
        self.how = how
        original = grid.client_app

        def app(message, context):
            reply = original(message, context)
            if (
                context.node_config["partition-id"] == 1
                and message.metadata.message_type == "train"
                and message.metadata.group_id in ("2", "3")
                and not reply.has_error()
            ):
                arrays = {k: v.numpy() for k, v in reply.content["weights"].items()}
                reply.content["weights"] = ArrayRecord(
                    {k: Array(np.ascontiguousarray(v)) for k, v in self.how(arrays).items()}
                )
            return reply

        grid.client_app = app


def _set(key, fn):
    return lambda arrays: {**arrays, key: fn(arrays[key])}


BAD_INT8 = {
    "scales of the wrong length": _set("scales", lambda s: s[:-1]),
    "NaN scale": _set("scales", lambda s: np.where(np.arange(s.size) == 0, np.nan, s).astype(np.float32)),
    "negative scale": _set("scales", lambda s: -s - 1),
    "float64 scales": _set("scales", lambda s: s.astype(np.float64)),
    "int16 values": _set("int8", lambda q: q.astype(np.int16)),
    "values missing": lambda arrays: {"scales": arrays["scales"]},
    "float32 instead": lambda arrays: {"values": np.zeros(arrays["int8"].size, np.float32)},
    "huge scale": _set("scales", lambda s: np.full_like(s, 3e38)),
}
BAD_TOPK = {
    "index out of range": lambda a: {
        "topk-values": a["topk-values"],
        "topk-gaps": np.full(a["topk-gaps"].size, 255, np.uint8),
    },
    "values of the wrong dtype": lambda a: {**a, "topk-values": a["topk-values"].astype(np.float16)},
    "inf value": lambda a: {**a, "topk-values": np.full_like(a["topk-values"], np.inf)},
    "one value too few": lambda a: {**a, "topk-values": a["topk-values"][:-1]},
}


@pytest.mark.parametrize("codec,how", [("int8", h) for h in BAD_INT8] + [("topk", h) for h in BAD_TOPK])
def test_bad_encoded_replies_are_rejected_with_the_model_untouched(codec_config, tmp_path, codec, how):
    config = dict(
        codec_config,
        **{"strategy": "fedavg", "fraction-train": 1.0, "num-server-rounds": 3, "codec-up": codec, "codec-down": codec},
    )
    tampered = LocalGrid(client_app, 6)
    Tamper(tampered, (BAD_INT8 | BAD_TOPK)[how])
    bad = run_inprocess(config, tmp_path / "bad", progress=False, grid=tampered)
    rejections = read_csv(tmp_path / "bad" / "rejections.csv")
    assert [(r["round"], r["client"]) for r in rejections] == [("2", "1"), ("3", "1")], how
    # The run in which client 1 never replies in rounds 2 and 3 ends with the same model.
    silent = LocalGrid(client_app, 6, fail=lambda rnd, pid, kind: kind == "train" and pid == 1 and rnd in (2, 3))
    clean = run_inprocess(config, tmp_path / "silent", progress=False, grid=silent)
    assert bad["final_accuracy"] == clean["final_accuracy"]
    assert [r["accuracy"] for r in read_csv(tmp_path / "bad" / "metrics.csv")] == [
        r["accuracy"] for r in read_csv(tmp_path / "silent" / "metrics.csv")
    ]


def test_the_accountant_refuses_an_unknown_array_record_going_down_and_books_one_coming_up(small_config, tmp_path):
    from flwr.app import Message, RecordDict

    from fedcmd.accountant import VolumeAccountant

    acc = VolumeAccountant()
    msg = Message(
        RecordDict(
            {
                "weights": ArrayRecord({"values": Array(np.zeros(10, np.float32))}),
                "extra": ArrayRecord({"values": Array(np.zeros(1000, np.float32))}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    with pytest.raises(ValueError, match="'extra'"):
        acc.record_message(1, 0, "down", msg)
    acc = VolumeAccountant()
    acc.record_message(1, 0, "up", msg)
    unread = [r for r in acc.rows if r.category == "unread"]
    assert len(unread) == 1 and unread[0].raw_bytes == 4000 and unread[0].wire_bytes > 4000


def test_codec_keys_are_checked(small_config):
    from fedcmd.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="codec-up"):
        resolve({"codec-up": "zip"})
    with pytest.raises(ConfigError, match="topk-fraction"):
        resolve({"topk-fraction": 0.0})
    from fedcmd.codecs import CODECS

    assert CODECS == ("none", "fp16", "bf16", "int8", "topk")
