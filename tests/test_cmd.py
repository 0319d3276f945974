"""CMD core: post-hoc fit, online statistics, embedding schedule, centralised callback."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedcmd.centralised import CMDCallback, train_with_callbacks
from fedcmd.cmd import EmbeddingSchedule, OnlineCMD, fit_cmd, sample_indices

# ------------------------------------------------------------------------------------- helpers


def profiles(n_modes: int, n_snapshots: int, rng: np.random.Generator) -> np.ndarray:
    """Training-like time profiles: a decay, an oscillation and a random walk, standardised."""
    t = np.linspace(0.0, 1.0, n_snapshots)
    rows = []
    for _ in range(n_modes):
        p = (
            rng.normal() * np.exp(-t / rng.uniform(0.05, 1.0))
            + 0.5 * rng.normal() * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t + rng.uniform(0, 6))
            + 0.3 * np.cumsum(rng.normal(size=n_snapshots)) / np.sqrt(n_snapshots)
        )
        rows.append((p - p.mean()) / p.std())
    return np.array(rows)


def plant(n_params, n_modes, n_snapshots, noise, seed, barely_moving=False):
    """Affine copies of n_modes profiles plus white noise: float32 N x T, true modes, a, b.

    barely_moving: a_i ~ N(0, 1), so a few percent of the weights have |a_i| below the noise and
    are mostly noise, as in real networks; otherwise |a_i| is in [0.5, 2].
    """
    rng = np.random.default_rng(seed)
    prof = profiles(n_modes, n_snapshots, rng)
    modes = rng.integers(0, n_modes, n_params)
    if barely_moving:
        a = rng.normal(size=n_params)
    else:
        a = rng.choice([-1.0, 1.0], n_params) * rng.uniform(0.5, 2.0, n_params)
    b = rng.normal(size=n_params)
    w = a[:, None] * prof[modes] + b[:, None] + noise * rng.normal(size=(n_params, n_snapshots))
    return w.astype(np.float32), modes, a, b


def agreement(true_modes, found_modes):
    """Fraction of weights whose mode matches, under the best one-to-one relabelling."""
    table = np.zeros((true_modes.max() + 1, found_modes.max() + 1))
    np.add.at(table, (true_modes, found_modes), 1)
    rows, cols = linear_sum_assignment(-table)
    return table[rows, cols].sum() / true_modes.size


def batch_refit(w, reference_index, modes):
    """Least-squares (a, b) of every row against its mode's reference row, float64, all columns."""
    w = w.astype(np.float64)
    r = w[reference_index][modes]
    rc, wc = r - r.mean(axis=1, keepdims=True), w - w.mean(axis=1, keepdims=True)
    var = (rc * rc).sum(axis=1)
    a = np.divide((rc * wc).sum(axis=1), var, out=np.zeros_like(var), where=var > 0)
    return a, w.mean(axis=1) - a * r.mean(axis=1)


def relative_error(x, y):
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300))


# ------------------------------------------------------------------------------------ post-hoc


def test_planted_modes_and_reconstruction_at_noise_level():
    noise = 0.05
    w, true_modes, _, _ = plant(4000, 6, 15, noise, seed=1)
    model = fit_cmd(w, 6, n_samples=600, seed=0)
    assert model.modes.dtype == np.int64 and model.reference_index.dtype == np.int64
    assert model.a.dtype == np.float64 and model.b.dtype == np.float64
    assert model.n_modes == 6
    assert agreement(true_modes, model.modes) >= 0.99
    reconstruction = model.reconstruct(w[model.reference_index])
    assert reconstruction.dtype == np.float32 and reconstruction.shape == w.shape
    rmse = float(np.sqrt(np.mean((reconstruction - w) ** 2)))
    assert rmse <= 1.2 * noise  # the references carry noise too; nothing beyond that is lost
    # a, b are the least-squares fit against the reference
    a, b = batch_refit(w, model.reference_index, model.modes)
    assert relative_error(model.a, a) < 1e-9 and relative_error(model.b, b) < 1e-9
    np.testing.assert_array_equal(model.modes[model.reference_index], np.arange(6))
    np.testing.assert_array_equal(model.a[model.reference_index], 1.0)
    # one snapshot reconstructs to one vector
    np.testing.assert_allclose(model.reconstruct(w[model.reference_index, 3]), reconstruction[:, 3], rtol=1e-6)


def test_weights_that_barely_move_do_not_take_a_mode():
    # a_i ~ N(0, 1): ~4% of the weights move less than the noise. The authors' rule (complete
    # linkage on rows of |corr|) lets those form clusters and merges real modes; PAM does not.
    w, true_modes, _, _ = plant(10000, 10, 21, 0.05, seed=0, barely_moving=True)
    robust = agreement(true_modes, fit_cmd(w, 10, seed=0).modes)
    authors = agreement(true_modes, fit_cmd(w, 10, seed=0, clustering="hierarchical").modes)
    assert robust >= 0.95
    assert authors < 0.85


def test_constant_trajectories():
    w, _, _, _ = plant(500, 3, 10, 0.01, seed=2)
    w[:40] = np.float32(0.123456)  # constant: corr 0 with everything
    w[40:50] = np.arange(10, 20, dtype=np.float32)[:, None]
    model = fit_cmd(w, 3, n_samples=200, seed=0)
    assert not np.isin(model.reference_index, np.arange(50)).any()  # a constant weight explains nothing
    np.testing.assert_array_equal(model.a[:50], 0.0)
    np.testing.assert_array_equal(model.b[:50], w[:50, 0].astype(np.float64))
    np.testing.assert_array_equal(model.reconstruct(w[model.reference_index])[:50], w[:50])
    # every trajectory constant: one mode, a = 0, b = the value, no NaN
    flat = np.repeat(np.arange(20, dtype=np.float32)[:, None], 5, axis=1)
    for clustering in ("pam", "hierarchical"):
        model = fit_cmd(flat, 4, clustering=clustering)
        assert np.isfinite(model.a).all() and np.isfinite(model.b).all()
        np.testing.assert_array_equal(model.a, np.where(np.isin(np.arange(20), model.reference_index), 1.0, 0.0))
        np.testing.assert_array_equal(model.reconstruct(flat[model.reference_index]), flat)


def test_fewer_distinct_trajectories_than_modes():
    rng = np.random.default_rng(3)
    prof = profiles(2, 8, rng)
    modes = rng.integers(0, 2, 300)
    w = (rng.uniform(0.5, 2.0, 300)[:, None] * prof[modes] + rng.normal(size=(300, 1))).astype(np.float32)
    model = fit_cmd(w, 5, n_samples=100)
    assert model.n_modes == 2  # PAM stops when nothing more can be explained
    assert agreement(modes, model.modes) == 1.0
    for linkage, features in (("complete", "rows"), ("average", "correlation")):
        model = fit_cmd(w, 5, n_samples=100, clustering="hierarchical", linkage=linkage, features=features)
        assert np.isfinite(model.a).all() and np.isfinite(model.b).all()
        assert set(np.unique(model.modes)) == set(range(model.n_modes))  # no empty mode


def test_single_mode_and_fewer_weights_than_samples():
    w, _, _, _ = plant(30, 3, 6, 0.1, seed=4)
    model = fit_cmd(w, 1)
    np.testing.assert_array_equal(model.sample_index, np.arange(30))
    assert model.n_modes == 1 and not model.modes.any()
    a, b = batch_refit(w, model.reference_index, model.modes)
    assert relative_error(model.a, a) < 1e-9 and relative_error(model.b, b) < 1e-9


def test_distance_threshold_rule():
    w, true_modes, _, _ = plant(2000, 4, 12, 0.02, seed=5)
    # unexplained variance fraction: ~0.001 with the 4 true references, profiles correlate up to 0.93
    model = fit_cmd(w, None, n_samples=400, distance_threshold=0.01)
    assert model.n_modes == 4 and agreement(true_modes, model.modes) >= 0.99
    assert fit_cmd(w, None, n_samples=400, distance_threshold=0.9).n_modes == 1
    # cophenetic distance 1 - |corr|: ~0.001 within a mode, >= 0.07 between modes
    tree = fit_cmd(
        w,
        None,
        n_samples=400,
        distance_threshold=0.03,
        clustering="hierarchical",
        linkage="average",
        features="correlation",
    )
    assert tree.n_modes == 4 and agreement(true_modes, tree.modes) >= 0.99


def test_chunked_assignment_and_torch_input_give_the_same_model():
    w, _, _, _ = plant(1000, 4, 9, 0.05, seed=6)
    whole = fit_cmd(w, 4, n_samples=300)
    for other in (
        fit_cmd(w, 4, n_samples=300, chunk_size=7),
        fit_cmd(torch.from_numpy(w), 4, n_samples=300),
        fit_cmd(np.asfortranarray(w), 4, n_samples=300),
    ):
        np.testing.assert_array_equal(other.modes, whole.modes)
        np.testing.assert_array_equal(other.reference_index, whole.reference_index)
        np.testing.assert_allclose(other.a, whole.a, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(other.b, whole.b, rtol=1e-12, atol=1e-15)


def test_sampling_represents_every_tensor_with_int64_indices_beyond_2_24():
    sizes = np.array([2**40, 5, 3, 2**25, 7], dtype=np.int64)
    n = int(sizes.sum())
    idx = sample_indices(n, 1000, seed=0, tensor_sizes=sizes)
    assert idx.dtype == np.int64 and idx.size == 1000 and np.unique(idx).size == 1000
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    per_tensor = np.histogram(idx, bins=offsets)[0]
    np.testing.assert_array_equal(per_tensor[[1, 2, 4]], [5, 3, 7])  # small tensors fully represented
    small = idx[(idx >= offsets[1]) & (idx < offsets[3])]
    np.testing.assert_array_equal(small, 2**40 + np.arange(8))  # exact: float32 would merge them
    np.testing.assert_array_equal(sample_indices(n, 1000, 0, sizes), idx)
    assert not np.array_equal(sample_indices(n, 1000, 1, sizes), idx)
    # K/2 below the number of tensors: uniform over all weights
    uniform = sample_indices(10**6, 4, seed=0, tensor_sizes=np.full(10, 10**5))
    assert uniform.size == 4 and uniform.dtype == np.int64


def test_non_finite_input_is_named():
    w, _, _, _ = plant(300, 2, 6, 0.1, seed=7)
    for row, value, word in ((12, np.nan, "nan"), (250, np.inf, "inf")):
        bad = w.copy()
        bad[row, 3] = value
        with pytest.raises(ValueError, match=rf"trajectories\[{row}, 3\] is {word}"):
            fit_cmd(bad, 2, n_samples=300 if row == 12 else 10)  # sampled row, then one met in assignment
    online = OnlineCMD(300, 2, 2)
    theta = w[:, 0].copy()
    theta[5] = -np.inf
    with pytest.raises(ValueError, match=r"theta\[5\] is -inf"):
        online.observe(theta)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_modes=0), "n_modes must be an integer >= 1"),
        (dict(n_modes=2, distance_threshold=0.1), "exactly one of n_modes and distance_threshold"),
        (dict(n_modes=None), "exactly one of n_modes and distance_threshold"),
        (dict(n_modes=2, clustering="kmeans"), "clustering must be one of"),
        (dict(n_modes=2, linkage="average"), "linkage and features apply to clustering='hierarchical'"),
        (dict(n_modes=2, clustering="hierarchical", features="cosine"), "features must be one of"),
        (dict(n_modes=None, distance_threshold=1.0), r"distance_threshold must be in \[0, 1.0\)"),
        (dict(n_modes=2, n_samples=0), "n_samples must be an integer >= 1"),
        (dict(n_modes=2, tensor_sizes=[10, 10]), "tensor_sizes sum to 20, but there are 50 weights"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    w, _, _, _ = plant(50, 2, 5, 0.1, seed=8)
    with pytest.raises(ValueError, match=message):
        fit_cmd(w, **kwargs)


def test_bad_trajectory_shapes():
    with pytest.raises(ValueError, match="T >= 2 snapshots"):
        fit_cmd(np.zeros((10, 1)), 1)
    with pytest.raises(ValueError, match="real numbers"):
        fit_cmd(np.zeros((10, 3), dtype=complex), 1)


# -------------------------------------------------------------------------------------- online


def stream(online, w, start, stop):
    for t in range(start, stop):
        online.observe(w[:, t])


def test_online_statistics_equal_a_batch_refit_after_every_snapshot():
    w, _, _, _ = plant(3000, 5, 25, 0.05, seed=9)
    w[:100] = w[:100] * np.float32(1e-3) + np.float32(50.0)  # tiny motion on a large offset
    warmup = 6
    online = OnlineCMD(3000, 5, warmup, n_samples=500, chunk_size=333)
    stream(online, w, 0, warmup)
    assert not online.ready
    with pytest.raises(RuntimeError, match="available after warm-up: 7 snapshots are needed, 6 observed"):
        online.a  # noqa: B018 (the property access is what raises)
    for t in range(warmup, 25):
        online.observe(w[:, t])
        a, b = batch_refit(w[:, : t + 1], online.reference_index, online.modes)
        assert relative_error(online.a, a) <= 1e-6 and relative_error(online.b, b) <= 1e-6
    # the warm-up fit is the post-hoc fit of snapshots 0..F
    post_hoc = fit_cmd(w[:, : warmup + 1], 5, n_samples=500)
    np.testing.assert_array_equal(online.modes, post_hoc.modes)
    np.testing.assert_array_equal(online.reference_index, post_hoc.reference_index)
    # the weights riding on a large offset keep their precision
    a, b = batch_refit(w, online.reference_index, online.modes)
    assert relative_error(online.a[:100], a[:100]) <= 1e-6


def test_online_state_is_compact_and_holds_no_trajectory():
    online = OnlineCMD(20000, 10, 3, n_samples=300)
    w, _, _, _ = plant(20000, 10, 5, 0.05, seed=10)
    stream(online, w, 0, 3)
    assert online.nbytes == (3 + 1) * 20000 * 4  # the float32 warm-up buffer of F + 1 rows
    stream(online, w, 3, 5)
    assert online.state_dict()["buffer"].size == 0
    assert online.nbytes / 20000 <= 32
    assert online.nbytes / 20000 == pytest.approx(18.0, abs=0.1)  # a, b float64, mode uint8, frozen flag


@pytest.mark.parametrize("warmup", [1, 3, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_in_place_of_the_snapshots_is_the_post_hoc_fit(warmup, dtype):
    # The fit writes (a, b) over the snapshot rows it has read: rows narrower than 16 bytes are padded
    # (warmup 1), wider ones shrunk after (warmup 6); small chunks overwrite rows other chunks read.
    w, _, _, _ = plant(2000, 4, warmup + 1, 0.05, seed=12)
    w = w.astype(dtype)
    online = OnlineCMD(2000, 4, warmup, n_samples=300, chunk_size=7)
    stream(online, w, 0, warmup + 1)
    post_hoc = fit_cmd(w, 4, n_samples=300, chunk_size=7)
    np.testing.assert_array_equal(online.reference_index, post_hoc.reference_index)
    np.testing.assert_array_equal(online.modes, post_hoc.modes)
    np.testing.assert_array_equal(online.a, post_hoc.a)
    np.testing.assert_array_equal(online.b, post_hoc.b)
    assert online.nbytes == 2000 * 18 + 3 * online.n_modes * 8  # pairs 16, mode 1, frozen 1; per mode 3 x 8
    # A block that cannot shrink in place (another reference holds it) is copied: the same fit.
    held = OnlineCMD(2000, 4, warmup, n_samples=300, chunk_size=7)
    stream(held, w, 0, warmup)
    _other_reference = held._block
    stream(held, w, warmup, warmup + 1)
    np.testing.assert_array_equal(held.a, online.a)
    np.testing.assert_array_equal(held.b, online.b)
    assert held.nbytes == online.nbytes


@pytest.mark.parametrize("warmup", [3, 6])
def test_the_fit_does_not_hold_the_snapshots_and_the_coefficients_side_by_side(warmup):
    import tracemalloc

    n = 400_000
    rng = np.random.default_rng(13)
    online = OnlineCMD(n, 4, warmup, n_samples=200)
    snapshots = [rng.standard_normal(n, dtype=np.float32) for _ in range(warmup + 1)]
    tracemalloc.start()  # before the snapshots' block is allocated: its shrink is a realloc of a traced block
    try:
        for theta in snapshots[:-1]:
            online.observe(theta)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        online.observe(snapshots[-1])  # the fit
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The modes (1 byte per weight) and chunks; (a, b) alone would be 16 bytes per weight.
    assert peak - before <= 2 * n + (4 << 20)
    assert online.nbytes == 18 * n + 3 * online.n_modes * 8
    assert after - before <= (18 - 4 * (warmup + 1)) * n + (1 << 20)  # the snapshot block shrunk to the pairs


def test_model_weights():
    w, _, _, _ = plant(1000, 3, 8, 0.05, seed=11)
    online = OnlineCMD(1000, 3, 4, n_samples=200)
    stream(online, w, 0, 8)
    theta = w[:, 7]
    expected = online.a * theta[online.reference_index][online.modes] + online.b
    modelled = online.model_weights(theta)
    assert modelled.dtype == np.float32
    np.testing.assert_allclose(modelled, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(modelled[online.reference_index], theta[online.reference_index])
    index = np.array([5, 999, 0], dtype=np.int64)
    np.testing.assert_array_equal(online.model_weights(theta, index), modelled[index])


def test_frozen_coefficients_stay_while_the_rest_follow():
    w, _, _, _ = plant(1500, 4, 16, 0.05, seed=12)
    online = OnlineCMD(1500, 4, 4, n_samples=300)
    stream(online, w, 0, 8)
    frozen = np.setdiff1d(np.arange(0, 1500, 3), online.reference_index)
    a_frozen, b_frozen = online.a[frozen].copy(), online.b[frozen].copy()
    online.freeze(frozen)
    stream(online, w, 8, 16)
    np.testing.assert_array_equal(online.a[frozen], a_frozen)
    np.testing.assert_array_equal(online.b[frozen], b_frozen)
    free = np.setdiff1d(np.arange(1500), frozen)
    a, b = batch_refit(w, online.reference_index, online.modes)
    assert relative_error(online.a[free], a[free]) <= 1e-6 and relative_error(online.b[free], b[free]) <= 1e-6
    with pytest.raises(ValueError, match="references are never embedded"):
        online.freeze(online.reference_index[:1])
    with pytest.raises(ValueError, match=r"index must lie in \[0, 1500\)"):
        online.freeze(np.array([1500]))
    with pytest.raises(ValueError, match="read-only"):
        online.a[0] = 3.0


def test_online_state_dict_round_trip_in_and_after_warm_up():
    w, _, _, _ = plant(800, 3, 14, 0.05, seed=13)
    reference = OnlineCMD(800, 3, 5, n_samples=200)
    stream(reference, w, 0, 14)
    for cut in (3, 9):
        first = OnlineCMD(800, 3, 5, n_samples=200)
        stream(first, w, 0, cut)
        if first.ready:
            first.freeze(np.setdiff1d(np.arange(10), first.reference_index))
        second = OnlineCMD(800, 3, 5, n_samples=200)
        second.load_state_dict(first.state_dict())
        stream(first, w, cut, 14)
        stream(second, w, cut, 14)
        for key, value in first.state_dict().items():
            np.testing.assert_array_equal(second.state_dict()[key], value)
        if cut == 3:
            np.testing.assert_array_equal(second.a, reference.a)
    with pytest.raises(ValueError, match="n_params is 800, this OnlineCMD has 801"):
        OnlineCMD(801, 3, 5).load_state_dict(reference.state_dict())
    with pytest.raises(ValueError, match=r"state\['a'\] has shape"):
        OnlineCMD(800, 3, 5).load_state_dict({**reference.state_dict(), "a": np.zeros(3)})


# ----------------------------------------------------------------------------------- embedding


def test_embedding_schedule_embeds_the_most_stable_weights_every_l_snapshots():
    w, _, _, _ = plant(2000, 4, 20, 0.05, seed=14)
    warmup, every, fraction = 4, 3, 0.1
    online = OnlineCMD(2000, 4, warmup, n_samples=300)
    schedule = EmbeddingSchedule(fraction, every)
    events, previous = {}, None
    for t in range(20):
        online.observe(w[:, t])
        before = schedule.embedded_mask.copy() if t else np.zeros(2000, dtype=bool)
        if online.ready and t > warmup and (t - warmup) % every == 0:
            change = np.hypot(online.a - previous[0], online.b - previous[1])
        new = schedule.step(online)
        assert new.dtype == np.int64
        if new.size:
            events[t] = new
            candidates = ~before
            candidates[online.reference_index] = False
            assert new.size == round(fraction * 2000)
            assert not before[new].any() and not np.isin(new, online.reference_index).any()
            assert np.all(np.diff(new) > 0)
            # the chosen are the smallest changes among the candidates
            threshold = np.sort(change[candidates])[new.size - 1]
            assert change[new].max() <= threshold
            assert (change[candidates & ~np.isin(np.arange(2000), new)] >= threshold).all()
            np.testing.assert_array_equal(online.frozen_mask, schedule.embedded_mask)
        if online.ready and (t - warmup) % every == 0:
            previous = (online.a.copy(), online.b.copy())
    assert sorted(events) == [7, 10, 13, 16, 19]
    assert schedule.embedded_mask.sum() == 5 * 200


def test_embedding_of_remaining_and_exhaustion():
    w, _, _, _ = plant(500, 2, 30, 0.05, seed=15)
    online = OnlineCMD(500, 2, 2, n_samples=100)
    schedule = EmbeddingSchedule(0.5, 1, of_remaining=True)
    sizes = []
    for t in range(30):
        online.observe(w[:, t])
        sizes.append(schedule.step(online).size)
    assert sizes[3:6] == [249, 124, 62]  # half of the 498 non-references, then half of what remains
    assert schedule.embedded_mask.sum() == 498 and sizes[-1] == 0  # references are never embedded
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        EmbeddingSchedule(0.0, 1)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        EmbeddingSchedule(0.1, 0)
    with pytest.raises(RuntimeError, match="once step"):
        EmbeddingSchedule(0.1, 1).embedded_mask  # noqa: B018 (the property access is what raises)


def test_schedule_state_dict_round_trip():
    w, _, _, _ = plant(600, 3, 16, 0.05, seed=16)
    runs = []
    for cut in (None, 8):
        online, schedule = OnlineCMD(600, 3, 3, n_samples=100), EmbeddingSchedule(0.1, 2)
        log = []
        for t in range(16):
            if t == cut:
                saved_online, saved_schedule = online.state_dict(), schedule.state_dict()
                online, schedule = OnlineCMD(600, 3, 3, n_samples=100), EmbeddingSchedule(0.1, 2)
                online.load_state_dict(saved_online)
                schedule.load_state_dict(saved_schedule)
            online.observe(w[:, t])
            log.append(schedule.step(online))
        runs.append(log)
    for x, y in zip(*runs):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"state\['every'\] is 2, this schedule has 3"):
        EmbeddingSchedule(0.1, 3).load_state_dict(schedule.state_dict())


# --------------------------------------------------------------------------- centralised callback


def test_cmd_callback_embeds_and_evaluates_without_changing_training_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    callback = CMDCallback(model, 3, 2, embed=EmbeddingSchedule(0.2, 1), n_samples=40)
    seen = []

    def check(epoch):
        seen.append(epoch)
        if callback.embedded_index.size:
            theta = callback.layout.flatten(model)
            np.testing.assert_allclose(
                theta[callback.embedded_index], callback.online.model_weights(theta, callback.embedded_index), rtol=1e-6
            )

    train_with_callbacks(
        model,
        x,
        y,
        epochs=5,
        batch_size=16,
        lr=0.1,
        seed=0,
        callbacks=[callback, type("Check", (), {"on_epoch_end": staticmethod(check)})()],
    )
    assert seen == [1, 2, 3, 4, 5] and callback.online.n_observed == 6
    assert callback.embedded_fraction == pytest.approx(3 * round(0.2 * callback.layout.numel) / callback.layout.numel)
    before = callback.layout.flatten(model)
    with callback.cmd_model() as cmd_net:
        np.testing.assert_allclose(callback.layout.flatten(cmd_net), callback.online.model_weights(before), rtol=1e-6)
    np.testing.assert_array_equal(callback.layout.flatten(model), before)
    with pytest.raises(ValueError, match="epoch 5 was already observed"):
        callback.on_epoch_end(5)
    late = CMDCallback(model, 3, 2, observe_initial=False, n_samples=40)
    for epoch in (1, 2, 3):
        assert not late.online.ready
        late.on_epoch_end(epoch)
    assert late.online.ready and late.online.n_observed == 3


def test_compact_online_and_schedule_state():
    from fedcmd.cmd import _uint_for

    assert [_uint_for(n) for n in (1, 256, 257, 65536, 65537)] == [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32]
    w, _, _, _ = plant(900, 3, 10, 0.05, seed=17)
    online, schedule = OnlineCMD(900, 3, 3, n_samples=200), EmbeddingSchedule(0.2, 1)
    stream(online, w, 0, 4)
    schedule.step(online)
    stream(online, w, 4, 5)
    assert schedule.step(online).size == 180
    assert online.modes.dtype == np.uint8 and online.state_dict()["modes"].dtype == np.uint8
    # one mask: the schedule's embedded weights are the online statistics' frozen weights
    assert np.array_equal(schedule.embedded_mask, online.frozen_mask) and not schedule.embedded_mask.flags.writeable
    state = schedule.state_dict()
    assert "embedded_mask" not in state and state["a_old"].dtype == state["b_old"].dtype == np.float32
    np.testing.assert_array_equal(state["a_old"], online.a.astype(np.float32))
    # modes written as int64 (an older state) load into the compact type, values unchanged
    again = OnlineCMD(900, 3, 3, n_samples=200)
    again.load_state_dict({**online.state_dict(), "modes": online.modes.astype(np.int64)})
    assert again.modes.dtype == np.uint8 and np.array_equal(again.modes, online.modes)
    frozen_reference = online.frozen_mask.copy()
    frozen_reference[online.reference_index[0]] = True
    with pytest.raises(ValueError, match="freezes a reference weight"):
        again.load_state_dict({**online.state_dict(), "frozen_mask": frozen_reference})
    with pytest.raises(ValueError, match=r"state\['a_old'\] must be a 1-D float32 array, got float64"):
        EmbeddingSchedule(0.2, 1).load_state_dict({**state, "a_old": state["a_old"].astype(np.float64)})
    with pytest.raises(ValueError, match="do not fit last_event 4 and 901 weights"):
        EmbeddingSchedule(0.2, 1).load_state_dict(state, n_params=901)
    restored = EmbeddingSchedule(0.2, 1)
    restored.load_state_dict(state)
    with pytest.raises(ValueError, match="this schedule tracks 900"):
        restored.step(OnlineCMD(901, 3, 3))
