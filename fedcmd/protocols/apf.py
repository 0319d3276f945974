"""APF and A-APF's protocol: their declarations, and the records both sides read and write (the
synchronisation protocol itself is in the docstring of strategies/apf.py).

Train message: `apf` (ConfigRecord, `SyncHead`), `weights` (the values at the catch-up's positions,
or under `delta` the encoded change there), `masks` (packed bit masks over the N weights:
`changed` for an `explicit` catch-up, `active` when the client may lack the current mask),
`buffers`. Reply: the active `weights` (or their encoded change), `buffers`, and the metrics
`model-version` and `mask-version` the client now holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ConfigRecord, RecordDict

from fedcmd.algorithms import Algorithm, Key, fraction, positive

_KEYS = {
    "apf-threshold": Key(float, 0.05, positive, "positive", "T, the effective-perturbation stability threshold"),
    "apf-alpha": Key(float, 0.99, lambda v: 0 < v < 1, "in (0, 1)", "EMA factor of the stability statistics"),
    "apf-check-every": Key(int, 1, positive, "a positive integer", "rounds between stability checks"),
    "apf-tighten-at": Key(float, 0.8, fraction, "in (0, 1]", "T is halved once this share is frozen"),
    "apf-random-freeze-periods": Key(
        int, 1, positive, "a positive integer", "A-APF: check periods a random freeze lasts"
    ),
}
ALGORITHMS = (
    Algorithm(
        "apf",
        server="strategies.apf:APF",
        client="clients.apf:train",
        keys=_KEYS,
        doc="Adaptive Parameter Freezing (Chen et al., ICDCS 2021): stable scalars are neither sent nor trained",
    ),
    Algorithm(
        "a-apf",
        server="strategies.apf:AggressiveAPF",
        client="clients.apf:train",
        doc="Aggressive APF: APF plus seeded random freezes of unstable scalars",
    ),
)

HEAD = "apf"  # the train message's SyncHead
MASKS = "masks"  # packed bit masks over the N weights, under these names:
CHANGED = "changed"  # the positions an `explicit` catch-up writes
ACTIVE = "active"  # the active mask in force (sent when the client may lack it)
CATCH_UP_KINDS = ("delta", "derived", "explicit", "full")  # the server's preference order on equal cost
REPLY_METRICS = ("model-version", "mask-version")


@dataclass(frozen=True)
class SyncHead:
    """How a train message brings a client to the global model of round `model_version`:
    `kind` (one of CATCH_UP_KINDS), the model version it starts from (`from_version`, -1 for
    `full`), the mask version in force and, for `derived` and `delta`, the mask version whose
    positions it writes (`base_mask_version`)."""

    kind: str
    model_version: int
    mask_version: int
    from_version: int
    base_mask_version: int | None = None

    def record(self) -> ConfigRecord:
        head = {
            "model-version": self.model_version,
            "mask-version": self.mask_version,
            "catch-up": self.kind,
            "from-version": self.from_version,
        }
        if self.base_mask_version is not None:
            head["base-mask-version"] = self.base_mask_version
        return ConfigRecord(head)

    @classmethod
    def read(cls, content: RecordDict) -> "SyncHead":
        head = content[HEAD]
        base = head.get("base-mask-version")
        return cls(
            str(head["catch-up"]),
            int(head["model-version"]),
            int(head["mask-version"]),
            int(head["from-version"]),
            None if base is None else int(base),
        )


def pack_mask(mask: np.ndarray) -> Array:
    return Array(np.packbits(mask))


def unpack_mask(content: RecordDict, name: str, n_params: int) -> np.ndarray | None:
    """Bit mask `name` of the `masks` record as N booleans (None when the message has none)."""
    if MASKS not in content or name not in content[MASKS]:
        return None
    return np.unpackbits(content[MASKS][name].numpy(), count=n_params).astype(bool)
