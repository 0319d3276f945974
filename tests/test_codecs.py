"""Wire codecs (fedcmd.codecs): exact formats, error bounds, int8's unbiased rounding, top-k
selection and its two index encodings, error feedback, and rejection of malformed payloads."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fedcmd.codecs import CODECS, Codec, CodecError, _varint_decode, _varint_encode, describe, with_error_feedback


def vector(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def roundtrip(codec: Codec, x: np.ndarray, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    arrays = codec.encode(x, np.random.default_rng(seed))
    return arrays, codec.decode(arrays, x.size)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 4099])
def test_roundtrip_shapes_and_describe(name, n):
    codec = Codec(name, chunk=1024, fraction=0.05)
    x = vector(n, seed=n)
    arrays, decoded = roundtrip(codec, x)
    assert decoded.dtype == np.float32 and decoded.shape == (n,)
    assert describe(arrays) == (n, sum(a.nbytes for a in arrays.values()))
    assert not any(np.shares_memory(a, x) for a in arrays.values()) and not np.shares_memory(decoded, x)
    assert codec.lossless == (name == "none")
    if name == "none":
        assert list(arrays) == ["values"] and np.array_equal(decoded, x)


def test_fp16_is_the_exact_cast():
    x = np.concatenate([vector(5000, scale=100.0), vector(5000, scale=1e-6), [0.0, -0.0, 65504.0, 65519.0]]).astype(
        np.float32
    )
    arrays = Codec("fp16").encode(x)
    assert arrays["fp16"].dtype == np.float16
    assert np.array_equal(arrays["fp16"].view(np.uint16), x.astype(np.float16).view(np.uint16))
    decoded = Codec("fp16").decode(arrays, x.size)
    assert np.array_equal(decoded, x.astype(np.float16).astype(np.float32))
    normal = np.abs(x) >= 2.0**-14
    assert (np.abs(decoded - x)[normal] <= 2.0**-11 * np.abs(x)[normal]).all()
    with pytest.raises(ValueError, match="fp16"):
        Codec("fp16").encode(np.array([65520.0], np.float32))  # would round to inf


def test_bf16_rounds_to_nearest_even_like_torch():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 3.3e38)]
    # Ties (low 16 bits exactly 0x8000) and their neighbours, around both parities of bit 16.
    ties = (np.arange(64, dtype=np.uint32) << 16) + np.uint32(0x3F800000)
    x = np.concatenate(
        [x, *((ties + d).view(np.float32) for d in (0x7FFF, 0x8000, 0x8001)), [0.0, -0.0, 1e-40]]
    ).astype(np.float32)
    arrays = Codec("bf16").encode(x)
    reference = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert arrays["bf16"].dtype == np.uint16 and np.array_equal(arrays["bf16"], reference)
    decoded = Codec("bf16").decode(arrays, x.size)
    assert np.array_equal(decoded, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    assert (np.abs(decoded - x)[normal] <= 2.0**-8 * np.abs(x)[normal]).all()


@pytest.mark.parametrize("n, chunk", [(1000, 1024), (5000, 1024), (4096, 1024), (333, 7), (10, 1)])
def test_int8_error_bound_and_determinism(n, chunk):
    codec = Codec("int8", chunk=chunk)
    x = vector(n) * np.repeat(np.logspace(-4, 2, -(-n // chunk)), chunk)[:n].astype(np.float32)
    zero = n > chunk
    if zero:
        x[:chunk] = 0.0  # an all-zero chunk: scale 0, decodes to 0
    arrays, decoded = roundtrip(codec, x, seed=3)
    scales = arrays["scales"]
    assert scales.shape == (-(-n // chunk),) and (scales[0] == 0) == zero and (decoded[:chunk] == 0).all() == zero
    per_value = np.repeat(scales, chunk)[:n]
    assert (np.abs(decoded - x) <= per_value * (1 + 1e-6)).all()
    assert np.abs(arrays["int8"]).max() <= 127
    again = codec.encode(x, np.random.default_rng(3))
    assert all(np.array_equal(again[key], arrays[key]) for key in arrays)
    if chunk > 1:  # with one value per chunk every q is +-127 or 0, whatever the seed
        assert not np.array_equal(codec.encode(x, np.random.default_rng(4))["int8"], arrays["int8"])


def test_int8_is_unbiased():
    codec, draws = Codec("int8", chunk=64), 2000
    x = vector(256, seed=5)
    rng = np.random.default_rng(6)
    decoded = np.stack([codec.decode(codec.encode(x, rng), x.size) for _ in range(draws)]).astype(np.float64)
    stderr = decoded.std(axis=0) / math.sqrt(draws) + 1e-12
    z = (decoded.mean(axis=0) - x) / stderr
    assert np.abs(z).max() < 5 and abs(z.mean()) < 5 / math.sqrt(x.size)


def test_int8_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        Codec("int8").encode(vector(10))


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 1.0])
def test_topk_keeps_the_k_largest(fraction):
    x = vector(10_000, seed=7)
    codec = Codec("topk", fraction=fraction)
    arrays, decoded = roundtrip(codec, x)
    k = math.ceil(fraction * x.size)
    expected = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    assert np.array_equal(np.flatnonzero(decoded), expected)
    assert np.array_equal(decoded[expected], x[expected])
    assert arrays["topk-values"].dtype == np.float32 and arrays["topk-values"].size == k


def test_topk_ties_go_to_the_lower_index_and_k_reads_the_decimal():
    x = np.array([1, -3, 3, 0, 3, -3, 2, 0, 0, 0] * 3, np.float32)
    codec = Codec("topk", fraction=0.1)  # 0.1 * 30 is 3.0000000000000004 in binary: k must be 3
    decoded = codec.decode(codec.encode(x), x.size)
    assert np.array_equal(np.flatnonzero(decoded), [1, 2, 4])
    zeros = np.zeros(50, np.float32)
    assert np.array_equal(Codec("topk", fraction=0.1).encode(zeros)["topk-values"], np.zeros(5, np.float32))
    assert describe(Codec("topk", fraction=0.1).encode(zeros))[0] == 50


def test_topk_sample_fallback_on_periodic_input():
    # Every 32nd value large: the strided sample sees only those, so its threshold keeps too few.
    x = np.ones(32 * 1000, np.float32)
    x[::32] = 5.0
    x[5] = 4.0
    decoded = Codec("topk", fraction=0.05).decode(Codec("topk", fraction=0.05).encode(x), x.size)
    expected = np.sort(np.argsort(-np.abs(x), kind="stable")[: math.ceil(0.05 * x.size)])
    assert np.array_equal(np.flatnonzero(decoded), expected)


def test_topk_picks_the_smaller_index_encoding():
    x = vector(100_000, seed=8)
    sparse = Codec("topk", fraction=0.01).encode(x)
    dense = Codec("topk", fraction=0.5).encode(x)
    assert set(sparse) == {"topk-values", "topk-gaps"} and set(dense) == {"topk-values", "topk-mask"}
    assert sparse["topk-gaps"].nbytes < x.size // 8 + 1 and dense["topk-mask"].nbytes == x.size // 8 + 1
    for arrays, fraction in ((sparse, 0.01), (dense, 0.5)):
        assert describe(arrays) == (x.size, sum(a.nbytes for a in arrays.values()))
        decoded = Codec("topk", fraction=fraction).decode(arrays, x.size)
        assert np.count_nonzero(decoded) == math.ceil(fraction * x.size)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 1001])
def test_topk_both_index_encodings_roundtrip(n):
    x = vector(n, seed=n)
    codec = Codec("topk", fraction=0.5)
    arrays = codec.encode(x)
    index = np.flatnonzero(codec.decode(arrays, n) != 0)
    mask = np.zeros(n + 1, bool)
    mask[index] = True
    mask[n] = True
    gaps = _varint_encode(np.diff(index, prepend=-1, append=n))
    values = {"topk-values": arrays["topk-values"]}
    for form in ({"topk-mask": np.packbits(mask, bitorder="little")}, {"topk-gaps": gaps}):
        payload = values | form
        assert describe(payload)[0] == n
        assert np.array_equal(codec.decode(payload, n), codec.decode(arrays, n))


def test_varints():
    values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**35 + 5, 2**63 - 1], np.int64)
    stream = _varint_encode(values)
    assert stream[:3].tolist() == [0, 1, 127] and stream[3:5].tolist() == [0x80, 0x01]
    assert len(stream) == 1 + 1 + 1 + 2 + 2 + 2 + 3 + 6 + 9
    assert np.array_equal(_varint_decode(stream), values)
    assert _varint_decode(np.zeros(0, np.uint8)).size == 0


@pytest.mark.parametrize("name", CODECS)
def test_error_feedback_conserves_the_updates(name):
    codec = Codec(name, chunk=100, fraction=0.05)
    rng = np.random.default_rng(9)
    residual = np.zeros(1000, np.float32)
    sent, total = np.zeros(1000), np.zeros(1000)
    for step in range(10):
        update = vector(1000, seed=step, scale=10.0**-step % 7)
        arrays, decoded, new_residual = with_error_feedback(codec, update, residual, rng)
        u = update + residual
        assert np.array_equal(new_residual, u - decoded)
        assert np.array_equal(decoded, codec.decode(arrays, u.size))
        if name == "int8":  # q * scale and x differ in scale, so u - decoded is rounded
            assert np.allclose(decoded + new_residual, u, rtol=0, atol=np.abs(u).max() * 2.0**-23)
        else:
            assert np.array_equal(decoded + new_residual, u)
        sent += decoded
        total += update
        residual = new_residual
    assert np.allclose(sent + residual, total, rtol=0, atol=1e-5 * np.abs(total).max())
    if name == "none":
        assert not residual.any()


def test_encode_rejects_bad_input():
    for name in CODECS:
        codec = Codec(name)
        for bad in (
            np.array([1.0, np.nan], np.float32),
            np.array([np.inf], np.float32),
            np.zeros(3, np.float64),
            np.zeros((2, 2), np.float32),
            [1.0],
        ):
            with pytest.raises(ValueError):
                codec.encode(bad, np.random.default_rng(0))


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("name", {"name": "gzip"}),
        ("chunk", {"chunk": 0}),
        ("chunk", {"chunk": 1.5}),
        ("fraction", {"fraction": 0.0}),
        ("fraction", {"fraction": 1.5}),
        ("fraction", {"fraction": math.nan}),
    ],
)
def test_config_is_validated(field, kwargs):
    with pytest.raises(ValueError, match=field):
        Codec(**kwargs)


def _payload(name: str, n: int = 100, fraction: float = 0.05) -> dict[str, np.ndarray]:
    x = vector(n, seed=11)
    return Codec(name, chunk=16, fraction=fraction).encode(x, np.random.default_rng(0))


def _gaps_payload(stream: list[int], k: int) -> dict[str, np.ndarray]:
    return {"topk-values": np.ones(k, np.float32), "topk-gaps": np.array(stream, np.uint8)}


def _edit(name: str, key: str, change, fraction: float = 0.05) -> dict[str, np.ndarray]:
    arrays = _payload(name, fraction=fraction)
    arrays[key] = change(arrays[key].copy())
    return arrays


def _set(index, value):
    def change(a):
        a[index] = value
        return a

    return change


BAD = {  # (codec, payload, message fragment); payloads of n = 100, chunk 16, fraction 0.05 (k = 5)
    "scales wrong length": ("int8", _edit("int8", "scales", lambda a: a[:-1]), "scales has 6 values"),
    "NaN scale": ("int8", _edit("int8", "scales", _set(2, np.nan)), "NaN"),
    "negative scale": ("int8", _edit("int8", "scales", _set(2, -1.0)), "negative"),
    "huge scale": ("int8", _edit("int8", "scales", _set(2, 3e38)), "overflows"),
    "int8 -128": ("int8", _edit("int8", "int8", _set(0, -128)), "-128"),
    "int16 q": ("int8", _edit("int8", "int8", lambda a: a.astype(np.int16)), "int8 must be int8"),
    "float64 values": ("none", _edit("none", "values", lambda a: a.astype(np.float64)), "float32"),
    "big-endian values": ("none", _edit("none", "values", lambda a: a.astype(">f4")), "float32"),
    "2-D values": ("none", _edit("none", "values", lambda a: a.reshape(10, 10)), "1-D"),
    "list values": ("none", _edit("none", "values", lambda a: a.tolist()), "numpy array"),
    "wrong length": ("fp16", _edit("fp16", "fp16", lambda a: a[:99]), "99 values, expected 100"),
    "missing key": ("int8", {"int8": _payload("int8")["int8"]}, "missing keys ['scales']"),
    "extra key": ("bf16", _payload("bf16") | {"junk": np.zeros(1)}, "unexpected keys ['junk']"),
    "other codec": ("fp16", _payload("bf16"), "missing keys ['fp16']"),
    "NaN in fp16": ("fp16", _edit("fp16", "fp16", _set(3, np.nan)), "NaN"),
    "inf in fp16": ("fp16", _edit("fp16", "fp16", _set(3, np.inf)), "NaN or Inf"),
    "inf in bf16": ("bf16", _edit("bf16", "bf16", _set(3, 0x7F80)), "NaN or Inf"),
    "NaN in none": ("none", _edit("none", "values", _set(3, np.nan)), "NaN"),
    "inf in topk values": ("topk", _edit("topk", "topk-values", _set(0, np.inf)), "NaN or Inf"),
    "k too small": ("topk", _edit("topk", "topk-values", lambda a: a[:-1]), "k = ceil"),
    "two index arrays": ("topk", _payload("topk") | {"topk-mask": np.zeros(13, np.uint8)}, "exactly one"),
    "gap index out of range": ("topk", _gaps_payload([1, 1, 1, 1, 120, 1], 5), "out of range"),
    "gaps end early": ("topk", _gaps_payload([1, 1, 1, 1, 1, 1], 5), "describe 5 values, expected 100"),
    "non-ascending gap": ("topk", _gaps_payload([1, 0, 1, 1, 1, 97], 5), "not strictly ascending"),
    "gap count": ("topk", _gaps_payload([1, 1, 1, 98], 5), "select 3 values"),
    "truncated varint": ("topk", _gaps_payload([1, 1, 1, 1, 1, 0x80], 5), "truncated"),
    "overlong varint": ("topk", _gaps_payload([0x81, 0x00, 1, 1, 1, 96], 5), "overlong"),
    "varint too long": ("topk", _gaps_payload([0xFF] * 9 + [0x01, 1, 1, 1, 1, 95], 5), "longer than 9"),
    "mask without sentinel": ("topk", _edit("topk", "topk-mask", _set(-1, 0), fraction=0.5), "sentinel"),
    "mask bits past sentinel": ("topk", _edit("topk", "topk-mask", _set(-1, 0x30), fraction=0.5), "sentinel"),
    "mask wrong bytes": ("topk", _edit("topk", "topk-mask", lambda a: a[:-1], fraction=0.5), "topk-mask has 12"),
    "mask wrong count": ("topk", _edit("topk", "topk-mask", _set(0, 0xFF), fraction=0.5), "topk"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_payloads_are_rejected(case):
    name, arrays, message = BAD[case]
    codec = Codec(name, chunk=16, fraction=0.5 if "mask" in case else 0.05)
    with pytest.raises(CodecError, match=re.escape(message)):
        codec.decode(arrays, 100)


def test_describe_never_raises():
    assert describe({"weights": np.zeros(10, np.float32)}) == (0, 40)
    assert describe({"values": np.zeros((3, 4), np.int32)}) == (12, 48)  # the uncompressed format, any dtype
    assert describe({"topk-values": np.zeros(1, np.float32), "topk-mask": np.zeros(2, np.uint8)}) == (0, 6)
    assert describe({"topk-values": np.zeros(1, np.float32), "topk-gaps": np.array([0x80], np.uint8)}) == (0, 5)
    assert describe({"fp16": np.zeros(4, np.float32)}) == (0, 16)
    assert describe({"int8": np.zeros(4, np.int8), "scales": "x"}) == (0, 0)  # not arrays: no size either
    assert describe("garbage") == (0, 0)
