"""What every fedcmd client shares: its data, a model kept for the process, local training.

Local work per round is either `local-epochs` whole epochs (a new batch order each round, drawn
from (seed, round, partition)) or, with `local-steps = k > 0`, k optimiser steps drawn from the
client's persistent batch stream (`fedcmd.training.BatchStream`): consecutive rounds continue the
stream where the last one stopped. With `optimizer-state = keep` the optimiser's state (SGD
momentum, Adam's step count and moments: 2N float32 values for Adam, N for SGD with momentum)
lives on across rounds too. Both live in the node's `context.state` (record `local-training`);
they cost client memory and are never sent.

So that `fedcmd run --resume` continues exactly, a client that keeps such state also writes it
after each round it trains to `<client-state-dir>/<run-token>/partition-<k>.round-<r>.npz` (the
server names the folder: `<out>/client-state`; a SuperNode's node config `state-dir` overrides it)
and keeps the last two files (arrays only, written and read without pickle, like the server's
checkpoint). A node that holds no state (a resumed run, a restarted SuperNode) loads the newest
file written before the current round; the run token, drawn when a run starts and kept in its
checkpoint, keeps another run's files out.
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict
from torch import nn

from fedcmd import task
from fedcmd.codecs import with_error_feedback
from fedcmd.config import keeps_local_state
from fedcmd.files import write_atomically
from fedcmd.flat import ParamLayout
from fedcmd.sampling import local_seed
from fedcmd.training import BatchStream, default_device, epoch_batches, make_optimizer, run_steps
from fedcmd.wire import codec_rng, encoded_record, make_codec, read_encoded, read_vector, vector_record

STATE_KEY = "local-training"


@functools.lru_cache(maxsize=2)
def _model(model_name: str, in_shape: tuple, num_classes: int) -> nn.Module:
    from fedcmd.models import build_model

    return build_model(model_name, in_shape=in_shape, num_classes=num_classes).to(default_device())


def local_model(config: Mapping[str, Any]) -> tuple[nn.Module, ParamLayout, ParamLayout]:
    """The process's model object for this config (reused across rounds: only values change)."""
    data = task.dataset(config)
    weight_layout, buffer_layout = task.layouts(config)
    return _model(config["model"], tuple(data.in_shape), data.num_classes), weight_layout, buffer_layout


class LocalTrainingState:
    """A client's batch-stream position and optimiser state between rounds (see module docstring)."""

    def __init__(
        self,
        position: tuple[int, int] = (0, 0),
        optimizer: dict[str, np.ndarray] | None = None,
        trained_round: int = 0,
        residual: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.position = position
        self.optimizer = optimizer or {}  # "<param index>/<state name>" -> array
        self.trained_round = trained_round
        self.residual = residual or {}  # "weights" / "buffers" -> topk uplink error-feedback residual

    # --- the node's context.state ---------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "LocalTrainingState":
        pass_index, offset, trained_round = (int(v) for v in arrays["position"])
        return cls(
            (pass_index, offset),
            {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")},
            trained_round,
            {k[3:]: np.array(v) for k, v in arrays.items() if k.startswith("ef/")},
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"position": np.array([*self.position, self.trained_round], dtype=np.int64)}
        arrays.update({f"opt/{k}": v for k, v in self.optimizer.items()})
        arrays.update({f"ef/{k}": v for k, v in self.residual.items()})
        return arrays

    @classmethod
    def load(cls, context: Context) -> "LocalTrainingState | None":
        record = context.state.get(STATE_KEY)
        if not isinstance(record, ArrayRecord):
            return None
        return cls.from_arrays({k: record[k].numpy() for k in record})

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ArrayRecord(
            {k: Array(np.require(v, requirements="C")) for k, v in self.to_arrays().items()}
        )

    # --- the optimiser --------------------------------------------------------------------------
    @staticmethod
    def capture(optimiser: torch.optim.Optimizer) -> dict[str, np.ndarray]:
        return {
            f"{index}/{name}": value.detach().cpu().numpy().copy() if torch.is_tensor(value) else np.array(value)
            for index, entries in optimiser.state_dict()["state"].items()
            for name, value in entries.items()
        }

    def restore(self, optimiser: torch.optim.Optimizer) -> None:
        if not self.optimizer:
            return
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.optimizer.items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
        saved = optimiser.state_dict()
        saved["state"] = state
        optimiser.load_state_dict(saved)


class StateFiles:
    """The on-disk copies of one client's LocalTrainingState, for resumed runs and restarted nodes."""

    KEEP = 2

    def __init__(self, folder: str | Path, run_token: str, partition_id: int) -> None:
        self.folder = Path(folder) / run_token
        self.prefix = f"partition-{partition_id}.round-"

    def _files(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)\.npz$")
        found = [(int(m[1]), p) for p in self.folder.iterdir() if (m := pattern.match(p.name))]
        return sorted(found)

    def latest_before(self, server_round: int) -> LocalTrainingState | None:
        older = [(r, p) for r, p in self._files() if r < server_round]
        if not older:
            return None
        with np.load(older[-1][1], allow_pickle=False) as arrays:
            return LocalTrainingState.from_arrays({k: arrays[k] for k in arrays.files})

    def write(self, state: LocalTrainingState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}{state.trained_round}.npz"
        write_atomically(path, lambda fh: np.savez(fh, allow_pickle=False, **state.to_arrays()))
        for _, old in self._files()[: -self.KEEP]:
            old.unlink(missing_ok=True)


def _state_files(config: Mapping[str, Any], context: Context | None, partition_id: int) -> StateFiles | None:
    folder = (context.node_config.get("state-dir") if context is not None else None) or config.get("client-state-dir")
    token = config.get("run-token")
    return StateFiles(folder, token, partition_id) if folder and token else None


class HeldModel:
    """The global weights a client last received (all N, embedded ones rebuilt) and their model
    version: what the changes of a lossy downlink (`codec-down`) are added to. Kept in the node's
    `context.state` only: a client that lost it answers a `delta` message with an error, and the
    server sends it the model as it is from then on (as after any rejected reply)."""

    KEY = "held-model"

    def __init__(self, weights: np.ndarray | None = None, version: int = -1) -> None:
        self.weights, self.version = weights, version

    @classmethod
    def load(cls, context: Context) -> "HeldModel":
        record = context.state.get(cls.KEY)
        if not isinstance(record, ArrayRecord):
            return cls()
        return cls(record["weights"].numpy(), int(record["version"].numpy()[0]))

    def save(self, context: Context) -> None:
        context.state[self.KEY] = ArrayRecord(
            {
                "weights": Array(np.ascontiguousarray(self.weights)),
                "version": Array(np.array([self.version], dtype=np.int64)),
            }
        )


class SyncError(ValueError):
    """A train message that does not apply to the model this client holds."""


class Downlink:
    """How a client reads the dense values of a train message: as they are, or (a `sync` record of
    kind `delta`, codec-down lossy) as the decoded change from the model it holds."""

    def __init__(self, content: RecordDict, context: Context, config: Mapping[str, Any]) -> None:
        self.head = content.get("sync")
        self.content, self.context = content, context
        self.codec = make_codec(config, "down")
        self.held = HeldModel.load(context) if self.head is not None else None
        if self.head is not None and self.head["kind"] == "delta":
            if self.held.version != int(self.head["model-version"]) - 1:
                raise SyncError(
                    f"'delta' message for model version {self.head['model-version']}, but this client "
                    f"holds version {self.held.version}"
                )

    @property
    def version(self) -> int | None:
        return int(self.head["model-version"]) if self.head is not None else None

    def values(self, key: str, length: int, index: np.ndarray | None = None) -> np.ndarray:
        """The `length` values of record `key`, which sits at weight positions `index` (None: all)."""
        if self.head is None or self.head["kind"] != "delta":
            return read_vector(self.content, key, length)
        held = self.held.weights if index is None else self.held.weights[index]
        return held + read_encoded(self.content, key, length, self.codec)

    def keep(self, weights: np.ndarray) -> None:
        """Hold the rebuilt global weights for the next message (a no-op without a lossy downlink)."""
        if self.head is not None:
            HeldModel(weights, self.version).save(self.context)  # saving copies it into the state


class Uplink:
    """How a client's trained values go back: as they are (codec-up none) or as the codec's encoding
    of their change from the values it received (both sides hold those exactly). Under topk the
    part not sent is kept as the client's residual (error feedback) and added to the next change,
    per position of the weights (or buffers): `LocalTrainingState.residual`, saved with the state."""

    def __init__(
        self,
        config: Mapping[str, Any],
        partition_id: int,
        received: np.ndarray,
        received_buffers: np.ndarray,
        records: dict[str, np.ndarray | None],
        exact: tuple[str, ...] = (),
    ) -> None:
        self.config, self.partition_id = config, partition_id
        self.codec = make_codec(config, "up")
        self.received, self.received_buffers = received, received_buffers
        self.positions = records  # record key -> weight positions (None for "buffers": all of them)
        self.exact = exact  # records that always go as they are (CMD's references)
        self.content = RecordDict()

    def encode(self, weights: np.ndarray, buffers: np.ndarray, state: "LocalTrainingState | None") -> RecordDict:
        for key, index in self.positions.items():
            group = "buffers" if key == "buffers" else "weights"
            at = slice(None) if index is None else index
            new, sent = (buffers, self.received_buffers) if group == "buffers" else (weights[at], self.received[at])
            if group == "buffers" and not new.size:
                continue
            if self.codec.lossless or key in self.exact:
                self.content[key] = vector_record(new)
                continue
            change = new - sent
            rng = codec_rng(self.config, int(self.config["server-round"]), "up", self.partition_id, key)
            if self.codec.name == "topk":
                full = buffers if group == "buffers" else weights
                residual = state.residual.setdefault(group, np.zeros(full.size, dtype=np.float32))
                arrays, _, residual[at] = with_error_feedback(self.codec, change, residual[at], rng)
            else:
                arrays = self.codec.encode(change, rng)
            self.content[key] = encoded_record(arrays)
        return self.content


def train_locally(
    config: Mapping[str, Any],
    partition_id: int,
    weights: np.ndarray,
    buffers: np.ndarray,
    step_hook: Callable[[nn.Module], None] | None = None,
    context: Context | None = None,
    uplink: Uplink | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Load (weights, buffers) into the model, train on this client's partition, return the result.

    `context` is the node's: it carries the batch-stream position and optimiser state between
    rounds when the config keeps them (without one, e.g. in a direct call, they start afresh).
    `uplink`, when given, encodes the trained values into `uplink.content` before the state (which
    holds topk's residual) is saved. `step_hook` and `penalty` are `fedcmd.training.run_steps`'s.
    """
    torch.set_num_threads(1)  # one core per client: clients run side by side on a shared machine
    model, weight_layout, buffer_layout = local_model(config)
    weight_layout.load(model, weights)
    buffer_layout.load(model, buffers)
    data = task.dataset(config)
    index = task.client_index(config, partition_id)
    server_round = int(config["server-round"])
    files, state = None, None
    if keeps_local_state(config):  # the node's own state, else its newest file, else a fresh start
        files = _state_files(config, context, partition_id)
        state = (
            (LocalTrainingState.load(context) if context is not None else None)
            or (files.latest_before(server_round) if files else None)
            or LocalTrainingState()
        )
    optimiser = make_optimizer(
        model.parameters(),
        config["optimizer"],
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight-decay"],
        betas=(config["adam-beta1"], config["adam-beta2"]),
        eps=config["adam-eps"],
    )
    if state is not None and config["optimizer-state"] == "keep":
        state.restore(optimiser)
    if config["local-steps"] > 0:
        stream = BatchStream(len(index), config["batch-size"], config["seed"], partition_id, *state.position)
        batches = stream.take(config["local-steps"])
    else:
        stream = None
        batches = epoch_batches(
            len(index),
            config["batch-size"],
            config["local-epochs"],
            local_seed(config["seed"], server_round, partition_id),
        )
    # batches hold positions within the partition; training reads those samples from the shared set
    started = time.perf_counter()
    result = run_steps(model, data.train_x, data.train_y, (index[b] for b in batches), optimiser, step_hook, penalty)
    seconds = time.perf_counter() - started
    trained, trained_buffers = weight_layout.flatten(model), buffer_layout.flatten(model)
    if uplink is not None:
        uplink.encode(trained, trained_buffers, state)
    if state is not None:
        if stream is not None:
            state.position = stream.position
        state.optimizer = LocalTrainingState.capture(optimiser) if config["optimizer-state"] == "keep" else {}
        state.trained_round = server_round
        if context is not None:
            state.save(context)
        if files is not None:
            files.write(state)
    metrics = {
        "num-examples": float(len(index)),
        "train-loss": float(result["train_loss"]),
        "local-steps": float(result["steps"]),
        "train-seconds": seconds,
    }
    return trained, trained_buffers, metrics


def hold_fixed(
    layout: ParamLayout, model: nn.Module, index: np.ndarray, values: np.ndarray
) -> Callable[[nn.Module], None] | None:
    """A step hook that writes `values` back into the flat positions `index` after every step.

    Used for parameters a strategy keeps out of local training (frozen embedded CMD weights, frozen
    APF scalars). Gradients still flow through them; only their values are held.
    """
    if index.size == 0:
        return None
    params = dict(model.named_parameters())
    tensor_of = np.searchsorted(layout.offsets, index, side="right") - 1
    held = []
    for t in np.unique(tensor_of):
        sel = tensor_of == t
        param = params[layout.names[t]]
        local = torch.from_numpy(index[sel] - layout.offsets[t]).to(param.device)
        held.append((param, local, torch.from_numpy(np.ascontiguousarray(values[sel])).to(param.device)))

    @torch.no_grad()
    def hook(_: nn.Module) -> None:
        for param, local, vals in held:
            param.view(-1)[local] = vals

    return hook
