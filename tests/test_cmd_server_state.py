"""The CMD server's state: at most 32 bytes per weight after warm-up and embedding events, counted as
experiments/benchmarks/cmd_server_state.py counts it (`benchtools.held_arrays`), and the compact
event log gives the events and rebuilt weights the protocol defines."""

from pathlib import Path

import numpy as np
import pytest

import fedcmd.task
from fedcmd.config import resolve
from fedcmd.flat import ParamLayout
from fedcmd.protocols.cmd import rebuild_embedded
from strategies.cmd import CMD, event_dtype

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
N = 200_000
EVENTS = 4


@pytest.fixture
def driven(monkeypatch):
    """A CMD strategy over N weights in 8 tensors, driven by the benchmark through its warm-up and
    EVENTS embedding events with generated replies; with the benchmark's result."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cmd_server_state

    sizes = np.diff(np.linspace(0, N, 9).astype(np.int64))
    weights = ParamLayout(tuple(f"t{k}" for k in range(8)), tuple((int(s),) for s in sizes), np.r_[0, np.cumsum(sizes)])
    no_buffers = ParamLayout((), (), np.zeros(1, dtype=np.int64), "buffers")
    monkeypatch.setattr(fedcmd.task, "layouts", lambda config: (weights, no_buffers))
    config = resolve(
        {
            "strategy": "cmd",
            "model": "mlp",
            "dataset": "synthetic",
            "num-clients": 3,
            "fraction-train": 1.0,
            "num-server-rounds": 3 + EVENTS,
            "cmd-warmup": 3,
            "cmd-every": 1,
            "cmd-fraction": 0.15,
            "cmd-of-remaining": True,
            "cmd-modes": 10,
            "cmd-samples": 500,
        }
    )
    initial = np.random.default_rng(0).normal(0.0, 0.05, N).astype(np.float32)
    strategy = CMD(initial, np.zeros(0, dtype=np.float32), config)
    return strategy, cmd_server_state.drive(strategy, EVENTS, progress=False)


def test_the_strategy_holds_at_most_32_bytes_per_weight_after_the_fit_and_after_events(driven):
    strategy, result = driven
    snapshots = result["snapshots"]
    assert [s["label"] for s in snapshots] == ["after the fit", *(f"after event {k}" for k in range(1, EVENTS + 1))]
    assert snapshots[-1]["embedded_fraction"] == pytest.approx(1 - 0.85**EVENTS, abs=0.01)
    for s in snapshots:
        held = {row["path"]: row for row in s["arrays"]}
        assert s["bytes_per_weight"] <= 32, held
        # the global model, the online statistics, the schedule's baseline and the event numbers
        assert s["bytes_per_weight"] == pytest.approx(31.0, abs=0.05)
        assert held["strategy.event_of"]["dtype"] == "uint8" and held["strategy.online._modes"]["dtype"] == "uint8"
        # nothing per weight is kept as an index between rounds
        assert not [row["path"] for row in s["arrays"] if row["dtype"] == "int64" and row["bytes"] >= N]


def test_the_compact_log_gives_the_events_and_the_rebuilt_weights(driven):
    strategy, _ = driven
    online = strategy.online
    events = strategy.events_since(0)
    assert len(events) == strategy.version == EVENTS and strategy.events_since(EVENTS) == []
    seen = np.zeros(N, dtype=bool)
    for k, event in enumerate(events):
        assert event.index.dtype == np.int64 and np.all(np.diff(event.index) > 0) and not seen[event.index].any()
        seen[event.index] = True
        np.testing.assert_array_equal(event.a, online.a[event.index].astype(np.float32))
        np.testing.assert_array_equal(event.b, online.b[event.index].astype(np.float32))
        np.testing.assert_array_equal(event.mode, online.modes[event.index])
        assert event.index.size == strategy.event_sizes[k]
        later = strategy.events_since(k)
        assert len(later) == EVENTS - k and all(np.array_equal(x.index, y.index) for x, y in zip(later, events[k:]))
    np.testing.assert_array_equal(seen, strategy.embedded)
    np.testing.assert_array_equal(np.flatnonzero(seen), strategy.embedded_index)
    free = ~seen
    free[strategy.reference_index] = False
    np.testing.assert_array_equal(np.flatnonzero(free), strategy.free_index)
    # the server's chunked rebuild is the clients' rebuild from the events, bit for bit
    theta = np.random.default_rng(1).normal(size=N).astype(np.float32)
    expected = theta.copy()
    index = np.concatenate([e.index for e in events])
    order = np.argsort(index)
    a, b, mode = (np.concatenate([getattr(e, key) for e in events])[order] for key in ("a", "b", "mode"))
    rebuild_embedded(expected, index[order], a, b, mode, strategy.reference_index)
    strategy.rebuild_embedded(theta)
    np.testing.assert_array_equal(theta, expected)
    assert [event_dtype(k) for k in (0, 255, 256, 65535, 65536)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
    ]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.95])
def test_the_compiled_rebuild_is_the_clients_rebuild_bit_for_bit(fraction):
    import types

    rng = np.random.default_rng(2)
    n, references = 50_000, np.array([3, 17_000, 49_999])
    density = np.repeat(rng.uniform(0.0, 2 * fraction, 50), 1000).clip(0, 1)  # chunks of varied density
    embedded = rng.random(n) < density
    embedded[references] = False
    online = types.SimpleNamespace(
        a=rng.normal(0.0, 3.0, n), b=rng.normal(0.0, 0.1, n), modes=rng.integers(0, 3, n).astype(np.uint8)
    )
    online.frozen_mask = embedded
    server = types.SimpleNamespace(version=1, reference_index=references, online=online)
    theta = rng.normal(size=n).astype(np.float32)
    expected = theta.copy()
    index = np.flatnonzero(embedded)
    a, b = online.a[index].astype(np.float32), online.b[index].astype(np.float32)
    rebuild_embedded(expected, index, a, b, online.modes[index], references)
    CMD.rebuild_embedded(server, theta)
    np.testing.assert_array_equal(theta, expected)
