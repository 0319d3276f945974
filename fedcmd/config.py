"""Experiment configuration: flat kebab-case keys, as in Flower's run config, validated once.

A config is a TOML file of top-level keys (the same keys `flwr run --run-config` takes). Every key
has a type and a default: the keys every run has are here (`CORE`), each algorithm's own keys are
in its declaration (`fedcmd.algorithms`, `fedcmd/protocols/`); every config holds them all. An
unknown key or a value of the wrong type or range raises `ConfigError` naming the key, before
anything runs.

pyproject.toml's `[tool.flwr.app.config]` lists every key with its default (Flower accepts no
other key in `--run-config`); tests/test_config.py checks it, and

    python -m fedcmd.config --pyproject      # rewrites that table from the declarations

writes it.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from fedcmd import algorithms
from fedcmd.algorithms import Key, fraction, non_negative, one_of, positive
from fedcmd.codecs import CODECS
from fedcmd.data import PARTITION_SCHEMES as PARTITION_NAMES

STRATEGY_NAMES = tuple(algorithms.declared())
OPTIMIZER_NAMES = ("sgd", "adam")  # fedcmd.training.make_optimizer
OPTIMIZER_STATES = ("reset", "keep")


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or range."""


class SetupError(ConfigError):
    """A valid config that cannot be run as asked: the data, the model or the output folder do not fit."""


# The keys of every run.
CORE: dict[str, Key] = {
    "num-server-rounds": Key(int, 3, positive, "a positive integer"),
    "num-clients": Key(int, 10, positive, "a positive integer"),
    "fraction-train": Key(float, 1.0, fraction, "in (0, 1]"),
    "local-epochs": Key(int, 1, positive, "a positive integer"),
    # Optimizer steps per round from a client's persistent batch stream; 0: `local-epochs` epochs.
    "local-steps": Key(int, 0, non_negative, "a non-negative integer (0: use local-epochs)"),
    "batch-size": Key(int, 32, positive, "a positive integer"),
    "lr": Key(float, 0.05, positive, "positive"),
    "momentum": Key(float, 0.0, lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight-decay": Key(float, 0.0, non_negative, "non-negative"),
    "optimizer": Key(str, "sgd", one_of(OPTIMIZER_NAMES), f"one of {', '.join(OPTIMIZER_NAMES)}"),
    "adam-beta1": Key(float, 0.9, lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam-beta2": Key(float, 0.999, lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam-eps": Key(float, 1e-8, positive, "positive"),
    # keep: each client's optimizer state (momentum, Adam moments) lives on in its node across rounds.
    "optimizer-state": Key(str, "reset", one_of(OPTIMIZER_STATES), f"one of {', '.join(OPTIMIZER_STATES)}"),
    "seed": Key(int, 0, non_negative, "a non-negative integer"),
    "data-seed": Key(int, 0, non_negative, "a non-negative integer"),
    "dataset": Key(str, "fashion-mnist", None, ""),
    "data-dir": Key(str, "", None, ""),
    "download": Key(bool, False, None, ""),
    "synthetic-train-size": Key(int, 2000, positive, "a positive integer"),
    "synthetic-test-size": Key(int, 500, positive, "a positive integer"),
    "synthetic-shape": Key(str, "1x28x28", None, ""),
    "partition": Key(str, "iid", one_of(PARTITION_NAMES), f"one of {', '.join(PARTITION_NAMES)}"),
    "dirichlet-alpha": Key(float, 0.5, positive, "positive"),
    "classes-per-client": Key(int, 2, positive, "a positive integer"),
    "model": Key(str, "lenet5", None, ""),
    "strategy": Key(str, "fedavg", one_of(STRATEGY_NAMES), f"one of {', '.join(STRATEGY_NAMES)}"),
    "round-timeout": Key(float, 600.0, positive, "positive (seconds)"),
    # Central evaluation every k rounds and after the last one.
    "eval-every": Key(int, 1, positive, "a positive integer"),
    # Wire codecs for the dense values (fedcmd/codecs.py, strategies/base.py): on the uplink and on the
    # downlink, each none | fp16 | bf16 | int8 | topk, applied to the change from what the receiver holds.
    "codec-up": Key(str, "none", one_of(CODECS), f"one of {', '.join(CODECS)}"),
    "codec-down": Key(str, "none", one_of(CODECS), f"one of {', '.join(CODECS)}"),
    "codec-chunk": Key(int, 1024, positive, "a positive integer"),  # int8: values per scale
    "topk-fraction": Key(float, 0.01, fraction, "in (0, 1]"),  # topk: share of the values sent
    # Defences against clients that lie (strategies/base.py, fedcmd/server.py)
    "max-update-norm": Key(float, 0.0, non_negative, "non-negative (0 = no bound)"),
    "partition-binding": Key(str, "", None, ""),  # JSON file: node public key -> partition (deploy --auth)
}

# Every key: CORE, then each declared algorithm's own keys.
SCHEMA: dict[str, Key] = dict(CORE)
for _algorithm in algorithms.declared().values():
    if set(_algorithm.keys) & set(CORE):
        raise RuntimeError(f"algorithm {_algorithm.name} declares core keys {sorted(set(_algorithm.keys) & set(CORE))}")
    SCHEMA.update(_algorithm.keys)

DEFAULTS: dict[str, Any] = {key: spec.default for key, spec in SCHEMA.items()}

# What determines a client's data (fedcmd.task caches datasets and partitions by these), and the
# keys every client needs beyond them to train and encode its reply; an algorithm's declaration
# adds its own (`client_keys`). Sent in every train message.
DATA_KEYS = ("dataset", "data-dir", "download", "synthetic-train-size", "synthetic-test-size", "synthetic-shape")
DATA_KEYS += ("seed", "data-seed")
PARTITION_KEYS = ("num-clients", "partition", "dirichlet-alpha", "classes-per-client", "data-seed")
TRAINING_KEYS = ("model", "local-epochs", "local-steps", "batch-size", "lr", "momentum", "weight-decay", "optimizer")
TRAINING_KEYS += ("adam-beta1", "adam-beta2", "adam-eps", "optimizer-state", "strategy")
CODEC_KEYS = ("codec-up", "codec-down", "codec-chunk", "topk-fraction")
CLIENT_KEYS = tuple(dict.fromkeys(DATA_KEYS + PARTITION_KEYS + TRAINING_KEYS + CODEC_KEYS))


def client_keys(strategy: str) -> tuple[str, ...]:
    """The config keys a client of `strategy` reads (ValueError for an unknown strategy)."""
    extra = algorithms.algorithm(strategy).client_keys
    return CLIENT_KEYS + tuple(key for key in extra if key not in CLIENT_KEYS)


def keeps_local_state(config: dict[str, Any]) -> bool:
    """Whether clients carry local-training state (stream position, optimizer, top-k error-feedback
    residual) from round to round."""
    return config["local-steps"] > 0 or config["optimizer-state"] == "keep" or config["codec-up"] == "topk"


def _coerce(key: str, value: Any) -> Any:
    kind, check, meaning = SCHEMA[key].kind, SCHEMA[key].check, SCHEMA[key].meaning
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
            f"unknown config key '{unknown[0]}'"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
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


# Keys of the Flower app's run config that are not experiment keys.
APP_ONLY_KEYS = {"out-dir": ""}  # where `flwr run` writes the outputs (fedcmd/server_app.py)
PYPROJECT_TABLE = "[tool.flwr.app.config]"


def pyproject_table() -> str:
    """pyproject.toml's run-config table: every key with its default, then the app's own keys."""
    comment = "# Every experiment key (fedcmd/config.py), so `flwr run --run-config` accepts any of them.\n"
    comment += "# Generated: python -m fedcmd.config --pyproject\n"
    body = to_toml({**DEFAULTS, **APP_ONLY_KEYS})
    return f"{PYPROJECT_TABLE}\n{comment}{body}"


def write_pyproject(path: str | Path) -> bool:
    """Rewrite the run-config table of the pyproject.toml at `path`; True if it changed."""
    path = Path(path)
    text = path.read_text()
    start = text.index(PYPROJECT_TABLE)
    end = text.find("\n[", start + len(PYPROJECT_TABLE))
    end = len(text) if end < 0 else end + 1
    new = text[:start] + pyproject_table() + ("\n" if end < len(text) else "") + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="fedcmd's config keys")
    parser.add_argument(
        "--pyproject",
        nargs="?",
        const="pyproject.toml",
        metavar="PATH",
        help="rewrite the [tool.flwr.app.config] table of PATH (default ./pyproject.toml)",
    )
    args = parser.parse_args()
    if args.pyproject:
        print(("rewrote " if write_pyproject(args.pyproject) else "unchanged: ") + args.pyproject)
    else:
        print(to_toml(DEFAULTS), end="")
