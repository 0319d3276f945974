"""Compiled loops (numba) for the server's per-weight passes at ResNet-18 scale (issue 15).

Each of these was a chain of numpy passes over chunks of the model: check, cast, scale, round,
add; or gather, multiply, add, masked copy. One compiled loop does the same arithmetic in one pass,
with no scratch arrays, so a round's time is close to reading the replies once and its memory is
the accumulator and the reply. The arithmetic is the numpy code's, operation for operation, in the
same precision (numba does not contract a * b + c into a fused multiply-add unless asked, and
nothing here asks), so the results are the same bits; tests/test_kernels.py checks each loop
against the numpy expression it replaced.

"Free" positions (CMD): the weights neither embedded (`frozen[i]`) nor references (`refs`,
ascending int64): the ones a CMD message sends densely, walked in ascending order without an index
array over them.

Some loops run on numba's threads (`parallel=True`: adding a reply, the online update, the mean,
gathering and placing the free weights by tensor, taking an event's coefficients), where each
value's arithmetic is its own, so the split cannot change a bit; numba uses as many threads as
cores, NUMBA_NUM_THREADS sets fewer); the others are serial walks or reductions.

Compiled once per machine and cached on disk (`cache=True`, beside this file or in numba's user
cache); the first call in a fresh checkout compiles (about a second per loop).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from numba import njit, prange

# numba's default thread pool (workqueue) must not be entered by two Python threads at once (it
# aborts the process): the threaded loops are called through this lock. A fedcmd server calls them
# from one thread; two servers in one process (tests, notebooks) take turns.
_POOL = threading.Lock()


def _one_at_a_time(kernel):
    @functools.wraps(kernel)
    def call(*args):
        with _POOL:
            return kernel(*args)

    call.compiled = kernel
    return call


@njit(cache=True, nogil=True)
def _add_part(total, values, bounds, factors, limits, start, stop):  # pragma: no cover (compiled)
    """`add_rounded` on values[start:stop]; returns -1, or the index of the first value refused, the
    values before it in the part added. With -factors and infinite limits: takes those terms out."""
    s = np.searchsorted(bounds, start, side="right") - 1
    while s < bounds.size - 1 and bounds[s] < stop:
        factor, limit = factors[s], limits[s]
        for i in range(max(bounds[s], start), min(bounds[s + 1], stop)):
            x = values[i]
            if not (-limit <= x and x <= limit):
                return i
            total[i] += np.rint(np.float64(x) * factor)
        s += 1
    return -1


@_one_at_a_time
@njit(cache=True, nogil=True, parallel=True)
def add_rounded(total, values, bounds, factors, limits, part):  # pragma: no cover (compiled)
    """total[i] += rint(values[i] * factors[s]) for i in segment s = [bounds[s], bounds[s + 1]),
    after checking -limits[s] <= values[i] <= limits[s] (False for NaN). Returns -1, or the index of
    the first value refused, with total as it was: the values were added in parts of `part` values
    on numba's threads (each value's term is its own: the split changes no bit), and on a refusal
    each part takes out the terms it added, exactly (integers in float64; rint rounds half to even,
    which is symmetric)."""
    first, n = bounds[0], bounds[-1]
    n_parts = (n - first + part - 1) // part
    refused = np.full(n_parts, -1, np.int64)
    for p in prange(n_parts):
        start = first + p * part
        refused[p] = _add_part(total, values, bounds, factors, limits, start, min(start + part, n))
    if n_parts == 0 or refused.max() < 0:
        return -1
    negated, unlimited = -factors, np.full(limits.size, np.inf, np.float32)
    for p in prange(n_parts):
        start = first + p * part
        stop = min(start + part, n) if refused[p] < 0 else refused[p]
        _add_part(total, values, bounds, negated, unlimited, start, stop)
    bad = n
    for p in range(n_parts):
        if refused[p] >= 0 and refused[p] < bad:
            bad = refused[p]
    return bad


@njit(cache=True, nogil=True)
def take_out_rounded(total, values, bounds, factors, stop):  # pragma: no cover (compiled)
    """Undo `add_rounded` for values[:stop] (values it took): the negated terms, exactly."""
    _add_part(total, values, bounds, -factors, np.full(factors.size, np.inf, np.float32), bounds[0], stop)


@njit(cache=True, nogil=True)
def first_refused(values, bounds, limits):  # pragma: no cover (compiled)
    """The index of the first value outside [-limits[s], limits[s]] (or NaN) in its segment, or -1."""
    for s in range(bounds.size - 1):
        limit = limits[s]
        for i in range(bounds[s], bounds[s + 1]):
            x = values[i]
            if not (-limit <= x and x <= limit):
                return i
    return -1


@_one_at_a_time
@njit(cache=True, nogil=True, parallel=True)
def mean_contiguous(out, first, total, bounds, grids, examples):  # pragma: no cover (compiled)
    """out[first + i] = float32(total[i] * grids[s] / examples) (numpy's rounding of the same float64
    expression: multiply, divide, cast); each value on its own, on numba's threads."""
    for s in range(bounds.size - 1):
        q = grids[s]
        for i in prange(bounds[s], bounds[s + 1]):
            out[first + i] = np.float32(total[i] * q / examples)


@njit(cache=True, nogil=True)
def mean_indexed(out, index, total, bounds, grids, examples):  # pragma: no cover (compiled)
    """out[index[i]] = float32(total[i] * grids[s] / examples)."""
    for s in range(bounds.size - 1):
        q = grids[s]
        for i in range(bounds[s], bounds[s + 1]):
            out[index[i]] = np.float32(total[i] * q / examples)


# The loops over free positions walk the ranges between references (refs is short: one per mode)
# without a branch per weight: a branch on a scattered mask is mispredicted about half the time,
# which made these loops 5x slower. A value is written at the next free place whether or not the
# weight is free, and the place advances only for a free one, so the output needs one spare slot
# past its end (`out.size >= free + 1`); references must not be frozen.


@_one_at_a_time
@njit(cache=True, nogil=True, parallel=True)
def scatter_free(out, values, frozen, refs, bounds, offsets):  # pragma: no cover (compiled)
    """out at the free positions, ascending, = values (one per free position); the rest untouched.
    In parts on numba's threads: part t covers out[bounds[t]:bounds[t + 1]], whose free positions
    take values[offsets[t]:offsets[t + 1]] (offsets: the cumulative counts of free positions)."""
    last = values.size - 1
    for t in prange(bounds.size - 1):
        j = offsets[t]
        start = bounds[t]
        r = np.searchsorted(refs, start)
        while start < bounds[t + 1]:
            stop = min(refs[r], bounds[t + 1]) if r < refs.size else bounds[t + 1]
            for i in range(start, stop):
                value = values[min(j, last)]
                free = not frozen[i]
                out[i] = value if free else out[i]
                j += free
            start = stop + 1
            r += 1


@_one_at_a_time
@njit(cache=True, nogil=True, parallel=True)
def gather_free(out, source, frozen, refs, bounds, offsets):  # pragma: no cover (compiled)
    """out[:] = source at the free positions, ascending (out: one spare slot). In parts on numba's
    threads, as `scatter_free`; a part stops writing once its own places are filled (the next
    place is the next part's)."""
    for t in prange(bounds.size - 1):
        j, end = offsets[t], offsets[t + 1]
        start = bounds[t]
        r = np.searchsorted(refs, start)
        while start < bounds[t + 1] and j < end:
            stop = min(refs[r], bounds[t + 1]) if r < refs.size else bounds[t + 1]
            for i in range(start, stop):
                if j == end:
                    break
                out[j] = source[i]
                j += not frozen[i]
            start = stop + 1
            r += 1


@njit(cache=True, nogil=True)
def count_free(frozen, refs, bounds):  # pragma: no cover (compiled)
    """counts[t] = free positions in [bounds[t], bounds[t + 1])."""
    counts = np.zeros(bounds.size - 1, dtype=np.int64)
    r = 0
    for t in range(bounds.size - 1):
        held = 0
        for i in range(bounds[t], bounds[t + 1]):
            held += not frozen[i]
        while r < refs.size and refs[r] < bounds[t + 1]:
            held -= refs[r] >= bounds[t]  # a reference is never frozen: it was counted
            r += 1
        counts[t] = held
    return counts


@_one_at_a_time
@njit(cache=True, nogil=True, parallel=True)
def online_update(a, b, theta, modes, frozen, old_mean, keep, gain, new_mean, inv_n, references):  # pragma: no cover
    """OnlineCMD's recursive least-squares step for every weight not frozen (fedcmd.cmd); computed
    for every weight and kept for the free ones (no branch per weight). With `references` (float32,
    one per mode; empty: no rebuild), each frozen weight of theta is rebuilt in the same pass:
    theta[i] = float32(a_i) * references[mode_i] + float32(b_i) (`rebuild`). Returns whether
    every value of theta (after the rebuild) is finite. On numba's threads (`prange`): each
    weight's arithmetic is its own, so the result does not depend on how they are split."""
    rebuild_frozen = references.size > 0
    bad = 0
    for i in prange(a.size):
        m = modes[i]
        free = not frozen[i]
        ai, bi = a[i], b[i]
        t = theta[i]
        if rebuild_frozen:
            value = np.float32(ai) * references[m] + np.float32(bi)
            t = t if free else value
            theta[i] = t
        bad += not np.isfinite(t)
        c = ai * old_mean[m] + bi
        e = np.float64(t) - c
        c = c + e * inv_n
        new_a = ai * keep[m] + e * gain[m]
        new_b = c - new_a * new_mean[m]
        a[i] = new_a if free else ai
        b[i] = new_b if free else bi
    return bad == 0


@njit(cache=True, nogil=True)
def rebuild(theta, a, b, modes, frozen, references):  # pragma: no cover (compiled)
    """theta[i] = float32(a_i) * references[mode_i] + float32(b_i), in float32, for frozen i."""
    for i in range(theta.size):
        value = np.float32(a[i]) * references[modes[i]] + np.float32(b[i])
        theta[i] = value if frozen[i] else theta[i]


@njit(cache=True, nogil=True)
def rebuild_at(theta, index, a, b, modes, references):  # pragma: no cover (compiled)
    """`rebuild` for the weights at `index` only."""
    for i in index:
        theta[i] = np.float32(a[i]) * references[modes[i]] + np.float32(b[i])


@njit(cache=True, nogil=True)
def coefficient_change(out, a, b, a_old, b_old, frozen, refs):  # pragma: no cover (compiled)
    """out[:] = (a_i - a_old_i)^2 + (b_i - b_old_i)^2 (float64, the baseline widened) over the free
    positions, ascending (out: one spare slot); returns how many. The square of the change c_i:
    it orders the weights as c_i does, without a square root (or hypot, 10x slower) per weight."""
    j, start = 0, 0
    for r in range(refs.size + 1):
        stop = refs[r] if r < refs.size else a.size
        for i in range(start, stop):
            x, y = a[i] - np.float64(a_old[i]), b[i] - np.float64(b_old[i])
            out[j] = x * x + y * y
            j += not frozen[i]
        start = stop + 1
    return j


@njit(cache=True, nogil=True)
def kth_smallest(values, k):  # pragma: no cover (compiled)
    """(t, ties): t, the k-th smallest (1-based) of `values` (float64, all >= 0, so their bit patterns
    order as uint64), found by four 16-bit radix passes without reordering or copying them; ties,
    how many of the values equal to t are among the k smallest."""
    bits = values.view(np.uint64)
    prefix, mask, remaining = np.uint64(0), np.uint64(0), k
    hist = np.zeros(1 << 16, dtype=np.int64)
    for shift in (48, 32, 16, 0):
        hist[:] = 0
        sh = np.uint64(shift)
        for x in bits:
            if (x & mask) == prefix:
                hist[(x >> sh) & np.uint64(0xFFFF)] += 1
        digit, below = 0, 0
        while below + hist[digit] < remaining:
            below += hist[digit]
            digit += 1
        remaining -= below
        prefix |= np.uint64(digit) << sh
        mask |= np.uint64(0xFFFF) << sh
    return np.array([prefix]).view(np.float64)[0], remaining


@njit(cache=True, nogil=True)
def select_free(chosen, change, threshold, ties, frozen, refs):  # pragma: no cover (compiled)
    """chosen[:] = the free positions (ascending) whose change (compact, as `coefficient_change`
    wrote it) is below `threshold`, and the first `ties` of those equal to it (chosen: one spare
    slot); returns how many."""
    j, w, start = 0, 0, 0
    last = change.size - 1
    for r in range(refs.size + 1):
        stop = refs[r] if r < refs.size else frozen.size
        for i in range(start, stop):
            c = change[min(j, last)]
            free = not frozen[i]
            tie = free and c == threshold and ties > 0
            take = free and (c < threshold or tie)
            chosen[w] = i
            w += take
            ties -= tie
            j += free
        start = stop + 1
    return w


@njit(cache=True, nogil=True)
def members_after(event_of, version, count):  # pragma: no cover (compiled)
    """The positions (int64, ascending) with event_of[i] > version (`count` of them: the sizes of
    the events after that store version): the weights of those events."""
    out = np.empty(count + 1, dtype=np.int64)  # one spare slot for the branch-free walk
    j = 0
    for i in range(event_of.size):
        out[j] = i
        j += event_of[i] > version
    return out[:count]


@_one_at_a_time
@njit(cache=True, nogil=True, parallel=True)
def take_coefficients(index, a, b, modes, a_out, b_out, modes_out):  # pragma: no cover (compiled)
    """a_out, b_out = float32 of a, b at index (an event's weights, ascending); modes_out = modes there."""
    for j in prange(index.size):
        i = index[j]
        a_out[j] = np.float32(a[i])
        b_out[j] = np.float32(b[i])
        modes_out[j] = modes[i]


@njit(cache=True, nogil=True)
def pack_positions(index, packed):  # pragma: no cover (compiled)
    """Set the bits of `index` in `packed` (zeros, as numpy.packbits lays a boolean row out: bit 7 of
    byte 0 is position 0)."""
    for i in index:
        packed[i >> 3] |= np.uint8(128) >> np.uint8(i & 7)


@njit(cache=True, nogil=True)
def finite(values):  # pragma: no cover (compiled)
    """Whether every value is finite."""
    for x in values:
        if not np.isfinite(x):
            return False
    return True
