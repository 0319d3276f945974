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
and keeps the last two files. A node that holds no state (a resumed run, a restarted SuperNode)
loads the newest file written before the current round; the run token, drawn when a run starts
and kept in its checkpoint, keeps another run's files out.
"""

from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context
from torch import nn

from fedcmd import task
from fedcmd.config import keeps_local_state
from fedcmd.flat import ParamLayout
from fedcmd.sampling import local_seed
from fedcmd.training import BatchStream, default_device, epoch_batches, make_optimizer, run_steps

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

    def __init__(self, position: tuple[int, int] = (0, 0), optimizer: dict[str, np.ndarray] | None = None,
                 trained_round: int = 0) -> None:
        self.position = position
        self.optimizer = optimizer or {}   # "<param index>/<state name>" -> array
        self.trained_round = trained_round

    # --- the node's context.state ---------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "LocalTrainingState":
        pass_index, offset, trained_round = (int(v) for v in arrays["position"])
        return cls((pass_index, offset), {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}, trained_round)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"position": np.array([*self.position, self.trained_round], dtype=np.int64)}
        arrays.update({f"opt/{k}": v for k, v in self.optimizer.items()})
        return arrays

    @classmethod
    def load(cls, context: Context) -> "LocalTrainingState | None":
        record = context.state.get(STATE_KEY)
        if not isinstance(record, ArrayRecord):
            return None
        return cls.from_arrays({k: record[k].numpy() for k in record})

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in self.to_arrays().items()})

    # --- the optimiser --------------------------------------------------------------------------
    @staticmethod
    def capture(optimiser: torch.optim.Optimizer) -> dict[str, np.ndarray]:
        return {f"{index}/{name}": value.detach().cpu().numpy().copy() if torch.is_tensor(value) else np.array(value)
                for index, entries in optimiser.state_dict()["state"].items() for name, value in entries.items()}

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
        with np.load(older[-1][1]) as arrays:
            return LocalTrainingState.from_arrays({k: arrays[k] for k in arrays.files})

    def write(self, state: LocalTrainingState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}{state.trained_round}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **state.to_arrays())
        os.replace(tmp, path)
        for _, old in self._files()[: -self.KEEP]:
            old.unlink(missing_ok=True)


def _state_files(config: Mapping[str, Any], context: Context | None, partition_id: int) -> StateFiles | None:
    folder = (context.node_config.get("state-dir") if context is not None else None) or config.get("client-state-dir")
    token = config.get("run-token")
    return StateFiles(folder, token, partition_id) if folder and token else None


def train_locally(config: Mapping[str, Any], partition_id: int, weights: np.ndarray, buffers: np.ndarray,
                  step_hook: Callable[[nn.Module], None] | None = None, context: Context | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Load (weights, buffers) into the model, train on this client's partition, return the result.

    `context` is the node's: it carries the batch-stream position and optimiser state between
    rounds when the config keeps them (without one, e.g. in a direct call, they start afresh).
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
        state = ((LocalTrainingState.load(context) if context is not None else None)
                 or (files.latest_before(server_round) if files else None) or LocalTrainingState())
    optimiser = make_optimizer(model.parameters(), config["optimizer"], lr=config["lr"], momentum=config["momentum"],
                               weight_decay=config["weight-decay"], betas=(config["adam-beta1"], config["adam-beta2"]),
                               eps=config["adam-eps"])
    if state is not None and config["optimizer-state"] == "keep":
        state.restore(optimiser)
    if config["local-steps"] > 0:
        stream = BatchStream(len(index), config["batch-size"], config["seed"], partition_id, *state.position)
        batches = stream.take(config["local-steps"])
    else:
        stream = None
        batches = epoch_batches(len(index), config["batch-size"], config["local-epochs"],
                                local_seed(config["seed"], server_round, partition_id))
    # batches hold positions within the partition; training reads those samples from the shared set
    started = time.perf_counter()
    result = run_steps(model, data.train_x, data.train_y, (index[b] for b in batches), optimiser, step_hook)
    seconds = time.perf_counter() - started
    if state is not None:
        if stream is not None:
            state.position = stream.position
        state.optimizer = LocalTrainingState.capture(optimiser) if config["optimizer-state"] == "keep" else {}
        state.trained_round = server_round
        if context is not None:
            state.save(context)
        if files is not None:
            files.write(state)
    metrics = {"num-examples": float(len(index)), "train-loss": float(result["train_loss"]),
               "local-steps": float(result["steps"]), "train-seconds": seconds}
    return weight_layout.flatten(model), buffer_layout.flatten(model), metrics


def hold_fixed(layout: ParamLayout, model: nn.Module, index: np.ndarray, values: np.ndarray
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
