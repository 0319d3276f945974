"""From a config to the data, partitions and model of a run; shared by server and clients.

Everything is cached per process: a Ray actor or a SuperNode process serves many rounds and must
not decode the dataset or re-run the partitioner each time.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fedcmd.config import DATA_KEYS, PARTITION_KEYS
from fedcmd.data import ImageData, load_dataset, partition_indices
from fedcmd.flat import ParamLayout
from fedcmd.models import build_model


def _key(config: Mapping[str, Any], keys: tuple[str, ...]) -> tuple:
    return tuple(config[k] for k in keys)


@functools.lru_cache(maxsize=2)
def _dataset(key: tuple) -> ImageData:
    name, data_dir, download, n_train, n_test, shape, _seed, data_seed = key
    synthetic = None
    if name == "synthetic":
        synthetic = {"num_train": n_train, "num_test": n_test, "shape": shape, "seed": data_seed}
    return load_dataset(name, data_dir or None, download=download, synthetic=synthetic)


def dataset(config: Mapping[str, Any]) -> ImageData:
    return _dataset(_key(config, DATA_KEYS))


@functools.lru_cache(maxsize=2)
def _partitions(data_key: tuple, part_key: tuple) -> tuple[np.ndarray, ...]:
    num_clients, scheme, alpha, classes, data_seed = part_key
    labels = _dataset(data_key).train_y.numpy()
    return tuple(
        partition_indices(labels, num_clients, scheme, seed=data_seed, alpha=alpha, classes_per_partition=classes)
    )


def partitions(config: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    return _partitions(_key(config, DATA_KEYS), _key(config, PARTITION_KEYS))


def client_index(config: Mapping[str, Any], partition_id: int) -> torch.Tensor:
    """Positions of a client's samples in the training set (no copy of the samples themselves:
    local training indexes the shared tensors batch by batch)."""
    parts = partitions(config)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} is outside 0..{len(parts) - 1} (num-clients = {len(parts)})")
    return torch.from_numpy(parts[partition_id])


def client_data(config: Mapping[str, Any], partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of a client's samples and labels."""
    index = client_index(config, partition_id)
    data = dataset(config)
    return data.train_x[index], data.train_y[index]


def new_model(config: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """The configured model for the configured data; initialised from `seed` when given."""
    data = dataset(config)
    if seed is not None:
        torch.manual_seed(int(seed))
    return build_model(config["model"], in_shape=data.in_shape, num_classes=data.num_classes)


@functools.lru_cache(maxsize=4)
def _layouts(model_name: str, in_shape: tuple, num_classes: int) -> tuple[ParamLayout, ParamLayout]:
    model = build_model(model_name, in_shape=in_shape, num_classes=num_classes)
    return ParamLayout.from_module(model, kind="parameters"), ParamLayout.from_module(model, kind="buffers")


def layouts(config: Mapping[str, Any]) -> tuple[ParamLayout, ParamLayout]:
    """(trainable parameters, float buffers) layouts of the configured model."""
    data = dataset(config)
    return _layouts(config["model"], tuple(data.in_shape), data.num_classes)
