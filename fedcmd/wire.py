"""The wire vocabulary both sides of every strategy share: dense vectors as records, the codecs'
payloads, and the error a malformed record raises.

A model travels as flat float32 vectors, one `values` array per record (`vector_record`); under a
lossy wire codec (`codec-up`, `codec-down`: `fedcmd.codecs`) a dense payload is the codec's arrays
of the change from what the receiver holds (`encoded_record`, `read_encoded`). The server
(`strategies/`) and the clients (`clients/`) import this module, never each other; algorithm
specific records live in `fedcmd/protocols/<algorithm>.py`.
"""

from __future__ import annotations

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


def vector_record(values: np.ndarray) -> ArrayRecord:
    """One flat array under the key `values`: one Flower Array costs ~0.5 KB of headers, so
    strategies send few, large arrays."""
    return ArrayRecord({"values": Array(np.ascontiguousarray(values))})


def read_vector(content: RecordDict, key: str, length: int, dtype=np.float32) -> np.ndarray:
    """The `values` array of record `key`, checked for presence, dtype, length and finiteness."""
    if key not in content or not isinstance(content[key], ArrayRecord) or "values" not in content[key]:
        raise ReplyError(f"reply has no '{key}' array")
    if len(content[key]) != 1:
        raise ReplyError(f"'{key}' must hold only its 'values' array, got {sorted(content[key])[:5]}")
    values = content[key]["values"].numpy()
    if values.dtype != np.dtype(dtype) or values.ndim != 1:
        raise ReplyError(f"'{key}' must be a flat {np.dtype(dtype).name} array, got {values.dtype} {values.shape}")
    if values.size != length:
        raise ReplyError(f"'{key}' has {values.size} values, expected {length}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ReplyError(f"'{key}' holds NaN or Inf")
    return values


def read_buffers(content: RecordDict, length: int) -> np.ndarray:
    """The float32 `buffers` of a message, or none for a model without buffers."""
    if length:
        return read_vector(content, "buffers", length)
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
    return ArrayRecord({name: Array(np.ascontiguousarray(values)) for name, values in arrays.items()})


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
