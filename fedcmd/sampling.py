"""Client sampling: a pure function of (seed, round), so every strategy sees the same cohorts."""

from __future__ import annotations

import numpy as np


def cohort_size(num_clients: int, fraction: float) -> int:
    """Clients per round: round(fraction * num_clients), at least one."""
    return max(1, min(num_clients, int(round(fraction * num_clients))))


def sample_cohort(num_clients: int, fraction: float, seed: int, server_round: int) -> np.ndarray:
    """Sorted partition ids of the clients sampled in `server_round`.

    Sampling is over partition ids, not Flower node ids (which are random per run), and depends on
    nothing but its arguments: two strategies, two runs, or a resumed run all see the same cohorts.
    """
    k = cohort_size(num_clients, fraction)
    if k == num_clients:
        return np.arange(num_clients, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(server_round), 0x5A3F])
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int64)


def local_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's local batch order in one round."""
    return int(np.random.default_rng([int(seed), int(server_round), int(partition_id)]).integers(2**31))
