"""The compiled loops (fedcmd.kernels) give the bits of the numpy expressions they replaced."""

import numpy as np
import pytest

from fedcmd import kernels
from fedcmd.aggregation import Free


def scattered(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frozen mask, references (never frozen, ascending, the first and last weights among them)
    and the free positions as an index."""
    rng = np.random.default_rng(seed)
    frozen = rng.random(n) < share
    refs = np.unique(np.concatenate([[0, n - 1], rng.choice(n, 5, replace=False)])).astype(np.int64)
    frozen[refs] = False
    free = np.setdiff1d(np.flatnonzero(~frozen), refs)
    return frozen, refs, free


@pytest.mark.parametrize("share", [0.0, 0.3, 0.97, 1.0])
def test_free_walks_match_an_index(share):
    n = 5_000
    frozen, refs, free = scattered(n, share, seed=1)
    frozen[refs] = False
    bounds = np.array([0, 7, 2_000, 2_001, n])
    np.testing.assert_array_equal(Free(frozen, refs).counts(bounds), np.diff(np.searchsorted(free, bounds)))
    assert Free(frozen, refs).size == free.size
    source = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    for length in (1 << 20, 700, 1):  # one part, several, one weight each (every edge a part's)
        out = np.full(free.size + 1, np.nan, np.float32)
        kernels.gather_free(out, source, frozen, refs, *Free(frozen, refs).parts(length))
        np.testing.assert_array_equal(out[: free.size], source[free])


def test_threaded_add_is_numpys_rounded_add_and_a_refusal_leaves_the_total_as_it_was():
    rng = np.random.default_rng(5)
    n = 3_000
    values = (rng.standard_normal(n) * 3).astype(np.float32)
    bounds = np.array([0, 5, 1_000, 1_001, n], dtype=np.int64)
    factors = np.array([2.0**20, 3 * 2.0**18, 2.0**30, 7 * 2.0**16])
    limits = np.full(4, 100.0)
    start = np.rint(rng.standard_normal(n) * 2.0**30)
    expected = start.copy()
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        expected[lo:hi] += np.rint(values[lo:hi].astype(np.float64) * factors[s])
    for part in (1 << 18, 333, 1):  # one part, several (edges inside segments and on them), one each
        total = start.copy()
        assert kernels.add_rounded(total, values, bounds, factors, limits, part) == -1
        np.testing.assert_array_equal(total, expected)
        bad = values.copy()
        bad[[2_500, 1_200, 700]] = [np.nan, 1e6, np.inf]  # refused in different parts: the first is 700
        total = start.copy()
        assert kernels.add_rounded(total, bad, bounds, factors, limits, part) == 700
        np.testing.assert_array_equal(total, start)


def test_mean_kernels_round_like_numpy():
    rng = np.random.default_rng(3)
    n = 4_000
    frozen, refs, free = scattered(n, 0.4, seed=4)
    total = np.rint(rng.standard_normal(free.size) * 2.0**40)
    bounds = np.array([0, 100, free.size])
    grids = np.array([2.0**-50, 2.0**-44])
    expected = np.empty(free.size, np.float32)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        t = total[lo:hi] * grids[s]
        t /= 7
        expected[lo:hi] = t
    theta = rng.standard_normal(n).astype(np.float32)
    want = theta.copy()
    want[free] = expected
    for length in (1 << 20, 333, 1):
        out = theta.copy()
        kernels.scatter_free(out, expected, frozen, refs, *Free(frozen, refs).parts(length))
        np.testing.assert_array_equal(out, want)  # frozen weights and references untouched
    flat = np.zeros(free.size + 3, np.float32)
    kernels.mean_contiguous(flat, 3, total, bounds, grids, 7.0)
    np.testing.assert_array_equal(flat[3:], expected)
    scatter = np.zeros(n, np.float32)
    kernels.mean_indexed(scatter, free, total, bounds, grids, 7.0)
    np.testing.assert_array_equal(scatter[free], expected)


def test_online_update_and_rebuild_match_numpy():
    rng = np.random.default_rng(5)
    n, m = 3_000, 4
    frozen, _, _ = scattered(n, 0.5, seed=6)
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    modes = rng.integers(0, m, n).astype(np.uint8)
    theta = rng.standard_normal(n).astype(np.float32)
    old_mean, keep, gain, new_mean = (rng.standard_normal(m) for _ in range(4))
    inv_n = 1.0 / 9
    c = a * old_mean[modes] + b
    e = theta.astype(np.float64) - c
    c += e * inv_n
    new_a = a * keep[modes] + e * gain[modes]
    new_b = c - new_a * new_mean[modes]
    want_a, want_b = np.where(frozen, a, new_a), np.where(frozen, b, new_b)
    references = rng.standard_normal(m).astype(np.float32)
    v = a.astype(np.float32)
    v *= references[modes]
    v += b.astype(np.float32)
    want = np.where(frozen, v, theta)
    fused = theta.copy()
    a2, b2 = a.copy(), b.copy()
    kernels.online_update(a, b, theta, modes, frozen, old_mean, keep, gain, new_mean, inv_n, np.zeros(0, np.float32))
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)
    # the update with the rebuild in the same pass: the same coefficients, and theta rebuilt
    kernels.online_update(a2, b2, fused, modes, frozen, old_mean, keep, gain, new_mean, inv_n, references)
    np.testing.assert_array_equal(a2, want_a)
    np.testing.assert_array_equal(b2, want_b)
    np.testing.assert_array_equal(fused, want)
    kernels.rebuild(theta, a, b, modes, frozen, references)
    np.testing.assert_array_equal(theta, want)
    some = np.flatnonzero(frozen)[::3]
    partial = np.zeros(n, np.float32)
    kernels.rebuild_at(partial, some, a, b, modes, references)
    np.testing.assert_array_equal(partial[some], want[some])


@pytest.mark.parametrize("count", [1, 2, 500, 1_499, 1_500])
def test_selection_takes_the_smallest_changes_ties_by_index(count):
    rng = np.random.default_rng(7)
    n = 2_000
    frozen, refs, free = scattered(n, 0.2, seed=8)
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    a_old, b_old = a.astype(np.float32), b.astype(np.float32)
    moved = rng.random(n) < 0.5  # the others did not move: many exact ties (change 0 up to rounding)
    a[moved] += rng.standard_normal(moved.sum()) * 1e-3
    a_old[~moved], b_old[~moved] = 1.0, 2.0
    a[~moved], b[~moved] = 1.0, 2.0
    change = np.full(free.size + 1, -1.0)
    assert kernels.coefficient_change(change, a, b, a_old, b_old, frozen, refs) == free.size
    change = change[: free.size]
    np.testing.assert_array_equal(change, (a[free] - a_old[free]) ** 2 + (b[free] - b_old[free]) ** 2)
    count = min(count, free.size)
    threshold, ties = kernels.kth_smallest(change, count)
    assert threshold == np.sort(change)[count - 1] and ties == count - np.count_nonzero(change < threshold)
    chosen = np.empty(count + 1, np.int64)
    assert kernels.select_free(chosen, change, threshold, ties, frozen, refs) == count
    order = np.lexsort((free, change))  # by change, then by position
    np.testing.assert_array_equal(chosen[:count], np.sort(free[order[:count]]))


def test_finite():
    values = np.ones(10, np.float32)
    assert kernels.finite(values)
    for bad in (np.nan, np.inf, -np.inf):
        values[7] = bad
        assert not kernels.finite(values)


def test_exact_mean_over_free_positions_is_the_mean_over_their_index():
    from fedcmd.aggregation import ExactMean, RefusedValues

    rng = np.random.default_rng(9)
    n = 20_000
    frozen, refs, free = scattered(n, 0.45, seed=10)
    model = rng.standard_normal(n).astype(np.float32)
    offsets = [0, 3_000, 3_010, 12_000]
    by_index = ExactMean.over(model, free, offsets, 40)
    by_walk = ExactMean.over(model, Free(frozen, refs), offsets, 40)
    assert by_walk.segments == by_index.segments
    np.testing.assert_array_equal(by_walk.grids, by_index.grids)
    replies = [model[free] + rng.standard_normal(free.size).astype(np.float32) * 0.01 for _ in range(4)]
    for k, values in enumerate(replies):
        by_index.add(values, k + 1)
        by_walk.add(values, k + 1)
    bad = replies[0].copy()
    bad[free.size // 2] = np.inf
    before = by_walk.total.copy()
    with pytest.raises(RefusedValues, match="NaN or Inf"):
        by_walk.add(bad, 3)  # refused half-way: the half added is taken out again, exactly
    np.testing.assert_array_equal(by_walk.total, before)
    one, two = model.copy(), model.copy()
    by_index.mean_into(one, free)
    by_walk.mean_into(two, Free(frozen, refs))
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(two[~np.isin(np.arange(n), free)], model[~np.isin(np.arange(n), free)])


def test_event_records_kernels():
    rng = np.random.default_rng(11)
    n = 3_001
    event_of = rng.integers(0, 4, n).astype(np.uint8)
    for version in (0, 2, 3):
        members = np.flatnonzero(event_of > version)
        np.testing.assert_array_equal(kernels.members_after(event_of, version, members.size), members)
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    modes = rng.integers(0, 7, n).astype(np.uint8)
    index = np.flatnonzero(event_of == 2)
    a32, b32, m = np.empty(index.size, np.float32), np.empty(index.size, np.float32), np.empty(index.size, np.uint8)
    kernels.take_coefficients(index, a, b, modes, a32, b32, m)
    np.testing.assert_array_equal(a32, a[index].astype(np.float32))
    np.testing.assert_array_equal(b32, b[index].astype(np.float32))
    np.testing.assert_array_equal(m, modes[index])
    packed = np.zeros((n + 7) // 8, np.uint8)
    kernels.pack_positions(index, packed)
    np.testing.assert_array_equal(packed, np.packbits(event_of == 2))
