"""What an algorithm declares, and the table of declared algorithms the rest of fedcmd is built from.

An algorithm (a strategy with its clients) is declared once, in its protocol module
`fedcmd/protocols/<module>.py`, as `ALGORITHMS = (Algorithm(...), ...)`: its name, its config keys
(type, default, check, meaning), which keys its clients need, and where its server class and its
client function live. Config validation (`fedcmd.config`), the strategy a run builds
(`fedcmd.server`), the function the ClientApp calls (`fedcmd.client_app`) and pyproject's run
config (checked by tests/test_config.py, written by `python -m fedcmd.config --pyproject`) all
come from these declarations, so adding an algorithm is adding its own files:

    fedcmd/protocols/<name>.py   ALGORITHMS, and the records both sides read and write
    strategies/<name>.py         the server class (a `strategies.base.FedcmdStrategy`)
    clients/<name>.py            the client function: (content, context, config, partition id) -> content
    tests/test_<name>.py

Protocol modules import neither `strategies` nor `flwr.serverapp`, so a ClientApp that reads
them pulls in no server code; server class and client function are named as "module:attribute"
and imported only by the side that runs them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable


def positive(v: Any) -> bool:
    return v > 0


def non_negative(v: Any) -> bool:
    return v >= 0


def fraction(v: Any) -> bool:
    return 0 < v <= 1


def one_of(names: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in names


@dataclass(frozen=True)
class Key:
    """A config key: its type, default, an optional check of its value and what the check means
    (said in the error when it fails), and one line on what the key does."""

    kind: type
    default: Any
    check: Callable[[Any], bool] | None = None
    meaning: str = ""
    doc: str = ""


@dataclass(frozen=True)
class Algorithm:
    """A declared algorithm (module docstring). `keys` are its own config keys, accepted (with their
    defaults) in every config; `client_keys` are the config keys, its own or shared ones, that its
    clients read beyond the keys every client needs (`fedcmd.config.CLIENT_KEYS`)."""

    name: str
    server: str  # "module:Class", a strategies.base.FedcmdStrategy subclass
    client: str  # "module:function", see `client_function`
    keys: dict[str, Key] = field(default_factory=dict)
    client_keys: tuple[str, ...] = ()
    doc: str = ""

    def server_class(self) -> type:
        return _load(self.server)

    def client_function(self) -> Callable:
        """(train message content, node context, resolved client config, partition id) -> reply content
        (without `metrics`' protocol checks, which the server does)."""
        return _load(self.client)


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def declared() -> dict[str, Algorithm]:
    """Every algorithm declared in `fedcmd.protocols`, by name, in module order (then declaration order)."""
    from fedcmd import protocols

    found: dict[str, Algorithm] = {}
    for info in sorted(pkgutil.iter_modules(protocols.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{protocols.__name__}.{info.name}")
        for algorithm in getattr(module, "ALGORITHMS", ()):
            if algorithm.name in found:
                raise RuntimeError(f"algorithm {algorithm.name!r} is declared twice ({module.__name__})")
            found[algorithm.name] = algorithm
    owners: dict[str, str] = {}
    for algorithm in found.values():
        for key in algorithm.keys:
            if key in owners:
                raise RuntimeError(f"config key {key!r} is declared by both {owners[key]} and {algorithm.name}")
            owners[key] = algorithm.name
    return found


def algorithm(name: str) -> Algorithm:
    algorithms = declared()
    if name not in algorithms:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(algorithms)}")
    return algorithms[name]
