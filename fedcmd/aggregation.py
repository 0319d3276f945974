"""A sample-weighted mean of float32 vectors that takes replies one at a time, in any order, and
gives the same bits whatever the order.

Why not a float64 sum: float64 addition rounds, so sum(a, b, c) and sum(c, a, b) may differ in the
last bit, and once in a while that bit decides how the mean rounds to float32. Summing in partition
order fixes the order, but then every reply must be held until the last one arrives (memory grows
with the clients of a round). `ExactMean` makes every addition exact instead, so there is nothing
for the order to change:

- The vector is cut into segments (a model's tensors, or the part of a tensor a strategy averages).
  Each segment s has a grid q_s, a power of two fixed before any reply arrives, from what the server
  sent: q_s = 2^ceil(log2(E * 2^H * m_s)) / 2^52, where m_s is the segment's largest magnitude in
  the model sent (at least `FLOOR`), E bounds the examples of the round's replies together, and
  H = `HEADROOM_BITS`.
- A reply with n examples adds round(n * x_i / q_s) to the accumulator, a float64 holding an
  integer. n * x_i is exact in float64 (24-bit float32 mantissa times n < 2^29) and scaling by a
  power of two is exact, so the only rounding is this one, and it depends on the reply alone.
- A value with |x_i| > 2^H * m_s is refused (the reply is rejected before anything is added).
  Every term is then below 2^52 / E * n in magnitude, so every partial sum, in any order, is an
  integer below 2^52: float64 adds such integers exactly. The final sum is therefore the same
  integer whatever the order, and so is the mean, acc * q_s / (sum of n), rounded to float32.
- Resolution: the mean is resolved to q_s / E = m_s * 2^(H - 52) (2^-36 m_s with H = 16), i.e.
  finer than float32's own spacing for every value above m_s / 2^12, and to about 1e-11 m_s
  below that. The bound refuses a value more than 65,536 times its tensor's largest weight, which
  an honest client does not send in one round; a lying one is rejected (and counted).

Memory: one float64 accumulator (8 bytes per value), nothing else per value: a reply is read in
place (a view of its bytes) and each pass is one compiled loop (`fedcmd.kernels`) with no scratch.

Positions: the vector stands for `model[positions]`, where positions is a slice, ascending indices,
or `Free` (CMD's densely sent weights, walked without an index array).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcmd import kernels

HEADROOM_BITS = 16
FLOOR = 2.0**-10  # the smallest m_s: a segment that is all zeros (e.g. a bias) still gets a grid
CHUNK = 1 << 16  # values per numpy pass where one remains (maxima): a chunk stays in cache
MAX_EXAMPLES = 1 << 29  # n * x is exact in float64 below this (24 + 29 bits)
ADD_PART = 1 << 18  # values per part of a reply added on numba's threads (`kernels.add_rounded`)


def filled(size: int, dtype) -> np.ndarray:
    """np.zeros(size, dtype), zeroed here, on the calling thread: for arrays that numba's threads
    write. np.zeros maps fresh pages lazily, and two threads faulting them in at once were measured
    up to 10x slower (one pass of 90 MB: 10-80 ms instead of 7) than writing them once first."""
    out = np.empty(size, dtype=dtype)
    out.fill(0)
    return out


class RefusedValues(ValueError):
    """A vector the accumulator cannot take exactly (wrong length, non-finite or too large)."""


@dataclass(frozen=True, eq=False)
class Free:
    """The positions i of a model of frozen.size weights with frozen[i] False and i not in refs
    (ascending int64), in ascending order: CMD's densely sent weights, without an index array."""

    frozen: np.ndarray
    refs: np.ndarray
    _counted: dict = field(default_factory=dict, repr=False)  # bounds -> counts (a pass over N each)

    def counts(self, bounds: np.ndarray) -> np.ndarray:
        """How many positions lie in each [bounds[t], bounds[t + 1]) (kept: frozen must not change
        while this object is used)."""
        bounds = np.asarray(bounds, dtype=np.int64)
        key = bounds.tobytes()
        if key not in self._counted:
            self._counted[key] = kernels.count_free(self.frozen, self.refs, bounds)
        return self._counted[key]

    @property
    def size(self) -> int:
        for counts in self._counted.values():
            return int(counts.sum())
        return int(self.counts(np.array([0, self.frozen.size]))[0])

    def parts(self, length: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """(bounds, offsets): the model cut every `length` weights, and where each part's free
        positions start among all of them: the compiled walks split into parts on numba's threads."""
        n = self.frozen.size
        bounds = np.append(np.arange(0, n, length, dtype=np.int64), n) if n else np.zeros(1, np.int64)
        return bounds, np.concatenate([[0], np.cumsum(self.counts(bounds))]).astype(np.int64)


Positions = slice | np.ndarray | Free


def tensor_bounds(offsets: Sequence[int], size: int) -> np.ndarray:
    """[0, the tensors' starts within [0, size), size], ascending, without repeats."""
    return np.unique(np.clip(np.concatenate([[0], np.asarray(offsets, dtype=np.int64), [size]]), 0, size))


def _per_tensor(positions: Positions, bounds: np.ndarray, size: int) -> np.ndarray:
    """How many of `positions` lie in each tensor [bounds[t], bounds[t + 1])."""
    if isinstance(positions, slice):
        start, stop, step = positions.indices(size)
        if step != 1:
            raise ValueError("positions must be a contiguous slice")
        return np.diff(np.clip(bounds, start, stop))
    if isinstance(positions, Free):
        return positions.counts(bounds)
    return np.diff(np.searchsorted(positions, bounds))


def segments_of(positions: Positions, offsets: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Segments (start, stop) of a vector that holds the weights at `positions` of a model of `size`
    weights whose tensors start at `offsets`: one per tensor that holds any of them."""
    counts = _per_tensor(positions, tensor_bounds(offsets, size), size)
    cuts = np.concatenate([[0], np.cumsum(counts[counts > 0])])
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def segment_maxima(
    model: np.ndarray, positions: slice | np.ndarray, segments: Sequence[tuple[int, int]]
) -> list[float]:
    """max |model[positions][start:stop]| per segment, read in chunks (no copy of the whole subset)."""
    out = []
    for start, stop in segments:
        top = 0.0
        for lo in range(start, stop, CHUNK):
            hi = min(lo + CHUNK, stop)
            if isinstance(positions, slice):
                first = (positions.start or 0) + lo
                part = model[first : first + hi - lo]
            else:
                part = model[positions[lo:hi]]
            top = max(top, float(part.max()), -float(part.min()))
        out.append(top)
    return out


class ExactMean:
    """The sample-weighted mean of float32 vectors of one length, exact until its final rounding and
    independent of the order of `add` calls (module docstring).

    `segments`: (start, stop) pairs tiling [0, size); `maxima`: each segment's largest magnitude in
    the values the server sent (they fix its grid); `max_examples`: a bound on the sum of the
    examples of every reply that may be added (the round's clients together). `ExactMean.over`
    builds one for a part of a model.
    """

    def __init__(self, segments: Sequence[tuple[int, int]], maxima: Sequence[float], max_examples: int) -> None:
        if not 0 < max_examples < MAX_EXAMPLES:
            raise ValueError(f"max_examples must be in (0, 2^29), got {max_examples}")
        if len(maxima) != len(segments):
            raise ValueError(f"{len(maxima)} maxima for {len(segments)} segments")
        covered = [0]
        for start, stop in segments:
            if start != covered[-1] or stop <= start:
                raise ValueError(f"segments must tile [0, size) in order, got {list(segments)[:4]} ...")
            covered.append(stop)
        self.size = covered[-1]
        self.segments = list(segments)
        self.bounds = np.asarray(covered, dtype=np.int64)
        self.max_examples = int(max_examples)
        limits, grids = [], []  # per segment: the largest |x| taken (float32), and q_s
        for top in maxima:
            if not math.isfinite(top) or top < 0:
                raise ValueError(f"segment maxima must be finite and >= 0, got {top}")
            m = max(float(np.float32(top)), FLOOR) * 2.0**HEADROOM_BITS
            limits.append(m)
            grids.append(2.0 ** (math.ceil(math.log2(self.max_examples * m)) - 52))
        self.limits = np.asarray(limits, dtype=np.float32)
        self.grids = np.asarray(grids, dtype=np.float64)
        self.total = filled(self.size, np.float64)
        self.examples = 0

    @classmethod
    def over(
        cls,
        model: np.ndarray,
        positions: Positions,
        offsets: Sequence[int],
        max_examples: int,
        *,
        each: bool = False,
    ) -> ExactMean:
        """The mean of vectors that stand for `model[positions]` (a slice, ascending indices or `Free`):
        one segment per tensor of the model (tensors start at `offsets`; the grid of a segment of
        scattered positions comes from its whole tensor), or per value with `each` (indices only)."""
        if each:
            if not isinstance(positions, np.ndarray):
                raise ValueError("each=True takes an index array")
            segments = [(i, i + 1) for i in range(len(positions))]
            return cls(segments, segment_maxima(model, positions, segments), max_examples)
        bounds = tensor_bounds(offsets, model.size)
        counts = _per_tensor(positions, bounds, model.size)
        held = np.flatnonzero(counts)
        cuts = np.concatenate([[0], np.cumsum(counts[held])])
        segments = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
        if isinstance(positions, slice):
            return cls(segments, segment_maxima(model, positions, segments), max_examples)
        # Scattered positions: each segment's grid from its whole tensor in the model sent (a bound at
        # least as large, read contiguously rather than gathered).
        whole = segment_maxima(model, slice(None), [(int(bounds[t]), int(bounds[t + 1])) for t in held])
        return cls(segments, whole, max_examples)

    def _segment(self, i: int) -> int:
        return int(np.searchsorted(self.bounds, i, side="right")) - 1

    def _refusal(self, values: np.ndarray, i: int) -> RefusedValues:
        s = self._segment(i)
        value, (start, stop), limit = float(values[i]), self.segments[s], self.limits[s]
        if not math.isfinite(value):
            return RefusedValues(f"holds NaN or Inf (a {value} in [{start}, {stop}))")
        return RefusedValues(
            f"value {value:.4g} in [{start}, {stop}) is beyond {float(limit):.4g} "
            f"(2^{HEADROOM_BITS} x that segment's largest magnitude sent, at least {FLOOR})"
        )

    def _checked(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.dtype != np.float32 or values.shape != (self.size,):
            raise RefusedValues(f"expected {self.size} float32 values, got {values.dtype} {values.shape}")
        return values

    def check(self, values: np.ndarray) -> np.ndarray:
        """`values` as a flat float32 vector that `add` takes, or RefusedValues saying why not; nothing
        is added. (`add` checks as it goes, so a caller need not call this first.)"""
        values = self._checked(values)
        bad = kernels.first_refused(values, self.bounds, self.limits)
        if bad >= 0:
            raise self._refusal(values, bad)
        return values

    def add(self, values: np.ndarray, examples: int) -> None:
        """Add a reply's values with weight `examples` (a positive integer), or raise RefusedValues
        (wrong shape or dtype, a value not finite or beyond its segment's limit) with nothing added:
        the values are checked as they are added, and on a refusal the ones already added are taken
        out again, exactly (the sums are integers)."""
        if isinstance(examples, bool) or int(examples) != examples or not 0 < examples:
            raise ValueError(f"examples must be a positive integer, got {examples!r}")
        examples = int(examples)
        if self.examples + examples > self.max_examples:
            raise ValueError(f"more examples than the bound: {self.examples} + {examples} > {self.max_examples}")
        values = self._checked(values)
        factors = examples / self.grids  # exact: an integer over a power of two
        bad = kernels.add_rounded(self.total, values, self.bounds, factors, self.limits, ADD_PART)
        if bad >= 0:  # nothing was added
            raise self._refusal(values, bad)
        self.examples += examples

    def remove(self, values: np.ndarray, examples: int) -> None:
        """Undo `add(values, examples)` exactly (a reply refused for another vector after this one)."""
        values = self._checked(values)
        kernels.take_out_rounded(self.total, values, self.bounds, int(examples) / self.grids, self.size)
        self.examples -= int(examples)

    def mean_into(self, out: np.ndarray, index: Positions | None = None) -> None:
        """Write the mean (float32) into `out[index]` (all of `out` when index is None): out must be
        float32; `index` a slice, ascending positions or `Free`, with one place per value."""
        if not self.examples:
            raise ValueError("no values were added")
        if out.dtype != np.float32:
            raise ValueError(f"out must be float32, got {out.dtype}")
        if index is None or isinstance(index, slice):
            first = 0 if index is None else index.indices(out.size)[0]
            if first + self.size > out.size:
                raise ValueError(f"{self.size} values do not fit out[{first}:] of {out.size}")
            kernels.mean_contiguous(out, first, self.total, self.bounds, self.grids, float(self.examples))
        elif isinstance(index, Free):
            # The means in order first (a vectorised loop; 4 bytes per value while the accumulator is
            # held, no more than the reply a round holds beside it), then placed in one walk.
            means = filled(self.size, np.float32)
            kernels.mean_contiguous(means, 0, self.total, self.bounds, self.grids, float(self.examples))
            kernels.scatter_free(out, means, index.frozen, index.refs, *index.parts())
        else:
            index = np.asarray(index, dtype=np.int64)
            if index.shape != (self.size,):
                raise ValueError(f"{index.size} positions for {self.size} values")
            kernels.mean_indexed(out, index, self.total, self.bounds, self.grids, float(self.examples))

    def mean(self) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float32)
        self.mean_into(out)
        return out
