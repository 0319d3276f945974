"""Federated embedded CMD, client side: a local coefficient store, rebuilt weights, local training.

The store (kept in the node's `context.state` across rounds) holds, for every embedded weight, its
(a_i, b_i) and mode, plus the reference indices and the store version (number of embedding events
held). It is kept compact: a bit mask over the N weights, then a, b (float32) and mode (uint8) in
ascending index order: 9 bytes per embedded weight plus N/8 bytes.

`cmd-embedded-training` says what embedded weights do during local training: `snap` lets them train
and overwrites them at the next sync (the authors' centralised behaviour); `frozen` holds them at
their rebuilt value. Either way only non-embedded values are sent back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict

from clients.common import Downlink, Uplink, hold_fixed, local_model, train_locally
from fedcmd import task
from fedcmd.protocols.cmd import EmbeddingEvent, decode_events, mode_dtype, rebuild_embedded
from fedcmd.wire import read_buffers, read_vector

STORE_KEY = "cmd-store"


class StoreVersionError(ValueError):
    """A coefficient delta that does not continue this client's store."""


class CoefficientStore:
    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.version = 0
        self.embedded = np.zeros(n_params, dtype=bool)
        self.a = np.zeros(0, dtype=np.float32)
        self.b = np.zeros(0, dtype=np.float32)
        self.mode = np.zeros(0, dtype=np.uint8)
        self.reference_index = np.zeros(0, dtype=np.int64)

    # ----- persistence in context.state -------------------------------------------------------
    @classmethod
    def load(cls, context: Context, n_params: int) -> "CoefficientStore":
        store = cls(n_params)
        record = context.state.get(STORE_KEY)
        if isinstance(record, ArrayRecord):
            store.version = int(record["version"].numpy()[0])
            store.embedded = np.unpackbits(record["mask"].numpy(), count=n_params).astype(bool)
            store.a, store.b = record["a"].numpy(), record["b"].numpy()
            store.mode = record["mode"].numpy()
            store.reference_index = record["reference-index"].numpy()
        return store

    def save(self, context: Context) -> None:
        context.state[STORE_KEY] = ArrayRecord(
            {
                "version": Array(np.array([self.version], dtype=np.int64)),
                "mask": Array(np.packbits(self.embedded)),
                "a": Array(self.a),
                "b": Array(self.b),
                "mode": Array(self.mode),
                "reference-index": Array(self.reference_index),
            }
        )

    def nbytes(self) -> int:
        """Bytes the store occupies (what a client keeps between rounds)."""
        return (
            (self.n_params + 7) // 8
            + self.a.nbytes
            + self.b.nbytes
            + self.mode.nbytes
            + self.reference_index.nbytes
            + 8
        )

    # ----- updates -----------------------------------------------------------------------------
    def apply(
        self, from_version: int, to_version: int, events: list[EmbeddingEvent], reference_index: np.ndarray | None
    ) -> None:
        """Apply the events from_version..to_version-1, skipping (after checking) those already held."""
        if from_version > self.version:
            raise StoreVersionError(
                f"coefficient delta starts at store version {from_version} but this client holds version "
                f"{self.version}: events {self.version}..{from_version - 1} are missing; refusing the delta"
            )
        if to_version < self.version:
            raise StoreVersionError(
                f"coefficient delta ends at store version {to_version} but this client already holds version "
                f"{self.version}: the server's log is behind this client; refusing the delta"
            )
        if reference_index is not None:
            if self.reference_index.size and not np.array_equal(reference_index, self.reference_index):
                raise StoreVersionError("coefficient delta carries reference indices that differ from the store's")
            self.reference_index = reference_index
        if not events:
            return
        if not self.reference_index.size:
            raise StoreVersionError("coefficient delta carries events but this client never received the references")
        index = np.flatnonzero(self.embedded)
        a = np.zeros(self.n_params, dtype=np.float32)
        b = np.zeros(self.n_params, dtype=np.float32)
        mode = np.zeros(self.n_params, dtype=mode_dtype(int(self.reference_index.size)))
        a[index], b[index], mode[index] = self.a, self.b, self.mode
        for version, event in enumerate(events, start=from_version):
            if version < self.version:
                if not (
                    self.embedded[event.index].all()
                    and np.array_equal(a[event.index], event.a)
                    and np.array_equal(b[event.index], event.b)
                ):
                    raise StoreVersionError(f"event {version} of the delta differs from the one this client holds")
                continue
            if self.embedded[event.index].any():
                raise StoreVersionError(f"event {version} embeds weights this client already holds as embedded")
            self.embedded[event.index] = True
            a[event.index], b[event.index], mode[event.index] = event.a, event.b, event.mode
        index = np.flatnonzero(self.embedded)
        self.a, self.b, self.mode = a[index], b[index], mode[index]
        self.version = to_version

    def free_index(self) -> np.ndarray:
        """Positions sent densely as `weights`: not embedded and, once a store exists, not references."""
        free = ~self.embedded
        if self.version:
            free[self.reference_index] = False
        return np.flatnonzero(free)

    def rebuild(self, weights: np.ndarray, references: np.ndarray | None) -> np.ndarray:
        theta = np.zeros(self.n_params, dtype=np.float32)
        theta[self.free_index()] = weights
        if self.version:
            theta[self.reference_index] = references
            rebuild_embedded(theta, np.flatnonzero(self.embedded), self.a, self.b, self.mode, self.reference_index)
        return theta


def train(content: RecordDict, context: Context, config: Mapping[str, Any], partition_id: int) -> RecordDict:
    weight_layout, buffer_layout = task.layouts(config)
    n = weight_layout.numel
    store = CoefficientStore.load(context, n)
    store.apply(*decode_events(content, n))
    store.save(context)
    free = store.free_index()
    downlink = Downlink(content, context, config)
    weights = downlink.values("weights", free.size, free)
    references = read_vector(content, "references", store.reference_index.size) if store.version else None
    theta = store.rebuild(weights, references)
    downlink.keep(theta)
    buffers = read_buffers(content, buffer_layout.numel)
    hook = None
    if config["cmd-embedded-training"] == "frozen" and store.version:
        model, _, _ = local_model(config)
        held = np.flatnonzero(store.embedded)
        if content["cmd"].get("hold-references", False):
            held = np.union1d(held, store.reference_index)
        hook = hold_fixed(weight_layout, model, held, theta[held])
    records = {"weights": free, **({"references": store.reference_index} if store.version else {}), "buffers": None}
    uplink = Uplink(config, partition_id, theta, buffers, records, exact=("references",))
    _, _, metrics = train_locally(config, partition_id, theta, buffers, step_hook=hook, context=context, uplink=uplink)
    reply = uplink.content
    versions = {"store-version": store.version, **({"model-version": downlink.version} if downlink.head else {})}
    reply["metrics"] = MetricRecord({**metrics, **versions})
    return reply
