"""FreezingController on scripted delta sequences (see the state machine in fedcmd/apf.py).

A scalar moved by +1 then -1 has, at check 2, E = -0.0001 and A = 0.0199, so P ~ 0.005: stable.
Zero deltas afterwards scale E and A alike, so P stays ~ 0.005 and the scalar stays stable.
A scalar that never moves has A = 0 and is unstable.
"""

import io
import json
import warnings

import numpy as np
import pytest

from fedcmd.apf import FreezingController, random_freeze_probability

SETTLE = [1.0, -1.0]  # deltas that make a scalar stable at check 2


def run(controller, deltas):
    """Feed the deltas; return the active masks after each check (copies)."""
    return [controller.check(np.asarray(d, dtype=np.float32)).copy() for d in deltas]


def crafted(n, *, ema, ema_abs, period, left=None, **kwargs):
    """A controller put in a chosen state through load_state_dict."""
    controller = FreezingController(n, **kwargs)
    state = controller.state_dict()
    state.update(
        ema_delta=np.asarray(ema, np.float32),
        ema_abs_delta=np.asarray(ema_abs, np.float32),
        freezing_period=np.asarray(period, np.int32),
        frozen_periods_left=np.zeros(n, np.int32) if left is None else np.asarray(left, np.int32),
    )
    controller.load_state_dict(state)
    return controller


# -- APF ------------------------------------------------------------------------------------


def test_additive_increase_and_unfreeze_timing():
    # One scalar; tighten_at=1.0 keeps T fixed (a lone frozen scalar is 100% frozen).
    controller = FreezingController(1, tighten_at=1.0)
    periods = []
    active_after = []
    for k, d in enumerate(SETTLE + [0.0] * 14, start=1):
        if controller.check(np.array([d]))[0]:
            active_after.append(k)
        periods.append(int(controller.state_dict()["freezing_period"][0]))
    # Stable at checks 2, 4, 7, 11, 16: L = 1, 2, 3, 4, 5, each time frozen for the next L
    # periods, active for one, re-checked at the end of that one.
    assert periods == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5]
    assert active_after == [1, 3, 6, 10, 15]


def test_multiplicative_decrease_halves_and_floors():
    # Active unstable scalars (E = A > 0, so P = 1) with various L.
    before = np.array([0, 1, 2, 3, 7, 8])
    controller = crafted(6, ema=np.ones(6), ema_abs=np.ones(6), period=before, tighten_at=1.0)
    mask = controller.check(np.ones(6))
    after = controller.state_dict()
    np.testing.assert_array_equal(after["freezing_period"], [0, 0, 1, 1, 3, 4])
    # Unstable but L >= 1: still frozen for the (halved) period.
    np.testing.assert_array_equal(after["frozen_periods_left"], [0, 0, 1, 1, 3, 4])
    np.testing.assert_array_equal(mask, [True, True, False, False, False, False])


def test_instability_after_long_freeze_shrinks_period_step_by_step():
    controller = FreezingController(1, tighten_at=1.0)
    run(controller, [[d] for d in SETTLE + [0.0] * 9])
    # L = 4 since check 11: frozen during periods 12..15, active during 16.
    assert controller.state_dict()["freezing_period"][0] == 4
    active_after = []
    for k in range(12, 25):
        d = 100.0 if k in (16, 19, 21) else 0.0  # a big one-way move at each re-check
        if controller.check(np.array([d]))[0]:
            active_after.append(k)
    # Check 16: L 4 -> 2 (frozen 17, 18); check 19: L -> 1 (frozen 20); check 21: L -> 0;
    # afterwards P stays near 1 (E ~ A), so it stays active at every check.
    assert active_after == [15, 18, 20, 21, 22, 23, 24]
    assert controller.state_dict()["freezing_period"][0] == 0


def test_frozen_scalars_keep_statistics_and_ignore_their_delta():
    # Scalar 0 is frozen during period 3; scalar 1 never settles and stays active.
    a = FreezingController(2, tighten_at=1.0)
    b = FreezingController(2, tighten_at=1.0)
    for controller in (a, b):
        run(controller, [[1.0, 1.0], [-1.0, 1.0]])
    assert a.active_mask.tolist() == [False, True]
    before = a.state_dict()

    a.check(np.array([123.0, 1.0]))  # garbage in the frozen slot
    b.check(np.array([0.0, 1.0]))
    after = a.state_dict()
    for key in ("ema_delta", "ema_abs_delta", "freezing_period"):
        assert after[key][0] == before[key][0], key  # bit-for-bit, frozen
    assert after["ema_abs_delta"][1] != before["ema_abs_delta"][1]  # the active one moved
    for key in ("ema_delta", "ema_abs_delta", "freezing_period", "frozen_periods_left"):
        np.testing.assert_array_equal(after[key], b.state_dict()[key])
    assert a.active_mask.tolist() == [True, True]  # countdown ran out: active in period 4


def test_never_moved_scalar_is_unstable():
    controller = FreezingController(3, tighten_at=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 on the way
        masks = run(controller, [[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]] + [[0.0, 0.0, 0.0]] * 4)
    state = controller.state_dict()
    assert all(mask[0] and mask[2] for mask in masks)
    np.testing.assert_array_equal(state["freezing_period"][[0, 2]], [0, 0])
    np.testing.assert_array_equal(state["ema_abs_delta"][[0, 2]], [0.0, 0.0])
    assert not masks[1][1]  # while the scalar that did move got frozen


def test_threshold_halves_when_more_than_tighten_at_frozen():
    # 9 of 10 scalars settle at check 2 -> 90% frozen -> T halves.
    nine = FreezingController(10)
    run(nine, [[1.0] * 9 + [0.0], [-1.0] * 9 + [0.0]])
    assert nine.frozen_fraction == pytest.approx(0.9)
    assert nine.threshold == 0.025
    nine.check(np.zeros(10))  # the 9 come back (L = 1): nothing frozen, T stays
    assert nine.frozen_fraction == 0.0 and nine.threshold == 0.025
    nine.check(np.zeros(10))  # re-checked: P ~ 0.005 < 0.025, L = 2, frozen again
    assert nine.threshold == 0.0125
    nine.check(np.zeros(10))  # still 90% frozen after this check: halves again
    assert nine.threshold == 0.00625

    # Exactly 80% frozen is not "more than 80%".
    eight = FreezingController(10)
    run(eight, [[1.0] * 8 + [0.0] * 2, [-1.0] * 8 + [0.0] * 2])
    assert eight.frozen_fraction == pytest.approx(0.8)
    assert eight.threshold == 0.05


def test_tightened_threshold_decides_later_checks():
    # P ~ 0.005: stable against T = 0.05 but unstable once T has been halved below it.
    for threshold, expect_stable in ((0.05, True), (0.004, False)):
        controller = crafted(1, ema=[0.005], ema_abs=[1.0], period=[3], threshold=threshold, tighten_at=1.0)
        controller.check(np.zeros(1))
        assert controller.state_dict()["freezing_period"][0] == (4 if expect_stable else 1)


# -- A-APF ----------------------------------------------------------------------------------


def test_random_freeze_probability_rule():
    assert random_freeze_probability(0) == 0.0
    assert random_freeze_probability(1) == 1 / 2000
    assert random_freeze_probability(400) == 0.2
    assert random_freeze_probability(1000) == 0.5
    assert random_freeze_probability(10**6) == 0.5


@pytest.mark.parametrize("rounds_per_check", [1, 100, 400, 5000])
def test_aggressive_freezes_unstable_scalars_with_probability_min_k_over_2000(rounds_per_check):
    n = 100_000
    controller = FreezingController(n, aggressive=True, rounds_per_check=rounds_per_check)
    zeros = np.zeros(n)  # never moved: every scalar is unstable at every check
    frozen_before = 0
    for k in (1, 2):
        controller.check(zeros)
        p = min(k * rounds_per_check / 2000, 0.5)  # K = round id of check k
        candidates = n - frozen_before  # last period's frozen ones (1 period) are not re-checked
        expected = candidates * p
        tolerance = 5 * np.sqrt(candidates * p * (1 - p)) + 1
        frozen = n - int(np.count_nonzero(controller.active_mask))
        assert abs(frozen - expected) < tolerance, (k, frozen, expected)
        frozen_before = frozen
    assert controller.threshold == 0.05  # at most ~50% frozen: no tightening


def test_aggressive_only_touches_unstable_scalars():
    # Group 0: stable (P = 0.001), L = 0.  Group 1: never moved (A = 0), L = 0.
    # Group 2: unstable (P = 1) with L = 4.  3000 scalars each.
    m = 3000
    ema = np.r_[np.full(m, 0.001), np.zeros(m), np.ones(m)]
    ema_abs = np.r_[np.ones(m), np.zeros(m), np.ones(m)]
    period = np.r_[np.zeros(2 * m), np.full(m, 4)]
    kwargs = dict(ema=ema, ema_abs=ema_abs, period=period, tighten_at=1.0, rounds_per_check=1000)
    plain = crafted(3 * m, **kwargs)
    aggressive = crafted(3 * m, aggressive=True, random_freeze_periods=3, **kwargs)
    for controller in (plain, aggressive):
        controller.check(np.zeros(3 * m))
    p_state, a_state = plain.state_dict(), aggressive.state_dict()
    left = a_state["frozen_periods_left"]

    # L follows APF alone in both; stable scalars get exactly their L, never more.
    np.testing.assert_array_equal(a_state["freezing_period"], p_state["freezing_period"])
    np.testing.assert_array_equal(left[:m], 1)
    plain_left = p_state["frozen_periods_left"]
    np.testing.assert_array_equal(plain_left[m:], np.r_[np.zeros(m), np.full(m, 2)])
    # Unstable ones: floor(L/2) plus 0 or random_freeze_periods, each about half the time (p = 0.5).
    extra = left[m:] - plain_left[m:]
    assert set(np.unique(extra)) == {0, 3}
    for group in (extra[:m], extra[m:]):
        assert abs(np.mean(group == 3) - 0.5) < 5 * np.sqrt(0.25 / m)


def test_random_freeze_lasts_random_freeze_periods():
    n = 1000
    controller = FreezingController(n, aggressive=True, rounds_per_check=1000, random_freeze_periods=3)
    first = controller.check(np.zeros(n)).copy()
    chosen = ~first
    assert 0 < chosen.sum() < n
    for _ in range(2):  # frozen during periods 2, 3, 4
        assert not controller.check(np.zeros(n))[chosen].any()
    assert controller.check(np.zeros(n))[chosen].all()  # active during period 5
    np.testing.assert_array_equal(controller.state_dict()["freezing_period"], 0)


def test_aggressive_is_deterministic_by_seed():
    n, checks = 5000, 6
    rng = np.random.default_rng(42)
    deltas = rng.standard_normal((checks, n)) * np.where(np.arange(checks) % 2, -1, 1)[:, None]

    def masks(seed):
        controller = FreezingController(n, aggressive=True, seed=seed, rounds_per_check=200)
        out = []
        for d in deltas:
            out.append(controller.check(np.where(controller.active_mask, d, 0.0)).copy())
        return np.array(out)

    same_a, same_b, other = masks(7), masks(7), masks(8)
    np.testing.assert_array_equal(same_a, same_b)
    assert (same_a != other).any()


# -- input checking and checkpointing -------------------------------------------------------


@pytest.mark.parametrize(
    "delta, message",
    [
        (np.zeros(4), "shape"),
        (np.zeros((5, 1)), "shape"),
        (np.array([0.0, np.nan, 0.0, 0.0, np.nan]), "2 NaN or infinite value\\(s\\).*index 1"),
        (np.array([0.0, 0.0, 0.0, np.inf, 0.0]), "NaN or infinite"),
        (np.array([0, 0, 0, 0, 1e39]), "NaN or infinite"),  # overflows float32
        (np.array(["a"] * 5), "dtype"),
    ],
)
def test_bad_delta_is_rejected_before_any_state_changes(delta, message):
    controller = FreezingController(5)
    with pytest.raises(ValueError, match=message):
        controller.check(delta)
    assert controller.n_checks == 0
    np.testing.assert_array_equal(controller.state_dict()["ema_abs_delta"], 0.0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_params=0), "n_params"),
        (dict(alpha=1.0), "alpha"),
        (dict(threshold=0.0), "threshold"),
        (dict(tighten_at=1.5), "tighten_at"),
        (dict(rounds_per_check=0), "rounds_per_check"),
        (dict(random_freeze_periods=0), "random_freeze_periods"),
    ],
)
def test_bad_configuration_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FreezingController(**{"n_params": 3, **kwargs})


def test_mask_is_read_only():
    controller = FreezingController(3)
    with pytest.raises(ValueError):
        controller.check(np.zeros(3))[0] = False


def test_state_dict_round_trip_continues_identically():
    n = 4000
    rng = np.random.default_rng(0)
    deltas = rng.standard_normal((10, n)) * np.where(np.arange(10) % 2, -1, 1)[:, None]
    config = dict(aggressive=True, rounds_per_check=300, tighten_at=0.2)
    original = FreezingController(n, seed=5, **config)
    for d in deltas[:5]:
        original.check(np.where(original.active_mask, d, 0.0))
    saved = original.state_dict()
    assert original.frozen_fraction > 0 and original.threshold < 0.05

    # Through a plain .npz file: arrays, numbers and the RNG state as a string.
    buffer = io.BytesIO()
    np.savez(buffer, **saved)
    buffer.seek(0)
    with np.load(buffer) as archive:
        restored_state = {key: archive[key] for key in archive.files}
    restored = FreezingController(n, seed=999, **config)
    restored.load_state_dict(restored_state)
    assert restored.n_checks == 5 and restored.threshold == original.threshold
    np.testing.assert_array_equal(restored.active_mask, original.active_mask)

    for d in deltas[5:]:
        mask_a = original.check(np.where(original.active_mask, d, 0.0))
        mask_b = restored.check(np.where(restored.active_mask, d, 0.0))
        np.testing.assert_array_equal(mask_a, mask_b)
        assert original.threshold == restored.threshold
    final_a, final_b = original.state_dict(), restored.state_dict()
    for key in final_a:
        np.testing.assert_array_equal(final_a[key], final_b[key])
    # The saved copy did not move with the controller.
    assert saved["n_checks"] == 5
    assert json.loads(saved["rng_state"]) != json.loads(final_a["rng_state"])


def test_load_state_dict_rejects_mismatched_state():
    state = FreezingController(4).state_dict()
    with pytest.raises(ValueError, match="ema_delta"):
        FreezingController(5).load_state_dict(state)
    del state["rng_state"]
    with pytest.raises(ValueError, match="rng_state"):
        FreezingController(4).load_state_dict(state)
