"""The wire vocabulary both sides of every strategy share: dense vectors as records, the codecs'
payloads, and the error a malformed record raises.

A model travels as flat float32 vectors, one `values` array per record (`vector_record`); under a
lossy wire codec (`codec-up`, `codec-down`: `fedcmd.codecs`) a dense payload is the codec's arrays
of the change from what the receiver holds (`encoded_record`, `read_encoded`). The server
(`strategies/`) and the clients (`clients/`) import this module, never each other; algorithm
specific records live in `fedcmd/protocols/<algorithm>.py`.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedcmd.codecs import Codec, CodecError

# The dense value payloads, which travel through the wire codecs (`codec-up`, `codec-down`).
PAYLOAD_KEYS = ("weights", "references", "buffers")
DIRECTIONS = ("up", "down")


class ReplyError(ValueError):
    """A record that is not what the protocol says. In a client's reply: the reply is rejected and
    counted, the model is untouched. In a train message: the client answers with an error."""


def numpy_array(values: np.ndarray) -> Array:
    """A Flower Array of `values`, built with one copy: the .npy bytes `Array(values)` would make
    (`np.save`), without its growing buffer and final copy (4x faster on a 45 MB model)."""
    values = np.ascontiguousarray(values)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join([header.getvalue(), memoryview(values.reshape(-1)).cast("B")])
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=data)


HEADER_LIMIT = 1 << 16  # bytes read for a .npy header (numpy writes ~128; version 2 allows more: refused)


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of an Array's .npy bytes (no copy, unlike `Array.numpy()`); the same
    checks as `np.load` without pickles: ValueError if the bytes are not one plain array."""
    if array.stype != "numpy.ndarray":
        raise ValueError(f"not a numpy array: stype {array.stype!r}")
    data = array.data
    view = memoryview(data)
    if len(view) < 10:
        raise ValueError("not a .npy array: too short")
    # The header's length is in its first bytes; the header itself (~128 bytes) is parsed once per
    # distinct header (a round's replies share a handful), not once per reply.
    major = view[6] if bytes(view[:6]) == b"\x93NUMPY" else None
    length = int.from_bytes(view[8:10] if major == 1 else view[8:12], "little") if major in (1, 2) else 0
    start = 10 if major == 1 else 12
    if start + length > min(len(view), HEADER_LIMIT):
        raise ValueError("the .npy header is longer than the data or than 64 KB")
    shape, fortran, dtype, offset = _parse_header(bytes(view[: start + length]))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for {count} values of {dtype}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=256)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    return shape, fortran, dtype, stream.tell()


def vector_record(values: np.ndarray) -> ArrayRecord:
    """One flat array under the key `values`: one Flower Array costs ~0.5 KB of headers, so
    strategies send few, large arrays."""
    return ArrayRecord({"values": numpy_array(values)})


def all_finite(values: np.ndarray) -> bool:
    """Whether a float vector holds no NaN or Inf, without a temporary array (min and max are NaN
    or infinite exactly when some value is)."""
    return values.size == 0 or bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def read_vector(
    content: RecordDict, key: str, length: int, dtype=np.float32, *, view: bool = False, finite: bool = True
) -> np.ndarray:
    """The `values` array of record `key`, checked for presence, dtype, length and (unless `finite`
    is False: the caller checks it) finiteness. With `view`, a read-only view of the received bytes
    (no copy: the server's replies); otherwise a copy the caller may write to."""
    if key not in content or not isinstance(content[key], ArrayRecord) or "values" not in content[key]:
        raise ReplyError(f"reply has no '{key}' array")
    if len(content[key]) != 1:
        raise ReplyError(f"'{key}' must hold only its 'values' array, got {sorted(content[key])[:5]}")
    try:
        values = array_view(content[key]["values"])
    except ValueError as err:
        raise ReplyError(f"'{key}' is not a numpy array: {err}") from None
    if values.dtype != np.dtype(dtype) or values.ndim != 1:
        raise ReplyError(f"'{key}' must be a flat {np.dtype(dtype).name} array, got {values.dtype} {values.shape}")
    if values.size != length:
        raise ReplyError(f"'{key}' has {values.size} values, expected {length}")
    if finite and values.dtype.kind == "f" and not all_finite(values):
        raise ReplyError(f"'{key}' holds NaN or Inf")
    return values if view else values.copy()


def read_buffers(content: RecordDict, length: int, *, view: bool = False) -> np.ndarray:
    """The float32 `buffers` of a message, or none for a model without buffers."""
    if length:
        return read_vector(content, "buffers", length, view=view)
    if "buffers" in content:  # the sender has no buffers to send: whatever came is not the model's
        raise ReplyError("'buffers' sent for a model without buffers")
    return np.zeros(0, dtype=np.float32)


def make_codec(config: Mapping[str, Any], direction: str) -> Codec:
    """The codec of `direction` ("up": client to server, "down": server to client)."""
    return Codec(config[f"codec-{direction}"], chunk=config["codec-chunk"], fraction=config["topk-fraction"])


def codec_rng(
    config: Mapping[str, Any], server_round: int, direction: str, partition_id: int, key: str
) -> np.random.Generator:
    """The generator of int8's stochastic rounding for one payload: drawn from (seed, round, direction,
    client, record), so reruns and resumed runs encode the same bytes (partition -1: the broadcast)."""
    return np.random.default_rng(
        [config["seed"], server_round, DIRECTIONS.index(direction), partition_id + 1, PAYLOAD_KEYS.index(key)]
    )


def encoded_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A codec's arrays (`fedcmd.codecs`) as the array record that carries them."""
    return ArrayRecord({name: numpy_array(values) for name, values in arrays.items()})


def read_encoded(content: RecordDict, key: str, length: int, codec: Codec) -> np.ndarray:
    """The decoded values of record `key`, a `codec` payload of `length` values; ReplyError if it is
    not one (wrong arrays, dtypes or lengths, bad scales or indices, non-finite values)."""
    if codec.lossless:
        return read_vector(content, key, length)
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"reply has no '{key}' array record")
    try:
        return codec.decode({name: record[name].numpy() for name in record}, length)
    except CodecError as err:
        raise ReplyError(f"'{key}' is not a {codec.name} payload of {length} values: {err}") from None
