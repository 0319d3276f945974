import numpy as np

from fedcmd.sampling import cohort_size, local_seed, sample_cohort


def test_cohort_is_a_pure_function_of_seed_and_round():
    a = [sample_cohort(10, 0.4, seed=3, server_round=r) for r in range(1, 20)]
    b = [sample_cohort(10, 0.4, seed=3, server_round=r) for r in range(1, 20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(len(x) == 4 and len(set(x)) == 4 and x.min() >= 0 and x.max() < 10 for x in a)
    assert len({tuple(x) for x in a}) > 5  # cohorts change from round to round
    other = [sample_cohort(10, 0.4, seed=4, server_round=r) for r in range(1, 20)]
    assert any(not np.array_equal(x, y) for x, y in zip(a, other))


def test_full_participation_and_minimum_one():
    assert np.array_equal(sample_cohort(5, 1.0, 0, 1), np.arange(5))
    assert cohort_size(100, 0.001) == 1


def test_local_seed_differs_by_client_and_round():
    seeds = {local_seed(0, r, p) for r in range(5) for p in range(5)}
    assert len(seeds) == 25
