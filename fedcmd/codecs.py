"""Wire codecs for federated payloads (issue 11): how a float32 vector travels as arrays.

The protocol encodes flat float32 vectors, usually updates (new values minus what the receiver
already holds), into a few named arrays that go into one Flower ArrayRecord, and decodes them on the
other side. The key set names the format, so `describe` can size any payload without its codec:

- none: {"values": float32[n]}, exact (what fedcmd has always sent).
- fp16: {"fp16": float16[n]}, exactly `values.astype(np.float16)` (IEEE round to nearest even).
  Relative error <= 2^-11 in fp16's normal range; |x| < 6.1e-5 loses relative precision and
  |x| < 3e-8 flushes to 0. |x| >= 65520 would round to inf: encode refuses it (ValueError).
- bf16: {"bf16": uint16[n]}, the top 16 bits of the float32 after rounding to nearest even (the
  bits torch.bfloat16 holds); relative error <= 2^-8 over float32's whole range, decode is exact
  (bits << 16).
- int8: {"int8": int8[n], "scales": float32[ceil(n / chunk)]}. Per chunk of `chunk` consecutive
  values, scale = max|x| / 127 (0 for an all-zero chunk) and q = floor(x / scale + u) clipped to
  [-127, 127], u ~ U[0, 1) per value. Stochastic rounding rather than nearest: E[q * scale] = x, so
  the receiver's error is zero-mean noise that averages out over clients and rounds instead of a
  bias that accumulates; |q * scale - x| <= scale. The caller passes the generator (seeded from run,
  round, direction, client) so reruns encode the same bytes. u is float32 (24 random bits), so the
  rounding is unbiased to 2^-24 of a step, below float32's own rounding of x / scale + u.
- topk: {"topk-values": float32[k]} plus one index array, k = ceil(fraction * n). Keeps the k
  entries of largest |x|, ties broken towards the lower index (so equal input gives equal output);
  the values go exactly as given, every other entry decodes to 0. The indices travel as whichever
  of two self-describing forms is smaller (the mask on a tie):
  "topk-mask": uint8[n // 8 + 1], bit i (little-endian bit order within a byte) set when entry i is
  kept, plus a sentinel bit at position n, the highest bit set: n = 8 * (bytes - 1) + position of
  the last byte's highest set bit.
  "topk-gaps": uint8 LEB128 varints of the k + 1 gaps d_0 = i_0 + 1, d_j = i_j - i_(j-1), and a
  final d_k = n - i_(k-1) (so sum(d) = n + 1). Every gap is >= 1 (a 0 would repeat an index),
  minimal (no trailing 0x80 groups) and at most 9 bytes (63 bits). Sparse selections (average gap
  under ~2^7) cost about 1 byte per index against n / 8 for the mask.

Every decode checks what a lying or broken sender can get wrong (keys, dtypes, shapes, lengths,
scales, index streams, k, non-finite values) and raises CodecError naming it. Encode expects a 1-D
float32 array of finite values (ValueError otherwise). Neither aliases its input: payloads and
decoded vectors are fresh arrays the caller owns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

CODECS = ("none", "fp16", "bf16", "int8", "topk")

# The arrays of each format; topk's index array is one of two.
_KEYS = {"none": {"values"}, "fp16": {"fp16"}, "bf16": {"bf16"}, "int8": {"int8", "scales"}}
_TOPK_INDEX_KEYS = ("topk-mask", "topk-gaps")
_FP16_LIMIT = 65520.0  # the smallest |x| that float16 rounds to inf
_BF16_LIMIT = float(np.array(0x7F7F8000, np.uint32).view(np.float32))  # same for bfloat16: (2 - 2^-8) * 2^127
_VARINT_MAX_BYTES = 9  # 63 bits: every gap of a vector numpy can index
_INT8_BLOCK = 1 << 16  # values per pass of int8's encode loop: its temporaries stay in cache
_SAMPLE_STEP = 32  # topk estimates its threshold from every 32nd |x|


class CodecError(ValueError):
    """An encoded payload that cannot be decoded as claimed (malformed, lying sender)."""


@dataclass(frozen=True)
class Codec:
    """A wire format and its parameters; `encode` and `decode` are exact inverses for "none"."""

    name: str = "none"  # one of CODECS
    chunk: int = 1024  # int8: values per scale (config key codec-chunk)
    fraction: float = 0.01  # topk: share of values kept, k = ceil(fraction * n) (config key topk-fraction)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec name must be one of {CODECS}, got {self.name!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
            raise ValueError(f"codec chunk must be a positive integer, got {self.chunk!r}")
        if (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, (int, float, np.floating))
            or not 0 < self.fraction <= 1
        ):
            raise ValueError(f"codec fraction must be a number in (0, 1], got {self.fraction!r}")

    @property
    def lossless(self) -> bool:
        return self.name == "none"

    def _topk_count(self, n: int) -> int:
        """k = ceil(fraction * n), with `fraction` read as its shortest decimal (0.1 is 1/10), so
        that 0.1 of 30 values is 3, not the 4 that binary 0.1 * 30 = 3.0000000000000004 would give."""
        return math.ceil(Fraction(repr(float(self.fraction))) * n)

    # ------------------------------------------------------------------------------------ encode

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """The arrays that carry `values` (1-D float32, finite); `rng` drives int8's rounding and is
        required for it (ignored by the other codecs)."""
        if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
            raise ValueError(f"codecs encode 1-D float32 arrays, got {_shape_of(values)}")
        if self.name == "int8" and rng is None:
            raise ValueError("int8 needs rng for its stochastic rounding (seeded by the caller)")
        values = np.ascontiguousarray(values)
        if self.name == "none":
            _check_range(values, math.inf, "none")
            return {"values": values.copy()}
        if self.name == "fp16":
            _check_range(values, _FP16_LIMIT, "fp16")
            return {"fp16": _torch_view(values).to(torch.float16).numpy()}
        if self.name == "bf16":
            _check_range(values, _BF16_LIMIT, "bf16")
            return {"bf16": _torch_view(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)}
        if self.name == "int8":
            return self._encode_int8(values, rng)
        return self._encode_topk(values)

    def _encode_int8(self, x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n, c = x.size, self.chunk
        full = n // c
        scales = np.empty(-(-n // c), np.float32)
        body = x[: full * c].reshape(full, c)
        np.maximum(body.max(axis=1), -body.min(axis=1), out=scales[:full])
        if full < scales.size:
            tail = x[full * c :]
            scales[full] = np.maximum(tail.max(), -tail.min())
        if not np.isfinite(scales).all():  # max and min propagate NaN
            raise ValueError("int8 cannot encode NaN or Inf")
        scales /= np.float32(127)
        # A zero scale (all-zero chunk, or max|x| < 127 * 1.4e-45 underflowing) divides by 1: q = 0.
        divisor = np.where(scales > 0, scales, np.float32(1))
        q = np.empty(n, np.int8)
        size = min(n, max(c, _INT8_BLOCK // c * c))
        u, y = np.empty(size, np.float32), np.empty(size, np.float32)
        for start, stop, first in _int8_blocks(n, c):
            rows, m = -(-(stop - start) // c), stop - start
            ub, yb = u[:m], y[:m].reshape(rows, m // rows)
            rng.random(dtype=np.float32, out=ub)
            np.divide(x[start:stop].reshape(yb.shape), divisor[first : first + rows, None], out=yb)
            yb += ub.reshape(yb.shape)
            np.floor(yb, out=yb)
            np.clip(yb, -127, 127, out=yb)
            q[start:stop] = y[:m]
        return {"int8": q, "scales": scales}

    def _encode_topk(self, x: np.ndarray) -> dict[str, np.ndarray]:
        n = x.size
        k = self._topk_count(n)
        if n == 0:
            return {"topk-values": np.empty(0, np.float32), "topk-mask": np.ones(1, np.uint8)}
        a = np.abs(x)
        if not np.isfinite(a.max()):
            raise ValueError("topk cannot encode NaN or Inf")
        index = _top_indices(a, k)
        gaps = np.diff(index, prepend=-1, append=n)
        out = {"topk-values": x[index]}
        if _varint_lengths(gaps).sum() < n // 8 + 1:
            out["topk-gaps"] = _varint_encode(gaps)
        else:
            mask = np.zeros(n + 1, bool)
            mask[index] = True
            mask[n] = True  # the sentinel
            out["topk-mask"] = np.packbits(mask, bitorder="little")
        return out

    # ------------------------------------------------------------------------------------ decode

    def decode(self, arrays: Mapping[str, np.ndarray], length: int) -> np.ndarray:
        """The float32 vector of `length` values that `arrays` encode; CodecError if they are not a
        valid payload of this codec for that length."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length must be a non-negative integer, got {length!r}")
        length = int(length)
        if not isinstance(arrays, Mapping):
            raise CodecError(f"{self.name} payload must be a mapping of arrays, got {type(arrays).__name__}")
        try:
            self._check_keys(arrays)
            if self.name == "int8":  # finite by its scale checks
                return self._decode_int8(arrays, length)
            if self.name == "topk":  # checks its values
                return self._decode_topk(arrays, length)
            if self.name == "none":
                out = _vector(arrays, "values", np.float32, length).copy()
            elif self.name == "fp16":
                out = _torch_view(_vector(arrays, "fp16", np.float16, length)).float().numpy()
            else:
                bits = _vector(arrays, "bf16", np.uint16, length).astype(np.uint32)
                bits <<= 16
                out = bits.view(np.float32)
            if not _finite(out):
                raise CodecError(f"{self.name} payload decodes to NaN or Inf")
            return out
        except CodecError:
            raise
        except (ValueError, TypeError, IndexError, OverflowError) as err:  # a check missed: still the sender's fault
            raise CodecError(f"malformed {self.name} payload: {err}") from err

    def _check_keys(self, arrays: Mapping[str, np.ndarray]) -> None:
        keys = set(arrays)
        if self.name == "topk":
            index_keys = keys & set(_TOPK_INDEX_KEYS)
            if len(index_keys) != 1:
                raise CodecError(
                    f"topk payload needs exactly one of {list(_TOPK_INDEX_KEYS)}, got {sorted(index_keys)}"
                )
            expected = {"topk-values"} | index_keys
        else:
            expected = _KEYS[self.name]
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(map(str, keys - expected))
            raise CodecError(f"{self.name} payload: missing keys {missing}, unexpected keys {extra}")

    def _decode_int8(self, arrays: Mapping[str, np.ndarray], length: int) -> np.ndarray:
        q = _vector(arrays, "int8", np.int8, length)
        c = self.chunk
        scales = _vector(arrays, "scales", np.float32, -(-length // c), f"ceil({length} / chunk {c})")
        if not np.isfinite(scales).all():
            raise CodecError("int8 scales hold NaN or Inf")
        if (scales < 0).any():
            raise CodecError("int8 scales hold a negative scale")
        with np.errstate(over="ignore"):
            too_large = not np.isfinite(scales * np.float32(127)).all()
        if too_large:
            raise CodecError("int8 scale too large: 127 * scale overflows float32")
        if length and q.min() == -128:
            raise CodecError("int8 values must lie in [-127, 127], got -128")
        out = np.empty(length, np.float32)
        full = length // c
        np.multiply(q[: full * c].reshape(full, c), scales[:full, None], out=out[: full * c].reshape(full, c))
        np.multiply(q[full * c :], scales[full:], out=out[full * c :])
        return out

    def _decode_topk(self, arrays: Mapping[str, np.ndarray], length: int) -> np.ndarray:
        k = self._topk_count(length)
        values = _vector(arrays, "topk-values", np.float32, k, f"k = ceil({self.fraction} * {length})")
        if "topk-mask" in arrays:
            index = _mask_indices(_vector(arrays, "topk-mask", np.uint8, length // 8 + 1, f"{length} // 8 + 1"), length)
        else:
            index = _gap_indices(_vector(arrays, "topk-gaps", np.uint8), length)
        if index.size != k:
            raise CodecError(f"topk indices select {index.size} values, topk-values holds {k}")
        if not _finite(values):
            raise CodecError("topk-values hold NaN or Inf")
        out = np.zeros(length, np.float32)
        out[index] = values
        return out


def describe(arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(dense values the payload decodes to, payload bytes) of ANY codec's arrays, without knowing
    the codec's config (the volume accountant calls it on every array record it counts). Must not
    raise on garbage: for arrays it cannot read return (0, total nbytes).

    The key set names the format. {"values": array} counts its size whatever its dtype (strategies
    also send int32 indices and packed masks that way); the other formats must have their dtypes,
    1-D arrays and a readable index stream. n comes from the arrays alone: the value array's length,
    or topk's mask sentinel or gap sum.
    """
    try:
        total = sum(int(a.nbytes) for a in arrays.values())
    except Exception:  # not a mapping of arrays at all
        return 0, 0
    try:
        return _dense_length(arrays), total
    except Exception:  # whatever garbage makes numpy raise: unreadable
        return 0, total


def with_error_feedback(
    codec: Codec, update: np.ndarray, residual: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(arrays to send, decoded values the receiver gets, new residual): u = update + residual;
    arrays = encode(u); decoded = decode(arrays); new residual = u - decoded.

    What a lossy codec drops this round is carried into the next, so over rounds the receiver gets
    the sum of the updates up to the last residual (and float32 rounding of the two additions).
    """
    if update.shape != residual.shape:
        raise ValueError(f"update {update.shape} and residual {residual.shape} differ in shape")
    u = update + residual
    arrays = codec.encode(u, rng)
    decoded = codec.decode(arrays, u.size)
    return arrays, decoded, u - decoded


# ---------------------------------------------------------------------------------------- helpers


def _shape_of(values: object) -> str:
    if isinstance(values, np.ndarray):
        return f"{values.dtype} array of shape {values.shape}"
    return type(values).__name__


def _check_range(values: np.ndarray, limit: float, name: str) -> None:
    """ValueError unless every value is finite and below `limit` (maybe inf) in magnitude: min and
    max are two vectorised passes without a temporary, and NaN propagates through both."""
    if values.size and not (-limit < values.min() and values.max() < limit):  # False for NaN
        raise ValueError(f"{name} cannot encode NaN, Inf or |x| >= {limit:g}")


def _finite(values: np.ndarray) -> bool:
    """Whether every value is finite (min and max, as in `_check_range`)."""
    return not values.size or bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def _torch_view(values: np.ndarray) -> torch.Tensor:
    """A tensor sharing `values` (copied first if read-only, which torch.from_numpy rejects)."""
    return torch.from_numpy(values if values.flags.writeable else values.copy())


def _int8_blocks(n: int, chunk: int) -> list[tuple[int, int, int]]:
    """(start, stop, first chunk) of whole chunks of about _INT8_BLOCK values, then the short last chunk."""
    full = n // chunk * chunk
    step = max(1, _INT8_BLOCK // chunk) * chunk
    blocks = [(s, min(s + step, full), s // chunk) for s in range(0, full, step)]
    if full < n:
        blocks.append((full, n, full // chunk))
    return blocks


def _vector(
    arrays: Mapping[str, np.ndarray], key: str, dtype: type, length: int | None = None, expected: str = "length"
) -> np.ndarray:
    """arrays[key], checked to be a 1-D array of `dtype` (byte order included) and `length` values."""
    a = arrays[key]
    if not isinstance(a, np.ndarray):
        raise CodecError(f"{key} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise CodecError(f"{key} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != 1:
        raise CodecError(f"{key} must be 1-D, got shape {a.shape}")
    if length is not None and a.size != length:
        raise CodecError(f"{key} has {a.size} values, expected {length} ({expected})")
    return a


def _dense_length(arrays: Mapping[str, np.ndarray]) -> int:
    """n of a payload in any format, from its arrays alone; CodecError if unreadable."""
    keys = set(arrays)
    if keys == {"values"}:
        return int(arrays["values"].size)
    if keys == {"fp16"}:
        return _vector(arrays, "fp16", np.float16).size
    if keys == {"bf16"}:
        return _vector(arrays, "bf16", np.uint16).size
    if keys == {"int8", "scales"}:
        _vector(arrays, "scales", np.float32)
        return _vector(arrays, "int8", np.int8).size
    if keys == {"topk-values", "topk-mask"}:
        _vector(arrays, "topk-values", np.float32)
        return _mask_length(_vector(arrays, "topk-mask", np.uint8))
    if keys == {"topk-values", "topk-gaps"}:
        _vector(arrays, "topk-values", np.float32)
        gaps = _varint_decode(_vector(arrays, "topk-gaps", np.uint8))
        if gaps.size == 0 or int(gaps.max()) * gaps.size >= 1 << 63:
            raise CodecError("topk-gaps: no gaps, or gaps too large to add up")
        return int(gaps.sum()) - 1
    raise CodecError(f"no codec has the arrays {sorted(map(str, keys))}")


def _mask_length(mask: np.ndarray) -> int:
    """n of a topk-mask: the position of its sentinel, the highest set bit."""
    if mask.size == 0 or mask[-1] == 0:
        raise CodecError("topk-mask has no sentinel bit in its last byte")
    return 8 * (mask.size - 1) + int(mask[-1]).bit_length() - 1


def _mask_indices(mask: np.ndarray, length: int) -> np.ndarray:
    """The ascending indices a topk-mask of `length` values selects (its byte count is checked)."""
    last = int(mask[-1])
    if last >> (length % 8) != 1:
        raise CodecError(f"topk-mask must end with its sentinel bit at position {length}, last byte is {last:#04x}")
    return np.flatnonzero(np.unpackbits(mask, count=length, bitorder="little"))


def _gap_indices(stream: np.ndarray, length: int) -> np.ndarray:
    """The ascending indices a topk-gaps stream of `length` values selects."""
    gaps = _varint_decode(stream)
    if gaps.size == 0:
        raise CodecError("topk-gaps is empty: it needs at least the final gap")
    if gaps.min() == 0:
        raise CodecError("topk-gaps holds a 0 gap: indices not strictly ascending")
    if gaps.max() > length + 1:  # also keeps the sum below overflow
        raise CodecError(f"topk-gaps holds a gap of {int(gaps.max())}: index out of range for length {length}")
    ends = np.cumsum(gaps)
    if ends.size > 1 and ends[-2] > length:
        raise CodecError(f"topk-gaps index {int(ends[-2]) - 1} out of range for length {length}")
    if ends[-1] != length + 1:
        raise CodecError(f"topk-gaps describe {int(ends[-1]) - 1} values, expected {length}")
    return ends[:-1] - 1


def _top_indices(a: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest of `a` (1 <= k <= a.size, no NaN), ties broken towards
    the lower index.

    The k-th largest value comes from a candidate set rather than a partition of all of `a`: a
    threshold a little below it, taken from every _SAMPLE_STEP-th value, keeps somewhat more than k
    candidates, and a partition of those finds it exactly (a third of the time of a full partition
    at 11M values). A sample that misses (fewer than k candidates, e.g. periodic input) falls back to
    the full partition, so the result never depends on the sample.
    """
    n = a.size
    sample = a[::_SAMPLE_STEP]
    expected = k * sample.size / n  # sample values at or above the k-th largest, on average
    rank = math.ceil(expected + 4 * math.sqrt(expected) + 4)  # 4 standard deviations of slack
    candidates = None
    if rank <= sample.size // 2:
        candidates = np.flatnonzero(a >= np.partition(sample, sample.size - rank)[sample.size - rank])
    if candidates is not None and candidates.size >= k:
        values = a[candidates]
        threshold = np.partition(values, values.size - k)[values.size - k]  # the k-th largest
        index = candidates[values >= threshold]
    else:
        threshold = np.partition(a, n - k)[n - k]
        index = np.flatnonzero(a >= threshold)
    if index.size > k:  # ties at the threshold: drop the highest indices among them
        ties = np.flatnonzero(a[index] == threshold)
        keep = np.ones(index.size, bool)
        keep[ties[k - index.size :]] = False
        index = index[keep]
    return index


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of each value (int64, >= 0): 1 + the number of 7-bit steps it needs."""
    lengths = np.ones(values.size, np.int64)
    for shift in range(7, 7 * _VARINT_MAX_BYTES, 7):
        more = values >= 1 << shift
        if not more.any():
            break
        lengths += more
    return lengths


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of int64 values in [0, 2^63), vectorised: byte j of every value that has one,
    for j = 0, 1, ... (gaps are mostly one byte, so the passes after the first are short)."""
    lengths = _varint_lengths(values)
    if lengths.size == 0 or lengths.max() == 1:
        return values.astype(np.uint8)
    out = np.empty(int(lengths.sum()), np.uint8)
    starts = np.cumsum(lengths) - lengths
    out[starts] = (values & 0x7F).astype(np.uint8) | ((lengths > 1).view(np.uint8) << 7)
    which, byte = np.flatnonzero(lengths > 1), 1
    while which.size:
        more = lengths[which] > byte + 1
        out[starts[which] + byte] = ((values[which] >> 7 * byte) & 0x7F).astype(np.uint8) | (more.view(np.uint8) << 7)
        which, byte = which[more], byte + 1
    return out


def _varint_decode(stream: np.ndarray) -> np.ndarray:
    """int64 values of an unsigned LEB128 stream (uint8), vectorised like `_varint_encode`;
    CodecError if truncated (last byte continues), overlong (a non-minimal trailing 0 byte) or a
    varint longer than _VARINT_MAX_BYTES (so every value is below 2^63)."""
    if stream.size and stream[-1] & 0x80:
        raise CodecError("topk-gaps varint stream truncated: its last byte continues")
    last = stream < 0x80
    if last.all():  # every varint one byte
        return stream.astype(np.int64)
    ends = np.flatnonzero(last)
    starts = np.empty_like(ends)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    lengths = ends - starts + 1
    which = np.flatnonzero(lengths > 1)
    if lengths[which].max() > _VARINT_MAX_BYTES:
        raise CodecError(f"topk-gaps holds a varint longer than {_VARINT_MAX_BYTES} bytes")
    if (stream[ends[which]] == 0).any():
        raise CodecError("topk-gaps holds an overlong varint (a trailing 0 byte)")
    values = (stream[starts] & 0x7F).astype(np.int64)
    byte = 1
    while which.size:
        values[which] |= (stream[starts[which] + byte] & 0x7F).astype(np.int64) << 7 * byte
        which, byte = which[lengths[which] > byte + 1], byte + 1
    return values
