"""The app a deployment submits (`fedcmd.deploy.write_app`) holds the whole packages pyproject.toml
declares, subpackages included, filtered by Flower's own FAB rules; `flwr run` packs the folder into
the same files. About 5 s."""

import io
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedcmd.config import DEFAULTS
from fedcmd.deploy import PROJECT, write_app


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_module_in_a_new_subpackage_reaches_the_app(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(PROJECT / name, project / name)
    sources = {
        "fedcmd/__init__.py": "",
        "fedcmd/server_app.py": "app = None\n",
        "fedcmd/protocol/__init__.py": "",
        "fedcmd/protocol/wire/messages.py": "KEYS = ()\n",  # no __init__: namespace
        "strategies/__init__.py": "",
        "strategies/fedprox/strategy.py": "",
        "clients/fedprox/client.py": "",
        "fedcmd/protocol/schema.json": "{}",  # data Flower ships (json, toml, md, yaml)
        # what Flower leaves out: tests, bytecode, files the repository ignores, other file types
        "fedcmd/protocol/test_messages.py": "",
        "fedcmd/__pycache__/server.cpython-311.pyc": "",
        "fedcmd/notes/draft.md": "",
        "fedcmd/run.log": "",
        "fedcmd/weights.bin": "",
        # not a declared package
        "experiments/sweep.py": "",
        "experiments/results/table.json": "{}",
        "tests/conftest.py": "",
        "README.md": "# fedcmd\n",
    }
    for name, text in sources.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    app = write_app(tmp_path / "app", project)
    assert files_under(app) == {
        "pyproject.toml",
        "fedcmd/__init__.py",
        "fedcmd/server_app.py",
        "fedcmd/protocol/__init__.py",
        "fedcmd/protocol/wire/messages.py",
        "fedcmd/protocol/schema.json",
        "strategies/__init__.py",
        "strategies/fedprox/strategy.py",
        "clients/fedprox/client.py",
    }
    assert (app / "fedcmd/protocol/wire/messages.py").read_text() == "KEYS = ()\n"


def test_the_app_holds_every_tracked_module_and_every_config_key(tmp_path):
    app = write_app(tmp_path / "app")
    tracked = subprocess.run(
        ["git", "-C", str(PROJECT), "ls-files", "fedcmd", "strategies", "clients"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {name for name in tracked if name.endswith(".py")} <= files_under(app)
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"].keys() == {*DEFAULTS, "out-dir"}
    assert pyproject["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedcmd.server_app:app"
    # What `flwr run` sends: the FAB Flower builds from the folder holds the folder's files, no more.
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        assert set(fab.namelist()) == files_under(app) | {".info/CONTENT"}
