"""APF / A-APF client: bring the synchronised model up to date, train with frozen scalars held.

The node's `context.state` keeps the last synchronised model (all N weights, float32), its model
version (the round whose global model it is; -1: none), and the active mask (packed bits) with its
version. A train message says how to reach the server's current global model (see
`strategies/apf.py`): `full` replaces the model; `derived` writes the values at the positions of
the mask this client holds; `explicit` writes them at the positions of the `masks/changed` bit
mask; `delta` (a lossy codec-down) adds the decoded change at those positions to what it holds.
Then `masks/active`, when present, replaces the mask. Any inconsistency between what the
message assumes and what this client holds raises `SyncError` (the server then resends everything)
rather than training on a wrong model.

Frozen scalars are held at their synchronised value after every local step; only active values
go back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict

from clients.common import SyncError, Uplink, hold_fixed, local_model, train_locally
from fedcmd import task
from fedcmd.codecs import Codec
from fedcmd.protocols.apf import ACTIVE, CHANGED, SyncHead, unpack_mask
from fedcmd.wire import make_codec, read_buffers, read_encoded, read_vector

STATE_KEY = "apf-sync"


class SyncedModel:
    """What a client holds between rounds: the last synchronised model and the active mask."""

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.weights: np.ndarray | None = None
        self.model_version = -1
        self.active = np.ones(n_params, dtype=bool)  # mask version 0: nothing frozen yet
        self.mask_version = 0

    @classmethod
    def load(cls, context: Context, n_params: int) -> "SyncedModel":
        synced = cls(n_params)
        record = context.state.get(STATE_KEY)
        if isinstance(record, ArrayRecord):
            synced.weights = record["weights"].numpy()
            synced.model_version, synced.mask_version = (int(v) for v in record["versions"].numpy())
            synced.active = np.unpackbits(record["active"].numpy(), count=n_params).astype(bool)
        return synced

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ArrayRecord(
            {
                "weights": Array(self.weights),
                "versions": Array(np.array([self.model_version, self.mask_version], dtype=np.int64)),
                "active": Array(np.packbits(self.active)),
            }
        )

    def _positions(self, content: RecordDict, head: SyncHead) -> np.ndarray:
        kind = head.kind
        if self.weights is None:
            raise SyncError(
                f"'{kind}' catch-up from model version {head.from_version}, but this client holds no synchronised model"
            )
        if not head.from_version <= self.model_version <= head.model_version:
            raise SyncError(
                f"'{kind}' catch-up covers model versions {head.from_version}.."
                f"{head.model_version}, but this client holds version {self.model_version}"
            )
        if kind == "delta" and self.model_version != head.model_version - 1:
            raise SyncError(
                f"'delta' catch-up for model version {head.model_version}, "
                f"but this client holds version {self.model_version}"
            )
        if kind in ("derived", "delta"):
            if self.mask_version != head.base_mask_version:
                raise SyncError(
                    f"'derived' catch-up assumes mask version {head.base_mask_version}, "
                    f"but this client holds version {self.mask_version}"
                )
            return np.flatnonzero(self.active)
        if kind == "explicit":
            changed = unpack_mask(content, CHANGED, self.n_params)
            if changed is None:
                raise SyncError("'explicit' catch-up without a 'changed' mask")
            return np.flatnonzero(changed)
        raise SyncError(f"unknown catch-up kind {kind!r}")

    def _next_mask(self, content: RecordDict, mask_version: int) -> np.ndarray:
        active = unpack_mask(content, ACTIVE, self.n_params)
        if active is not None:
            return active
        if mask_version == 0:
            return np.ones(self.n_params, dtype=bool)
        if mask_version != self.mask_version:
            raise SyncError(
                f"message assumes mask version {mask_version} without sending it, "
                f"but this client holds version {self.mask_version}"
            )
        return self.active

    def apply(self, content: RecordDict, codec: Codec | None = None) -> None:
        """Bring model and mask to the versions the message states; on SyncError nothing changes.
        `delta` values are the decoded change (`codec`, the downlink's) from what this client holds."""
        codec = codec if codec is not None else Codec()
        head = SyncHead.read(content)
        index = None if head.kind == "full" else self._positions(content, head)
        if head.kind == "delta":
            values = self.weights[index] + read_encoded(content, "weights", index.size, codec)
        else:
            values = read_vector(content, "weights", self.n_params if index is None else index.size)
        active = self._next_mask(content, head.mask_version)
        if index is None:
            self.weights = values.copy()
        else:
            self.weights[index] = values
        self.active = active
        self.model_version, self.mask_version = head.model_version, head.mask_version


def train(content: RecordDict, context: Context, config: Mapping[str, Any], partition_id: int) -> RecordDict:
    weight_layout, buffer_layout = task.layouts(config)
    synced = SyncedModel.load(context, weight_layout.numel)
    synced.apply(content, make_codec(config, "down"))
    synced.save(context)
    buffers = read_buffers(content, buffer_layout.numel)
    frozen = np.flatnonzero(~synced.active)
    model, _, _ = local_model(config)
    hook = hold_fixed(weight_layout, model, frozen, synced.weights[frozen])
    uplink = Uplink(
        config, partition_id, synced.weights, buffers, {"weights": np.flatnonzero(synced.active), "buffers": None}
    )
    _, _, metrics = train_locally(
        config, partition_id, synced.weights, buffers, step_hook=hook, context=context, uplink=uplink
    )
    reply = uplink.content
    reply["metrics"] = MetricRecord(
        {**metrics, "model-version": synced.model_version, "mask-version": synced.mask_version}
    )
    return reply
