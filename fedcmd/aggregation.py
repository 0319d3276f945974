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

Memory: one float64 accumulator (8 bytes per value) and a scratch chunk; a reply is read in
chunks of `CHUNK` values and never copied whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HEADROOM_BITS = 16
FLOOR = 2.0**-10  # the smallest m_s: a segment that is all zeros (e.g. a bias) still gets a grid
CHUNK = 1 << 16  # values per pass: the scratch stays in cache
MAX_EXAMPLES = 1 << 29  # n * x is exact in float64 below this (24 + 29 bits)


class RefusedValues(ValueError):
    """A vector the accumulator cannot take exactly (wrong length, non-finite or too large)."""


def segments_of(positions: np.ndarray | slice, offsets: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Segments (start, stop) of a vector that holds the weights at `positions` (ascending indices into
    a model of `size` weights whose tensors start at `offsets`, or a slice of it): one per tensor."""
    bounds = np.unique(np.clip(np.concatenate([[0], np.asarray(offsets, dtype=np.int64), [size]]), 0, size))
    if isinstance(positions, slice):
        start, stop, step = positions.indices(size)
        if step != 1:
            raise ValueError("positions must be a contiguous slice")
        cuts, length = np.clip(bounds, start, stop) - start, stop - start
    else:
        cuts, length = np.searchsorted(positions, bounds), len(positions)
    cuts = np.unique(np.concatenate([[0], cuts, [length]]))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def segment_maxima(
    model: np.ndarray, positions: np.ndarray | slice, segments: Sequence[tuple[int, int]]
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
        self.max_examples = int(max_examples)
        self.limit = []  # per segment: the largest |x| taken, float32
        self.grid = []  # per segment: q_s
        for top in maxima:
            if not math.isfinite(top) or top < 0:
                raise ValueError(f"segment maxima must be finite and >= 0, got {top}")
            m = max(float(np.float32(top)), FLOOR) * 2.0**HEADROOM_BITS
            self.limit.append(np.float32(m))
            self.grid.append(2.0 ** (math.ceil(math.log2(self.max_examples * m)) - 52))
        self.total = np.zeros(self.size, dtype=np.float64)
        self.examples = 0
        self._scratch = np.empty(min(CHUNK, max(self.size, 1)), dtype=np.float64)

    @classmethod
    def over(
        cls,
        model: np.ndarray,
        positions: np.ndarray | slice,
        offsets: Sequence[int],
        max_examples: int,
        *,
        each: bool = False,
    ) -> ExactMean:
        """The mean of vectors that stand for `model[positions]` (ascending indices, or a slice): one
        segment per tensor of the model (tensors start at `offsets`; the grid of a segment of scattered
        positions comes from its whole tensor), or per value with `each`."""
        if isinstance(positions, slice):
            size = len(range(*positions.indices(model.size)))
        else:
            size = len(positions)
        if each:
            segments = [(i, i + 1) for i in range(size)]
            return cls(segments, segment_maxima(model, positions, segments), max_examples)
        segments = segments_of(positions, offsets, model.size)
        if isinstance(positions, slice):
            return cls(segments, segment_maxima(model, positions, segments), max_examples)
        # Scattered positions: each segment's grid from its whole tensor in the model sent (a bound at
        # least as large, read contiguously rather than gathered).
        bounds = np.unique(
            np.clip(np.concatenate([[0], np.asarray(offsets, dtype=np.int64), [model.size]]), 0, model.size)
        )
        tensors = np.searchsorted(bounds, [positions[start] for start, _ in segments], side="right") - 1
        whole = segment_maxima(model, slice(None), [(int(bounds[t]), int(bounds[t + 1])) for t in tensors])
        return cls(segments, whole, max_examples)

    def _refusal(self, value: float, start: int, stop: int, limit: np.float32) -> RefusedValues:
        if not math.isfinite(value):
            return RefusedValues(f"holds NaN or Inf (a {value} in [{start}, {stop}))")
        return RefusedValues(
            f"value {value:.4g} in [{start}, {stop}) is beyond {float(limit):.4g} "
            f"(2^{HEADROOM_BITS} x that segment's largest magnitude sent, at least {FLOOR})"
        )

    def check(self, values: np.ndarray) -> np.ndarray:
        """`values` as a flat float32 vector that `add` takes, or RefusedValues saying why not; nothing
        is added. (`add` checks as it goes, so a caller need not call this first.)"""
        values = np.asarray(values)
        if values.dtype != np.float32 or values.shape != (self.size,):
            raise RefusedValues(f"expected {self.size} float32 values, got {values.dtype} {values.shape}")
        for (start, stop), limit in zip(self.segments, self.limit):
            part = values[start:stop]
            low, high = part.min(), part.max()
            if not (-limit <= low and high <= limit):  # False for NaN too
                raise self._refusal(float(low if not -limit <= low else high), start, stop, limit)
        return values

    def add(self, values: np.ndarray, examples: int) -> None:
        """Add a reply's values with weight `examples` (a positive integer), or raise RefusedValues
        (wrong shape or dtype, a value not finite or beyond its segment's limit) with nothing added:
        the values are checked chunk by chunk as they are added, and on a refusal the chunks already
        added are taken out again, exactly (the sums are integers)."""
        if isinstance(examples, bool) or int(examples) != examples or not 0 < examples:
            raise ValueError(f"examples must be a positive integer, got {examples!r}")
        examples = int(examples)
        if self.examples + examples > self.max_examples:
            raise ValueError(f"more examples than the bound: {self.examples} + {examples} > {self.max_examples}")
        values = np.asarray(values)
        if values.dtype != np.float32 or values.shape != (self.size,):
            raise RefusedValues(f"expected {self.size} float32 values, got {values.dtype} {values.shape}")
        done = 0
        try:
            for (start, stop), q, limit in zip(self.segments, self.grid, self.limit):
                factor = examples / q  # exact: an integer over a power of two
                for lo in range(start, stop, CHUNK):
                    hi = min(lo + CHUNK, stop)
                    part, t = values[lo:hi], self._scratch[: hi - lo]
                    low, high = part.min(), part.max()  # float32 reductions: twice as fast as on the copy
                    if not (-limit <= low and high <= limit):  # False for NaN too
                        raise self._refusal(float(low if not -limit <= low else high), start, stop, limit)
                    np.copyto(t, part)
                    t *= factor
                    np.rint(t, out=t)
                    self.total[lo:hi] += t
                    done = hi
        except RefusedValues:
            self._take_out(values, examples, done)
            raise
        self.examples += examples

    def remove(self, values: np.ndarray, examples: int) -> None:
        """Undo `add(values, examples)` exactly (a reply refused for another vector after this one)."""
        self._take_out(np.asarray(values), int(examples), self.size)
        self.examples -= int(examples)

    def _take_out(self, values: np.ndarray, examples: int, stop_at: int) -> None:
        """Subtract the terms `add` added for values[:stop_at]: rint is symmetric, so -rint(y) = rint(-y)."""
        for (start, stop), q in zip(self.segments, self.grid):
            factor = -examples / q
            for lo in range(start, min(stop, stop_at), CHUNK):
                hi = min(lo + CHUNK, stop, stop_at)
                t = self._scratch[: hi - lo]
                np.copyto(t, values[lo:hi])
                t *= factor
                np.rint(t, out=t)
                self.total[lo:hi] += t

    def mean_into(self, out: np.ndarray, index: np.ndarray | slice | None = None) -> None:
        """Write the mean (float32) into `out[index]` (all of `out` when index is None): out must be
        float32; `index` ascending positions or a slice with one place per value."""
        if not self.examples:
            raise ValueError("no values were added")
        for (start, stop), q in zip(self.segments, self.grid):
            for lo in range(start, stop, CHUNK):
                hi = min(lo + CHUNK, stop)
                t = self._scratch[: hi - lo]
                np.multiply(self.total[lo:hi], q, out=t)  # exact: q is a power of two
                t /= self.examples
                if index is None:
                    out[lo:hi] = t
                elif isinstance(index, slice):
                    first = (index.start or 0) + lo
                    out[first : first + hi - lo] = t
                else:
                    out[index[lo:hi]] = t

    def mean(self) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float32)
        self.mean_into(out)
        return out
