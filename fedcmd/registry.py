"""Strategy names -> server strategy class and client train handler (one algorithm, one file each)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

# name: (server module:class, client module:function)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "fedavg": ("strategies.fedavg:FedAvg", "clients.fedavg:train"),
    "cmd": ("strategies.cmd:CMD", "clients.cmd:train"),
    "apf": ("strategies.apf:APF", "clients.apf:train"),
    "a-apf": ("strategies.apf:AggressiveAPF", "clients.apf:train"),
}


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def _entry(name: str) -> tuple[str, str]:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def strategy_class(name: str) -> type:
    return _load(_entry(name)[0])


def client_handler(name: str) -> Callable:
    return _load(_entry(name)[1])
