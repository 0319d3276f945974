"""Per-round checkpoints of a run, so that `fedcmd run ... --resume` can continue it.

A checkpoint is the whole strategy object pickled (it holds the global model, its own state such as
CMD's coefficient log and online statistics or APF's controller, the per-client acknowledgements,
the round logs and the volume accountant), with the metrics rows so far, the RNG states of torch,
numpy and `random`, and the run's config. It is written after every round to
`<out>/checkpoint.pkl` through a temporary file and a rename, so a crash mid-write leaves the
previous checkpoint intact.

A checkpoint is a pickle: loading one runs code named in it. Load only files this program wrote,
on this machine (they are trusted local files, like the run's other outputs).
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pkl"
FORMAT = 1
# Keys a resumed run may change: extending a finished run, or waiting longer for replies.
RESUMABLE_KEYS = ("num-server-rounds", "round-timeout")


class CheckpointError(ValueError):
    """No usable checkpoint: missing, from another fedcmd format, or from a different config."""


@dataclass
class Checkpoint:
    config: dict[str, Any]
    server_round: int          # last completed round
    strategy: Any              # a strategies.base.FedcmdStrategy
    metrics: list[dict[str, Any]]
    wall_seconds: float        # run time spent before this checkpoint


def save_checkpoint(out: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically to `<out>/checkpoint.pkl`; returns the path."""
    path = Path(out) / CHECKPOINT_NAME
    state = {"format": FORMAT, "checkpoint": checkpoint,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(out: str | Path, config: dict[str, Any]) -> Checkpoint:
    """The checkpoint in `out`, checked against `config`, with RNG states restored.

    The strategy comes back without its node maps: node ids belong to the connections of the run
    that wrote it, and a resumed run is a new run whose nodes start with empty client state (a new
    Flower run gets fresh `context.state` on every node). Every partition it knew is therefore
    treated as served by a new node, so stateful strategies (CMD, APF) resend what a client needs
    instead of a delta its client can no longer apply.
    """
    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    try:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
        raise CheckpointError(f"cannot resume: {path} is not a readable fedcmd checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"cannot resume: {path} is not a fedcmd checkpoint of format {FORMAT}")
    checkpoint: Checkpoint = state["checkpoint"]
    differing = [key for key in config
                 if key not in RESUMABLE_KEYS and checkpoint.config.get(key) != config[key]]
    if differing:
        key = differing[0]
        raise CheckpointError(f"cannot resume: config key '{key}' is {config[key]!r} but the checkpoint's run used "
                              f"{checkpoint.config.get(key)!r} (only {', '.join(RESUMABLE_KEYS)} may change)")
    if config["num-server-rounds"] < checkpoint.server_round:
        raise CheckpointError(f"cannot resume: the checkpoint is at round {checkpoint.server_round}, past "
                              f"num-server-rounds = {config['num-server-rounds']}")
    strategy = checkpoint.strategy
    strategy.config = config
    partitions = list(strategy.node_of)
    strategy.node_of.clear()
    strategy.partition_of.clear()
    for pid in partitions:
        strategy.client_reset(pid)
    checkpoint.config = config
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return checkpoint
