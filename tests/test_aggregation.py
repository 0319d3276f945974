"""The exact, order-independent mean (fedcmd.aggregation) and what it gives a run: the same model
bit for bit whatever order the replies arrive in."""

import itertools

import numpy as np
import pytest
from helpers import read_csv

import fedcmd.server
from fedcmd.aggregation import FLOOR, HEADROOM_BITS, ExactMean, RefusedValues, segments_of
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess


def replies_of(seed, n=600):
    """A sent model with tensors of very different scales (one all zeros) and replies scattered
    around it over many binary orders: the float64 sums of these depend on the order."""
    rng = np.random.default_rng(seed)
    sent = rng.standard_normal(n).astype(np.float32)
    sent[100:300] *= 1e-4
    sent[300:400] = 0.0
    spreads = (1e-2, 1e-6, 0.5, 1e-9, 3.0, 1e-3)
    replies = [(sent + rng.standard_normal(n).astype(np.float32) * s).astype(np.float32) for s in spreads]
    replies[1][300:400] = rng.standard_normal(100).astype(np.float32) * 1e-3
    examples = [6000, 1, 17, 600, 12345, 7]
    # weight 0: 6000 * 1.0 - 1 * 6000.0 + 600 * 2^-60, whose float64 sum is 0 or 600 * 2^-60 by order
    for reply, value in zip(replies, (1.0, -6000.0, 0.0, 2.0**-60, 0.0, 0.0)):
        reply[0] = value
    return sent, [0, 100, 300, 400, n], replies, examples


def test_the_mean_is_the_same_bits_in_every_order_where_a_float64_sum_is_not():
    sent, offsets, replies, examples = replies_of(0)
    exact, naive = set(), set()
    for order in itertools.permutations(range(len(replies))):
        mean = ExactMean.over(sent, slice(None), offsets, sum(examples))
        total = np.zeros(sent.size)
        for i in order:
            mean.add(replies[i], examples[i])
            total += examples[i] * replies[i].astype(np.float64)
        exact.add(mean.mean().tobytes())
        naive.add((total / sum(examples)).astype(np.float32).tobytes())
    assert len(exact) == 1
    assert len(naive) > 1  # the test can fail: summing in arrival order would change the model
    # and it is the mean: within one float32 step of the float64 one
    got = np.frombuffer(exact.pop(), np.float32)
    reference = sum(n * r.astype(np.float64) for n, r in zip(examples, replies)) / sum(examples)
    np.testing.assert_allclose(got, reference, rtol=2**-23, atol=1e-12)


def test_a_subset_of_positions_and_per_value_segments():
    sent, offsets, replies, examples = replies_of(1)
    index = np.sort(np.random.default_rng(2).choice(sent.size, 250, replace=False))
    assert [b - a for a, b in segments_of(index, offsets, sent.size)] == [
        int(np.count_nonzero((index >= lo) & (index < hi))) for lo, hi in zip(offsets[:-1], offsets[1:])
    ]
    for each in (False, True):
        mean = ExactMean.over(sent, index, offsets, sum(examples), each=each)
        for r, n in zip(replies, examples):
            mean.add(r[index], n)
        out = sent.copy()
        mean.mean_into(out, index)
        reference = sum(n * r[index].astype(np.float64) for n, r in zip(examples, replies)) / sum(examples)
        np.testing.assert_allclose(out[index], reference, rtol=1e-6, atol=1e-12)
        untouched = np.setdiff1d(np.arange(sent.size), index)
        assert np.array_equal(out[untouched], sent[untouched])


@pytest.mark.parametrize(
    "lie, why",
    [
        (lambda v: v.__setitem__(3, np.nan), "NaN or Inf"),
        (lambda v: v.__setitem__(120, np.inf), "NaN or Inf"),
        (lambda v: v.__setitem__(10, 1e30), "beyond"),
    ],
)
def test_values_it_cannot_hold_exactly_are_refused_before_anything_is_added(lie, why):
    sent, offsets, replies, examples = replies_of(3)
    mean = ExactMean.over(sent, slice(None), offsets, 100)
    mean.add(replies[0], 10)
    before = mean.total.copy()
    bad = replies[0].copy()
    lie(bad)
    with pytest.raises(RefusedValues, match=why):
        mean.add(bad, 10)
    assert np.array_equal(mean.total, before) and mean.examples == 10
    with pytest.raises(RefusedValues, match="expected 600 float32"):
        mean.check(replies[0].astype(np.float64))


def test_the_bound_is_headroom_times_the_largest_weight_sent_and_the_floor_for_zero_tensors():
    sent = np.array([0.5, -2.0, 0.0, 0.0], np.float32)
    mean = ExactMean.over(sent, slice(None), [0, 2, 4], 10)
    ok = np.array([2.0 * 2**HEADROOM_BITS, -1.0, FLOOR * 2**HEADROOM_BITS, 0.0], np.float32)
    mean.check(ok)
    for i, value in ((0, 2.0 * 2**HEADROOM_BITS * 1.001), (2, FLOOR * 2**HEADROOM_BITS * 1.001)):
        bad = ok.copy()
        bad[i] = value
        with pytest.raises(RefusedValues):
            mean.check(bad)


class ShuffledGrid(LocalGrid):
    """Delivers each round's replies in an order drawn from `order_seed` (all computed first)."""

    def __init__(self, *args, order_seed, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(order_seed)
        self.orders = []

    def replies(self, messages):
        replies = list(super().replies(messages))
        order = self.rng.permutation(len(replies))
        self.orders.append(order.tolist())
        return [replies[i] for i in order]


def final_model(config, out, grid, monkeypatch):
    made = []
    original = fedcmd.server.make_strategy
    monkeypatch.setattr(fedcmd.server, "make_strategy", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    run_inprocess(config, out, progress=False, grid=grid)
    return made[0]


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("fedavg", {}),
        ("cmd", {"cmd-warmup": 2, "cmd-every": 1, "cmd-samples": 200}),
        ("apf", {"apf-check-every": 1}),
        ("fedavg", {"codec-up": "int8", "codec-down": "int8"}),
    ],
)
def test_replies_in_any_order_give_the_same_model_bit_for_bit(small_config, tmp_path, monkeypatch, strategy, extra):
    config = dict(small_config, strategy=strategy, **{"num-server-rounds": 4, "local-epochs": 1, **extra})
    runs = {}
    for seed in (None, 1, 2):
        grid = LocalGrid(client_app, 4) if seed is None else ShuffledGrid(client_app, 4, order_seed=seed)
        runs[seed] = (final_model(config, tmp_path / str(seed), grid, monkeypatch), tmp_path / str(seed), grid)
    orders = {tuple(map(tuple, grid.orders)) for _, _, grid in list(runs.values())[1:]}
    assert any(o != tuple(sorted(o)) for order in orders for o in order)  # the replies really came shuffled
    plain, out, _ = runs[None]
    metrics = read_csv(out / "metrics.csv")
    volume = (out / "volume.csv").read_text()
    for seed in (1, 2):
        other, other_out, _ = runs[seed]
        assert plain.weights.tobytes() == other.weights.tobytes()
        assert plain.buffers.tobytes() == other.buffers.tobytes()
        for a, b in zip(metrics, read_csv(other_out / "metrics.csv")):
            assert {k: v for k, v in a.items() if "seconds" not in k} == {
                k: v for k, v in b.items() if "seconds" not in k
            }
        assert (other_out / "volume.csv").read_text() == volume
