"""The shape newcomers rely on: algorithms are declared in one place each, and the client side
imports no server code (strategies/, flwr.serverapp, the accountant, the server loop)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedcmd.algorithms import declared
from fedcmd.config import SCHEMA, client_keys

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("fedcmd", "clients", "strategies")
SERVER_ONLY = ("strategies", "flwr.serverapp", "fedcmd.accountant", "fedcmd.server", "fedcmd.engine")


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """Every module `name` imports, at any depth of its code (function-level imports too)."""
    found = set()
    tree = ast.parse(module_file(name).read_text())
    package = name if module_file(name).name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return found


def client_side_closure() -> dict[str, str]:
    """Project modules the ClientApp and the client functions reach, each with who imports it."""
    roots = ["fedcmd.client_app"] + [f"clients.{p.stem}" for p in (ROOT / "clients").glob("*.py")]
    roots += [f"fedcmd.protocols.{p.stem}" for p in (ROOT / "fedcmd" / "protocols").glob("*.py")]
    seen, stack = {root: "(root)" for root in roots}, list(roots)
    while stack:
        name = stack.pop()
        for imported in imports_of(name):
            if imported.split(".")[0] in PROJECT and module_file(imported) and imported not in seen:
                seen[imported] = name
                stack.append(imported)
            elif imported not in seen and imported.startswith(SERVER_ONLY):
                seen[imported] = name
    return seen


def test_the_client_side_imports_no_server_code():
    closure = client_side_closure()
    leaks = {name: by for name, by in closure.items() if name.startswith(SERVER_ONLY)}
    assert not leaks, f"client-side modules import server code (module <- importer): {leaks}"
    assert "fedcmd.wire" in closure and "clients.common" in closure  # the walk does reach the shared code


def test_a_client_process_loads_no_strategy_module():
    code = (
        "import sys, fedcmd.client_app, clients.fedavg, clients.cmd, clients.apf; "
        "print(sorted(m for m in sys.modules if m.startswith(('strategies', 'fedcmd.accountant', "
        "'fedcmd.server'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(declared()))
def test_every_declared_algorithm_resolves_to_its_server_class_and_client_function(name):
    from strategies.base import FedcmdStrategy

    algorithm = declared()[name]
    cls = algorithm.server_class()
    assert issubclass(cls, FedcmdStrategy) and cls.name == name
    assert callable(algorithm.client_function())
    assert set(algorithm.keys) <= set(SCHEMA) and set(client_keys(name)) <= set(SCHEMA)
    assert algorithm.doc
