"""Experiment configuration: flat kebab-case keys, as in Flower's run config, validated once.

A config is a TOML file of top-level keys (the same keys `flwr run --run-config` takes). Every key
has a default and a type here; an unknown key or a value of the wrong type or range raises
`ConfigError` naming the key, before anything runs.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Callable

from fedcmd.codecs import CODECS

STRATEGY_NAMES = ("fedavg", "cmd", "apf", "a-apf")
PARTITION_NAMES = ("iid", "dirichlet", "pathological")
OPTIMIZER_NAMES = ("sgd", "adam")  # fedcmd.training.make_optimizer
OPTIMIZER_STATES = ("reset", "keep")


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or range."""


class SetupError(ConfigError):
    """A valid config that cannot be run as asked: the data, the model or the output folder do not fit."""


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0 < v <= 1


def _one_of(names: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in names


# key: (type, default, check or None, what the check means)
SCHEMA: dict[str, tuple[type, Any, Callable[[Any], bool] | None, str]] = {
    "num-server-rounds": (int, 3, _positive, "a positive integer"),
    "num-clients": (int, 10, _positive, "a positive integer"),
    "fraction-train": (float, 1.0, _fraction, "in (0, 1]"),
    "local-epochs": (int, 1, _positive, "a positive integer"),
    # Optimizer steps per round from a client's persistent batch stream; 0: `local-epochs` epochs.
    "local-steps": (int, 0, _non_negative, "a non-negative integer (0: use local-epochs)"),
    "batch-size": (int, 32, _positive, "a positive integer"),
    "lr": (float, 0.05, _positive, "positive"),
    "momentum": (float, 0.0, lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight-decay": (float, 0.0, _non_negative, "non-negative"),
    "optimizer": (str, "sgd", _one_of(OPTIMIZER_NAMES), f"one of {', '.join(OPTIMIZER_NAMES)}"),
    "adam-beta1": (float, 0.9, lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam-beta2": (float, 0.999, lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam-eps": (float, 1e-8, _positive, "positive"),
    # keep: each client's optimizer state (momentum, Adam moments) lives on in its node across rounds.
    "optimizer-state": (str, "reset", _one_of(OPTIMIZER_STATES), f"one of {', '.join(OPTIMIZER_STATES)}"),
    "seed": (int, 0, _non_negative, "a non-negative integer"),
    "data-seed": (int, 0, _non_negative, "a non-negative integer"),
    "dataset": (str, "fashion-mnist", None, ""),
    "data-dir": (str, "", None, ""),
    "download": (bool, False, None, ""),
    "synthetic-train-size": (int, 2000, _positive, "a positive integer"),
    "synthetic-test-size": (int, 500, _positive, "a positive integer"),
    "synthetic-shape": (str, "1x28x28", None, ""),
    "partition": (str, "iid", _one_of(PARTITION_NAMES), f"one of {', '.join(PARTITION_NAMES)}"),
    "dirichlet-alpha": (float, 0.5, _positive, "positive"),
    "classes-per-client": (int, 2, _positive, "a positive integer"),
    "model": (str, "lenet5", None, ""),
    "strategy": (str, "fedavg", _one_of(STRATEGY_NAMES), f"one of {', '.join(STRATEGY_NAMES)}"),
    "round-timeout": (float, 600.0, _positive, "positive (seconds)"),
    # Central evaluation every k rounds and after the last one.
    "eval-every": (int, 1, _positive, "a positive integer"),
    # Federated CMD (strategies/cmd.py)
    "cmd-modes": (int, 10, _positive, "a positive integer"),
    "cmd-warmup": (int, 5, _positive, "a positive integer"),
    "cmd-every": (int, 1, _positive, "a positive integer"),
    "cmd-fraction": (float, 0.15, _fraction, "in (0, 1]"),
    "cmd-of-remaining": (bool, True, None, ""),
    "cmd-max-embedded": (float, 0.9, _fraction, "in (0, 1]"),
    "cmd-samples": (int, 1000, _positive, "a positive integer"),
    "cmd-embedded-training": (str, "frozen", _one_of(("snap", "frozen")), "one of snap, frozen"),
    # APF / A-APF (strategies/apf.py)
    "apf-threshold": (float, 0.05, _positive, "positive"),
    "apf-alpha": (float, 0.99, lambda v: 0 < v < 1, "in (0, 1)"),
    "apf-check-every": (int, 1, _positive, "a positive integer"),
    "apf-tighten-at": (float, 0.8, _fraction, "in (0, 1]"),
    "apf-random-freeze-periods": (int, 1, _positive, "a positive integer"),  # A-APF's random freeze length
    # Wire codecs for the dense values (fedcmd/codecs.py, strategies/base.py): on the uplink and on the
    # downlink, each none | fp16 | bf16 | int8 | topk, applied to the change from what the receiver holds.
    "codec-up": (str, "none", _one_of(CODECS), f"one of {', '.join(CODECS)}"),
    "codec-down": (str, "none", _one_of(CODECS), f"one of {', '.join(CODECS)}"),
    "codec-chunk": (int, 1024, _positive, "a positive integer"),  # int8: values per scale
    "topk-fraction": (float, 0.01, _fraction, "in (0, 1]"),      # topk: share of the values sent
    # Defences against clients that lie (strategies/base.py, fedcmd/server.py)
    "max-update-norm": (float, 0.0, _non_negative, "non-negative (0 = no bound)"),
    "partition-binding": (str, "", None, ""),  # JSON file: node public key -> partition (deploy --auth)
}

DEFAULTS: dict[str, Any] = {key: spec[1] for key, spec in SCHEMA.items()}


def keeps_local_state(config: dict[str, Any]) -> bool:
    """Whether clients carry local-training state (stream position, optimizer, top-k error-feedback
    residual) from round to round."""
    return config["local-steps"] > 0 or config["optimizer-state"] == "keep" or config["codec-up"] == "topk"


def _coerce(key: str, value: Any) -> Any:
    kind, _, check, meaning = SCHEMA[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config key '{key}': expected {kind.__name__}, got {value!r}")
    # TOML accepts inf and nan, and every range check above passes inf (lr = inf ran to the end).
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': {value!r} is not a finite number")
    if check is not None and not check(value):
        raise ConfigError(f"config key '{key}': {value!r} is not {meaning}")
    return value


def _parse_override(text: str) -> tuple[str, Any]:
    """Parse `key=value` with TOML value syntax, falling back to a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `values`, each key checked; returns a new dict."""
    unknown = sorted(set(values) - set(SCHEMA))
    if unknown:
        raise ConfigError(
            f"unknown config key '{unknown[0]}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; valid keys: {', '.join(SCHEMA)}"
        )
    config = dict(DEFAULTS)
    for key, value in values.items():
        config[key] = _coerce(key, value)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a TOML config (or none), apply `key=value` overrides, validate, return the full config."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
        nested = [key for key, value in values.items() if isinstance(value, dict)]
        if nested:
            raise ConfigError(f"{path}: config keys must be top-level; found table [{nested[0]}]")
    for text in overrides:
        key, value = _parse_override(text)
        values[key] = value
    return resolve(values)


def to_toml(config: dict[str, Any]) -> str:
    """The resolved config as TOML, keys in schema order."""
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
