"""Federated embedded CMD's protocol: its declaration, and the coefficient-store records both
sides read and write (the protocol itself is in the docstring of strategies/cmd.py).

Train message: `cmd` (ConfigRecord: from-version, to-version, n-modes, hold-references), the events
[from-version, to-version) as `coefficients` (a, b, mode), `masks` or `indices` (whichever is
smaller) and, with a client's first events, `indices/reference-index`; then `weights` (the
non-embedded, non-reference weights), `references`, `buffers`. Reply: `weights`, `references`,
`buffers`, and the metric `store-version`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcmd.algorithms import Algorithm, Key, fraction, one_of, positive
from fedcmd.wire import numpy_array

ALGORITHMS = (
    Algorithm(
        "cmd",
        server="strategies.cmd:CMD",
        client="clients.cmd:train",
        doc="federated embedded CMD (ICLR 2024): embedded weights are rebuilt from M reference weights",
        keys={
            "cmd-modes": Key(int, 10, positive, "a positive integer", "M, the number of modes"),
            "cmd-warmup": Key(int, 5, positive, "a positive integer", "F, FedAvg rounds before CMD is fitted"),
            "cmd-every": Key(int, 1, positive, "a positive integer", "L, rounds between embedding events"),
            "cmd-fraction": Key(float, 0.15, fraction, "in (0, 1]", "P, the share embedded per event"),
            "cmd-of-remaining": Key(bool, True, None, "", "P of the weights not yet embedded (else of all)"),
            "cmd-max-embedded": Key(float, 0.9, fraction, "in (0, 1]", "embedding stops at this share"),
            "cmd-samples": Key(int, 1000, positive, "a positive integer", "K, weights sampled for clustering"),
            "cmd-embedded-training": Key(
                str,
                "frozen",
                one_of(("snap", "frozen")),
                "one of snap, frozen",
                "embedded weights during local training: held (frozen) or overwritten",
            ),
        },
        client_keys=("cmd-embedded-training",),
    ),
)

REPLY_METRICS = ("store-version",)


def mode_dtype(n_modes: int) -> np.dtype:
    return np.dtype(np.uint8) if n_modes <= 256 else np.dtype(np.uint16)


@dataclass(frozen=True)
class EmbeddingEvent:
    index: np.ndarray  # int64, ascending
    a: np.ndarray  # float32
    b: np.ndarray  # float32
    mode: np.ndarray  # uint8 / uint16


def encode_events(
    events: list[EmbeddingEvent],
    n_params: int,
    from_version: int,
    to_version: int,
    reference_index: np.ndarray,
    n_modes: int,
) -> RecordDict:
    """The records that carry `events` (the log's entries from_version..to_version-1)."""
    content = RecordDict()
    content["cmd"] = ConfigRecord({"from-version": from_version, "to-version": to_version, "n-modes": n_modes})
    if not events:
        return content
    from fedcmd import kernels  # the server's side only: clients decode without numba

    content["coefficients"] = ArrayRecord(
        {
            "a": numpy_array(np.concatenate([e.a for e in events])),
            "b": numpy_array(np.concatenate([e.b for e in events])),
            "mode": numpy_array(np.concatenate([e.mode for e in events]).astype(mode_dtype(n_modes))),
        }
    )
    counts = np.array([e.index.size for e in events], dtype=np.int64)
    mask_bytes = len(events) * ((n_params + 7) // 8)
    if mask_bytes <= 4 * int(counts.sum()):
        # The bytes np.packbits(masks, axis=1) gives for the events' boolean masks, set bit by bit.
        packed = np.zeros((len(events), (n_params + 7) // 8), dtype=np.uint8)
        for row, event in enumerate(events):
            kernels.pack_positions(np.asarray(event.index, dtype=np.int64), packed[row])
        content["masks"] = ArrayRecord({"values": numpy_array(packed)})
    else:
        content["indices"] = ArrayRecord(
            {
                "values": numpy_array(np.concatenate([e.index for e in events]).astype(np.int32)),
                "counts": numpy_array(counts.astype(np.int32)),
            }
        )
    if from_version == 0:  # a client's first events: it learns the reference weights too
        if "indices" not in content:
            content["indices"] = ArrayRecord()
        content["indices"]["reference-index"] = numpy_array(reference_index.astype(np.int64))
    return content


def decode_events(content: RecordDict, n_params: int) -> tuple[int, int, list[EmbeddingEvent], np.ndarray | None]:
    """(from_version, to_version, events, reference_index or None) from a train message."""
    head = content["cmd"]
    from_version, to_version = int(head["from-version"]), int(head["to-version"])
    n_events = to_version - from_version
    if n_events == 0:
        return from_version, to_version, [], None
    coeff = content["coefficients"]
    a, b, mode = coeff["a"].numpy(), coeff["b"].numpy(), coeff["mode"].numpy()
    if "masks" in content:
        packed = content["masks"]["values"].numpy()
        masks = np.unpackbits(packed, axis=1, count=n_params).astype(bool)
        indices = [np.flatnonzero(row) for row in masks]
    else:
        flat = content["indices"]["values"].numpy().astype(np.int64)
        counts = content["indices"]["counts"].numpy()
        indices = np.split(flat, np.cumsum(counts)[:-1])
    if len(indices) != n_events:
        raise ValueError(f"coefficient delta announces {n_events} events but carries {len(indices)}")
    events, start = [], 0
    for index in indices:
        stop = start + index.size
        events.append(EmbeddingEvent(index.astype(np.int64), a[start:stop], b[start:stop], mode[start:stop]))
        start = stop
    if start != a.size:
        raise ValueError(f"coefficient delta has {a.size} coefficients for {start} embedded weights")
    reference_index = None
    if "indices" in content and "reference-index" in content["indices"]:
        reference_index = content["indices"]["reference-index"].numpy().astype(np.int64)
    return from_version, to_version, events, reference_index


def rebuild_embedded(
    theta: np.ndarray,
    embedded_index: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    mode: np.ndarray,
    reference_index: np.ndarray,
) -> None:
    """theta[i] = a_i * theta[ref(mode_i)] + b_i for embedded i, in float32 (server and client alike)."""
    theta[embedded_index] = a * theta[reference_index[mode.astype(np.int64)]] + b
