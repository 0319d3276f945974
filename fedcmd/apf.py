"""Adaptive Parameter Freezing (APF) and Aggressive APF (A-APF), Chen et al., ICDCS 2021.

The controller decides, per scalar parameter of the global model, whether that scalar is
synchronised (active) or held at its last synchronised value (frozen) during the next check
period. It only ever sees the global model's change, so every party that feeds it the same
deltas (and, for A-APF, built it with the same seed) derives the same mask.

State machine, per scalar i
---------------------------
    E[i], A[i]  moving averages of the scalar's change and of its absolute change (start 0)
    L[i]        freezing period, in check periods (starts 0)
    c[i]        frozen periods still to serve (starts 0); the scalar is active iff c[i] == 0

A check closes period k; ``delta`` is the global model's change over period k. In order:

1. Scalars active during period k are evaluated on delta (frozen ones skip this step: their
   delta is ignored and E, A, L stay as they are):
       E = alpha*E + (1-alpha)*delta,  A = alpha*A + (1-alpha)*|delta|
       stable  iff  P = |E|/A < T, computed as |E| < T*A so that A == 0 counts as unstable
       L = L + 1 if stable else floor(L/2)        (additive increase, multiplicative decrease)
       c = L
2. Scalars frozen during period k: c = c - 1.
3. A-APF only: each scalar found unstable in step 1 is, with probability
   p = random_freeze_probability(K) = min(K/2000, 0.5), frozen for ``random_freeze_periods``
   more periods: c = c + random_freeze_periods. L is left alone, so the random freeze does not
   feed back into the TCP-style control. K = n_checks * rounds_per_check, with n_checks
   counting this check (first check: n_checks = 1), i.e. the round id of this check when a
   check follows every ``rounds_per_check`` rounds: the paper's "round K". The draws come from
   np.random.default_rng(seed), one per scalar per check whatever the mask.
4. The mask for period k+1 is c == 0. If more than ``tighten_at`` of all scalars are now frozen,
   T = T/2.

So a scalar given L >= 1 at check k is frozen during periods k+1 .. k+L (checks k+1 .. k+L
count c down to 0), active during period k+L+1, and re-evaluated at check k+L+1 on that
period's delta alone. It never unfreezes before its countdown runs out.
"""

from __future__ import annotations

import json

import numpy as np

# A-APF: the paper's probability of freezing an unstable scalar at round K, min(K/2000, 0.5).
RANDOM_FREEZE_RAMP_ROUNDS = 2000
RANDOM_FREEZE_MAX_PROBABILITY = 0.5

_STATE_ARRAYS = {
    "ema_delta": np.float32,  # E
    "ema_abs_delta": np.float32,  # A
    "freezing_period": np.int32,  # L
    "frozen_periods_left": np.int32,  # c
}


def random_freeze_probability(round_id: int) -> float:
    """A-APF's chance that an unstable scalar is frozen at round ``round_id``."""
    return min(round_id / RANDOM_FREEZE_RAMP_ROUNDS, RANDOM_FREEZE_MAX_PROBABILITY)


class FreezingController:
    """Per-scalar APF freezing control over a flat parameter vector of length ``n_params``.

    Call ``check(delta)`` at every stability check with the global model's change since the
    previous check; it returns the mask of scalars to synchronise until the next check.
    Statistics are float32 (the precision of the model they describe); periods are int32.
    """

    def __init__(
        self,
        n_params: int,
        alpha: float = 0.99,
        threshold: float = 0.05,
        tighten_at: float = 0.8,
        aggressive: bool = False,
        seed: int = 0,
        rounds_per_check: int = 1,
        random_freeze_periods: int = 1,
    ) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, (int, np.integer)):
            raise ValueError(f"n_params must be a positive integer, got {n_params!r}")
        if n_params < 1:
            raise ValueError(f"n_params must be a positive integer, got {n_params!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        if not threshold > 0.0:
            raise ValueError(f"threshold must be positive, got {threshold!r}")
        if not 0.0 <= tighten_at <= 1.0:
            raise ValueError(f"tighten_at must be in [0, 1], got {tighten_at!r}")
        if int(rounds_per_check) != rounds_per_check or rounds_per_check < 1:
            raise ValueError(f"rounds_per_check must be a positive integer, got {rounds_per_check!r}")
        if int(random_freeze_periods) != random_freeze_periods or random_freeze_periods < 1:
            raise ValueError(f"random_freeze_periods must be a positive integer, got {random_freeze_periods!r}")
        self.n_params = int(n_params)
        self.alpha = float(alpha)
        self.tighten_at = float(tighten_at)
        self.aggressive = bool(aggressive)
        self.rounds_per_check = int(rounds_per_check)
        self.random_freeze_periods = int(random_freeze_periods)

        self._ema_delta = np.zeros(self.n_params, np.float32)
        self._ema_abs_delta = np.zeros(self.n_params, np.float32)
        self._freezing_period = np.zeros(self.n_params, np.int32)
        self._frozen_periods_left = np.zeros(self.n_params, np.int32)
        self._threshold = float(threshold)
        self._n_checks = 0
        self._rng = np.random.default_rng(seed)
        self._refresh_mask()

    # -- read-only views ---------------------------------------------------------------------
    @property
    def active_mask(self) -> np.ndarray:
        """Bool mask (read-only) of the scalars synchronised during the current period."""
        return self._active

    @property
    def frozen_fraction(self) -> float:
        return self._n_frozen / self.n_params

    @property
    def threshold(self) -> float:
        """Current stability threshold T (halved each time a check leaves > tighten_at frozen)."""
        return self._threshold

    @property
    def n_checks(self) -> int:
        return self._n_checks

    # -- the check ---------------------------------------------------------------------------
    def check(self, delta) -> np.ndarray:
        """Run one stability check on ``delta`` and return the (read-only) mask for the next period.

        ``delta``: the global model's change since the previous check, flat, one float per
        scalar. Entries of scalars frozen during the period are ignored (they should be 0).
        Raises ValueError on a wrong shape, a non-numeric dtype, or NaN/inf anywhere.
        """
        delta = self._validated_delta(delta)
        was_active = self._active
        ema, ema_abs = self._ema_delta, self._ema_abs_delta
        period, left = self._freezing_period, self._frozen_periods_left

        # Branch-free: ufunc where= and np.where run ~10x slower than plain arithmetic on a
        # scattered mask at n ~ 1e7. Frozen scalars get factor 1 and increment 0, which leaves
        # their statistics bit-for-bit unchanged; active ones get exactly alpha and (1-alpha).
        on = was_active.astype(np.float32)
        factor = on * (np.float32(self.alpha) - np.float32(1.0))
        factor += np.float32(1.0)
        step = np.multiply(delta, on)  # frozen scalars' delta is ignored
        step *= np.float32(1.0 - self.alpha)
        ema *= factor
        ema += step
        np.abs(step, out=step)
        ema_abs *= factor
        ema_abs += step

        # P = |E|/A < T without dividing: with A == 0 the test is |E| < 0, false, so unstable.
        np.abs(ema, out=factor)
        np.multiply(ema_abs, np.float32(self._threshold), out=step)
        stable = np.less(factor, step)
        stable &= was_active
        unstable = stable ^ was_active  # active and not stable
        del on, factor, step

        period += stable  # additive increase
        period >>= unstable  # multiplicative decrease, floor(L/2)
        left -= ~was_active  # frozen: one period served
        left += period * was_active  # active (left == 0): frozen for the next L periods

        self._n_checks += 1
        if self.aggressive:
            self._freeze_randomly(unstable)

        self._refresh_mask()
        if self.frozen_fraction > self.tighten_at:
            self._threshold /= 2.0
        return self._active

    def _freeze_randomly(self, unstable: np.ndarray) -> None:
        # One draw per scalar per check, whatever the mask: the generator's position depends
        # only on the number of checks, so parties with the same seed and history draw alike.
        probability = random_freeze_probability(self._n_checks * self.rounds_per_check)
        chosen = self._rng.random(self.n_params, dtype=np.float32) < probability
        chosen &= unstable
        self._frozen_periods_left += chosen * np.int32(self.random_freeze_periods)

    def _refresh_mask(self) -> None:
        active = self._frozen_periods_left == 0
        active.flags.writeable = False
        self._active = active
        self._n_frozen = self.n_params - int(np.count_nonzero(active))

    def _validated_delta(self, delta) -> np.ndarray:
        delta = np.asarray(delta)
        if delta.shape != (self.n_params,):
            raise ValueError(
                f"delta has shape {delta.shape}, expected ({self.n_params},): "
                "one change per scalar parameter, flattened"
            )
        if not (np.issubdtype(delta.dtype, np.floating) or np.issubdtype(delta.dtype, np.integer)):
            raise ValueError(f"delta has dtype {delta.dtype}, expected real numbers")
        with np.errstate(over="ignore"):  # beyond float32's range: reported just below
            delta = delta.astype(np.float32, copy=False)
        finite = np.isfinite(delta)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"delta has {bad.size} NaN or infinite value(s) as float32, first at index {bad[0]}")
        return delta

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Copies of the evolving state: four arrays, two numbers, and the RNG state as JSON.

        The RNG state is a JSON string because PCG64's 128-bit integers fit no fixed-width
        scalar type of a checkpoint format. Hyperparameters are not included: load into a
        controller constructed with the same configuration.
        """
        return {
            "ema_delta": self._ema_delta.copy(),
            "ema_abs_delta": self._ema_abs_delta.copy(),
            "freezing_period": self._freezing_period.copy(),
            "frozen_periods_left": self._frozen_periods_left.copy(),
            "threshold": self._threshold,
            "n_checks": self._n_checks,
            "rng_state": json.dumps(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({*_STATE_ARRAYS, "threshold", "n_checks", "rng_state"} - set(state))
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}")
        arrays = {}
        for key, dtype in _STATE_ARRAYS.items():
            value = np.asarray(state[key])
            if value.shape != (self.n_params,):
                raise ValueError(f"state[{key!r}] has shape {value.shape}, expected ({self.n_params},)")
            arrays[key] = value.astype(dtype, copy=True)
        if (arrays["freezing_period"] < 0).any() or (arrays["frozen_periods_left"] < 0).any():
            raise ValueError("state has negative freezing periods")
        if not float(state["threshold"]) > 0.0:
            raise ValueError(f"state['threshold'] must be positive, got {state['threshold']!r}")
        if int(state["n_checks"]) < 0:
            raise ValueError(f"state['n_checks'] must be >= 0, got {state['n_checks']!r}")
        rng = np.random.default_rng(0)  # seed irrelevant: its state is replaced next line
        rng.bit_generator.state = json.loads(str(state["rng_state"]))

        self._ema_delta = arrays["ema_delta"]
        self._ema_abs_delta = arrays["ema_abs_delta"]
        self._freezing_period = arrays["freezing_period"]
        self._frozen_periods_left = arrays["frozen_periods_left"]
        self._threshold = float(state["threshold"])
        self._n_checks = int(state["n_checks"])
        self._rng = rng
        self._refresh_mask()
