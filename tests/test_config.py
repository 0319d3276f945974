import subprocess
import sys

import pytest

from fedcmd.config import DEFAULTS, ConfigError, load_config, resolve, to_toml


def test_defaults_resolve_and_round_trip(tmp_path):
    config = resolve({})
    assert config == DEFAULTS
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_overrides_parse_toml_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('num-server-rounds = 5\nstrategy = "fedavg"\n')
    config = load_config(path, ["lr=0.1", "partition=dirichlet", "download=true", "momentum=0"])
    assert config["num-server-rounds"] == 5 and config["lr"] == 0.1
    assert config["partition"] == "dirichlet" and config["download"] is True and config["momentum"] == 0.0


@pytest.mark.parametrize(
    "values, key",
    [
        ({"num-rounds": 3}, "num-rounds"),
        ({"lr": "fast"}, "lr"),
        ({"num-clients": 0}, "num-clients"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"strategy": "fedsgd"}, "strategy"),
        ({"num-clients": 2.5}, "num-clients"),
    ],
)
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        resolve(values)


def test_nested_table_and_missing_file_are_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="top-level"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_cli_bad_config_exits_nonzero_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("num-server-round = 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedcmd.cli", "run", str(path), "--engine", "inprocess"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "num-server-round" in proc.stderr


def test_flower_app_config_lists_every_key_with_its_default():
    import tomllib
    from pathlib import Path

    from fedcmd.config import pyproject_table

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    app_config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert app_config.pop("out-dir") == ""
    assert resolve(app_config) == DEFAULTS and set(app_config) == set(DEFAULTS)
    # Written from the declarations: a new algorithm's keys reach it with one command.
    assert pyproject_table() in text, "pyproject.toml's run config is stale: run python -m fedcmd.config --pyproject"


@pytest.mark.parametrize("key", ["lr", "round-timeout", "momentum", "max-update-norm"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'.*not a finite number"):
        load_config(None, [f"{key}={value}"])
