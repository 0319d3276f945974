"""Partition binding: which node public key may serve which partition (deployments with `--auth`).

With SuperNode authentication the SuperLink knows each node's public key, and the ServerApp sees
it in `grid.get_nodes()` (`NodeInfo.public_key`, PEM SubjectPublicKeyInfo as `flwr supernode
register` stored it). The credentials tooling (`fedcmd.deploy.make_credentials`) writes, next to
the node keys, a JSON file binding each key to one partition; the run-config key
`partition-binding` points the server at it. A node's claim in discovery must then be the
partition its key is bound to; any other claim, and any node whose key is bound to nothing, is
refused and logged.

Keys are compared by the SHA-256 of their DER SubjectPublicKeyInfo, so PEM line breaks or the SSH
encoding of the `.pub` file do not matter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedcmd.config import ConfigError

BINDING_NAME = "partition-binding.json"


def key_fingerprint(public_key) -> str:
    """SHA-256 (hex) of a public key's DER SubjectPublicKeyInfo (a `cryptography` key object)."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: bytes) -> str | None:
    """Fingerprint of a PEM public key as the SuperLink reports it; None if there is none or it is unreadable."""
    from cryptography.hazmat.primitives import serialization

    if not pem:
        return None
    try:
        return key_fingerprint(serialization.load_pem_public_key(bytes(pem)))
    except ValueError:
        return None


def ssh_fingerprint(pub_file: Path) -> str:
    """Fingerprint of an OpenSSH public key file (a node's `.pub`)."""
    from cryptography.hazmat.primitives import serialization

    return key_fingerprint(serialization.load_ssh_public_key(Path(pub_file).read_bytes()))


def write_binding(path: Path, pub_files: dict[int, Path]) -> Path:
    """Bind each partition's node key (`{partition: path of its .pub}`) to that partition."""
    entries = [
        {"partition": pid, "key-file": Path(pub).name, "sha256": ssh_fingerprint(pub)}
        for pid, pub in sorted(pub_files.items())
    ]
    Path(path).write_text(json.dumps({"bindings": entries}, indent=2) + "\n")
    return Path(path)


def read_binding(path: str | Path) -> dict[str, int]:
    """{key fingerprint: partition} from a binding file; ConfigError naming what is wrong."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["bindings"]
        binding = {str(e["sha256"]): e["partition"] for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"config key 'partition-binding': cannot read a binding from {path} ({err})") from err
    if any(isinstance(p, bool) or not isinstance(p, int) for p in binding.values()):
        raise ConfigError(f"config key 'partition-binding': {path} binds a key to a non-integer partition")
    if len(binding) != len(entries):
        raise ConfigError(f"config key 'partition-binding': {path} binds one key twice")
    return binding
