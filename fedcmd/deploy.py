"""Deploy a fedcmd run on this machine: a SuperLink, N SuperNodes and `flwr run`, all on loopback.

    python -m fedcmd.deploy run CONFIG.toml --out DIR [--set key=value ...] [--tls] [--auth]
    python -m fedcmd.deploy credentials DIR --nodes N
    python -m fedcmd.deploy app DIR CONFIG.toml --out OUT [--set key=value ...]

`run` starts a SuperLink and one SuperNode per partition (`--node-config "partition-id=K
num-partitions=N"`, N = num-clients), submits the fedcmd app with the experiment config as its run
config, follows the run's events (DIR/events.jsonl, `fedcmd.events`) to report its progress and to
learn that it finished or failed, and stops every process it started, by PID, whatever happens. It
leaves in DIR/deploy/ the logs of every process (superlink.log, supernode-K.log, flwr-run.log: the
run's log stream), the SuperLink's record of the run (superlink-run.json: status, traffic, compute time),
the generated app folder and run config, the Flower home (FLWR_HOME) and, with --tls/--auth, the
credentials it made. `credentials` makes what --tls/--auth need for a deployment run by hand; `app`
writes the app folder and run-config file to give `flwr run` by hand (experiments/deploy/README.md).

Decisions:
- Ports are picked free at start (bound to port 0, then released: another process could take one
  in between, which shows as a start-up error); everything binds 127.0.0.1. Runtime dependency
  installation is off (the venv has everything), telemetry and update checks are off, FLWR_HOME is
  DIR/deploy/flwr-home so a deployment never touches ~/.flwr or another deployment's state.
- Flower fuses `--run-config` with the app's `[tool.flwr.app.config]` and refuses keys that table
  lacks, so the app is submitted from a generated folder (DIR/deploy/app) whose pyproject.toml
  declares every fedcmd config key (with its default) plus `out-dir`. The run config is the
  resolved experiment config, the same dict a simulation runs.
- The app folder holds what Flower's own builder (`build_fab_from_files`, what `flwr build` and
  `flwr run` use) makes of the packages pyproject.toml declares (`[tool.setuptools.packages.find]`:
  what `pip install .` installs), whole trees with their subpackages: Flower's file rules apply
  (Python, TOML, Markdown, JSON, YAML; no __pycache__ or test_*.py; the repository's .gitignore
  respected; at most 10 MB). Not the whole checkout, as `flwr run .` would ship: experiments/
  (scripts, configs and results) is no part of the app, and SuperNodes would receive it every run.
- The run is submitted with `flwr run --format json`, which answers the run id; `flwr log RUN-ID
  --stream` writes the run's log to flwr-run.log. Progress, and how the run ended, come from the
  run's events, not from its log text: the run is over at its run_finished or run_failed event
  (that one carries the error). A run that ends without either (refused before it wrote anything,
  its ServerApp process killed) is failed with the SuperLink's status and its details (Flower
  puts the ServerApp's exception there); a SuperLink that exits ends the run too.
- `--tls` gives the SuperLink a certificate for IP:127.0.0.1 signed by a CA made for the deployment;
  nodes and the `flwr` CLI verify it. `--auth` (implies --tls) turns on SuperNode authentication:
  each node gets an ECDSA P-384 key in SSH format whose public half is registered with
  `flwr supernode register` before the node starts; a node with any other key is refused.
- Credentials are made with the `cryptography` package (a Flower dependency): no openssl needed.
  They include partition-binding.json, binding node key K to partition K; with `--auth` the run
  config's `partition-binding` points at it, so a node may only serve the partition its key is
  bound to (`fedcmd.binding`): a registered node claiming another partition is refused.
- Every process the deployment starts is stopped, and so is every process they start: the
  SuperLink starts the ServerApp (`flwr-serverapp`) in a session of its own, which outlived a
  crashed SuperLink. A watcher records the descendants of the started processes (PID and start
  time, so a reused PID is never signalled) and `stop` ends those still alive.
"""

from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

from fedcmd.binding import BINDING_NAME, write_binding
from fedcmd.config import DEFAULTS, ConfigError, load_config, to_toml
from fedcmd.events import ENDS, EVENTS_NAME, ROUND_FINISHED, RUN_FAILED, Event, EventFollower, print_progress

LOOPBACK = "127.0.0.1"
CONNECTION = "fedcmd-local"
PROJECT = Path(__file__).resolve().parents[1]


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which and points at the log to read."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower console script of this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeploymentError(f"{name} not found next to {sys.executable}: is flwr installed in this environment?")
    return str(path)


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the processes of group `pgid` that are not zombies (read from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def descendants(pid: int) -> list[int]:
    """PIDs of the children of `pid`, their children, and so on (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def stop_process_groups(pgids: list[int], *, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to each process group, wait up to `grace` seconds until none has a live member, then
    SIGKILL what is left. The processes need not be children of this one."""

    def signal_group(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    for pgid in pgids:
        signal_group(pgid, sig)
    deadline = time.monotonic() + grace
    while any(live_group_members(pgid) for pgid in pgids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pgid in pgids:
        signal_group(pgid, signal.SIGKILL)


def flwr_json(
    args: tuple[str, ...] | list[str], *, env: dict[str, str], cwd: Path, timeout: float = 120
) -> dict[str, Any]:
    """Run a `flwr` CLI command with `--format json`; returns its JSON, or raises if it did not succeed."""
    done = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    try:
        answer, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{") :])
    except ValueError:
        answer = {}
    if not answer.get("success"):
        raise DeploymentError(f"flwr {' '.join(args)} failed: {done.stdout}{done.stderr}".strip())
    return answer


def run_record(
    run_id: int | str, *, env: dict[str, str], cwd: Path, connection: str | None = None, wait: float = 0.0
) -> dict[str, Any]:
    """The SuperLink's record of a run (`flwr ls --run-id`: status, status-details, traffic, compute
    time); with `wait`, asked again for up to that many seconds until the run is `finished:...`."""
    deadline = time.monotonic() + wait
    while True:
        args = ["ls", *([connection] if connection else []), "--run-id", str(run_id)]
        record = flwr_json(args, env=env, cwd=cwd)["runs"][0]
        if record["status"].startswith("finished") or time.monotonic() >= deadline:
            return record
        time.sleep(1.0)


def follow_events(
    follower: EventFollower,
    *,
    ended: Callable[[], str | None],
    timeout: float,
    on_event: Callable[[Event], None] | None = None,
    every: float = 0.5,
) -> Event:
    """Follow a run's events until it finishes or fails; returns its run_finished or run_failed event.

    `on_event(event)` is called for every event, as it comes. `ended()` says why the run is over
    although it wrote no end event (None while it may still write one): DeploymentError with that
    reason, as after `timeout` seconds. The events are read after asking `ended()`, so an end event
    written just before the run's process exited is never missed.
    """
    deadline = time.monotonic() + timeout
    while True:
        gone = ended()
        for event in follower.poll():
            if on_event is not None:
                on_event(event)
            if event["event"] in ENDS:
                return event
        if gone is not None:
            raise DeploymentError(gone)
        if time.monotonic() > deadline:
            raise DeploymentError(f"the run did not end within {timeout} s")
        time.sleep(every)


def run_summary(end: Event, log_path: Path) -> dict[str, Any]:
    """The summary a run's end event points at; DeploymentError with the run's error if it failed."""
    if end["event"] == RUN_FAILED:
        raise DeploymentError(f"the run failed after round {end['round']}: {end['error']}; see {log_path}")
    return json.loads(Path(end["summary_path"]).read_text())


# ----- credentials -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, name: str | int) -> Path:
        """Private key of node `name` (OpenSSH format); the public key is the same path + `.pub`."""
        return self.folder / f"node-{name}"

    @property
    def binding(self) -> Path:
        """Which node key may serve which partition (node-K: partition K), for `partition-binding`."""
        return self.folder / BINDING_NAME


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair in SSH format at `path` and `path.pub` (kept if present)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        path.with_name(path.name + ".pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
        )
    return path


def make_credentials(folder: str | Path, num_nodes: int, *, days: int = 30) -> Credentials:
    """A CA, a server certificate for IP:127.0.0.1 (and DNS:localhost) and `num_nodes` node keys.

    Files already in `folder` are kept, so a deployment can be restarted with the same identities.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    creds = Credentials(Path(folder))
    creds.folder.mkdir(parents=True, exist_ok=True)
    if not (creds.ca_cert.exists() and creds.server_cert.exists() and creds.server_key.exists()):
        now = datetime.datetime.now(datetime.timezone.utc)
        valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcmd deployment CA")])
        signs_certificates = x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(signs_certificates, critical=True)
            .sign(ca_key, hashes.SHA384())
        )
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_names = x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
        )
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(server_names, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        creds.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        creds.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            creds.server_key,
            server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    for k in range(num_nodes):
        make_node_key(creds.node_key(k))
    write_binding(creds.binding, {k: Path(f"{creds.node_key(k)}.pub") for k in range(num_nodes)})
    return creds


# ----- the app as Flower receives it -------------------------------------------------------------
def app_packages(root: Path, pyproject: dict[str, Any]) -> list[str]:
    """The top-level packages in `root` that its pyproject.toml declares (`[tool.setuptools.packages.find]`)."""
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    matches = lambda name, key: any(fnmatch(name, pattern) for pattern in find.get(key, ()))
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and d.name.isidentifier() and matches(d.name, "include") and not matches(d.name, "exclude")
    )


def write_app(folder: Path, project: Path = PROJECT) -> Path:
    """The fedcmd app as Flower packages it (see the module docstring): the FAB that Flower's builder
    makes of the packages `project` declares and of a pyproject.toml declaring every config key plus
    `out-dir`, unpacked into `folder`."""
    import tomli_w
    from flwr.cli.build import build_fab_from_files

    declared = tomllib.loads((project / "pyproject.toml").read_text())
    app = declared["tool"]["flwr"]["app"]
    app["config"] = {**DEFAULTS, "out-dir": ""}
    pyproject = {
        "build-system": declared["build-system"],
        "project": declared["project"],
        "tool": {"flwr": {"app": app}},
    }
    pyproject["project"].pop("readme", None)  # the README is not part of the app
    files: dict[str, bytes | Path] = {"pyproject.toml": tomli_w.dumps(pyproject).encode()}
    if (project / ".gitignore").is_file():
        files[".gitignore"] = project / ".gitignore"
    for package in app_packages(project, declared):
        for path in sorted((project / package).rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(project).as_posix()] = path
    try:
        fab, _ = build_fab_from_files(files)
    except ValueError as err:
        raise DeploymentError(f"Flower cannot package the app: {err}") from err
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        for name in archive.namelist():
            if not name.startswith(".info/"):  # the FAB's manifest: Flower writes it anew when it packs the folder
                archive.extract(name, folder)
    return folder


def write_run_config(path: Path, config: dict[str, Any], out: Path) -> Path:
    """The experiment config as a `--run-config` TOML file, with the output folder."""
    path.write_text(to_toml(config) + to_toml({"out-dir": str(out.resolve())}))
    return path


# ----- processes ---------------------------------------------------------------------------------
def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    except OSError:
        return None
    return (int(rest[1]), int(rest[19])) if len(rest) > 19 and rest[0] != "Z" else None


def _descendants(roots: set[int]) -> dict[int, int]:
    """{pid: start time} of every live descendant of `roots`."""
    table = {int(e): _stat(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    found, todo = {}, list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


class Deployment:
    """A SuperLink and SuperNodes on loopback, started here and stopped here, by PID.

    Use as a context manager: leaving it (normally or by an exception) stops every process it
    started, SuperNodes first, each with its process group (the ClientApp/ServerApp processes
    Flower spawns for them), SIGTERM then SIGKILL.
    """

    def __init__(
        self,
        folder: str | Path,
        num_nodes: int,
        *,
        tls: bool = False,
        auth: bool = False,
        credentials: Credentials | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.num_nodes = num_nodes
        self.tls = tls or auth
        self.auth = auth
        self.home = self.folder / "flwr-home"
        self.credentials = credentials
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.node_ids: dict[int, int] = {}  # partition -> node id registered for its key (--auth)
        self._extra: list[subprocess.Popen] = []
        self._logs: list = []
        self._sigterm = None
        self.descendants: dict[int, int] = {}  # pid -> start time of what the started processes started
        self._watching = threading.Event()

    # ----- environment ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def _write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        lines += [f'root-certificates = "{self.credentials.ca_cert}"'] if self.tls else ["insecure = true"]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.folder / log_name, "ab")
        self._logs.append(log)
        # A new session: the process and what it spawns form one group, stopped together by its PID.
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.folder, start_new_session=True
        )

    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run a `flwr` CLI command (with `--format json`) against this deployment; returns its JSON."""
        return flwr_json(args, env=self.env(), cwd=self.folder, timeout=timeout)

    # ----- starting --------------------------------------------------------------------------
    def start(self, *, wait_seconds: float = 90) -> "Deployment":
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.tls and self.credentials is None:
            self.credentials = make_credentials(self.folder / "credentials", self.num_nodes)
        self.port = free_port()
        self._write_connection()
        args = [
            flower_bin("flower-superlink"),
            "--disable-runtime-dependency-installation",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--database",
            ":flwr-in-memory:",
        ]
        if self.tls:
            args += [
                "--ssl-ca-certfile",
                str(self.credentials.ca_cert),
                "--ssl-certfile",
                str(self.credentials.server_cert),
                "--ssl-keyfile",
                str(self.credentials.server_key),
            ]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--enable-supernode-auth"]
        self.superlink = self._spawn(args, "superlink.log")
        self._watching.set()
        threading.Thread(target=self._watch_descendants, daemon=True).start()
        self._wait_for_port(self.port, self.superlink, "superlink.log", wait_seconds)
        if self.auth:
            for k in range(self.num_nodes):
                self.node_ids[k] = self.register(self.credentials.node_key(k))
        for k in range(self.num_nodes):
            self.start_node(k)
        self.wait_for_nodes(self.num_nodes, wait_seconds)
        return self

    def _wait_for_port(self, port: int, proc: subprocess.Popen, log_name: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"process exited with code {proc.returncode}; see {self.folder / log_name}")
            with socket.socket() as sock:
                if sock.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"nothing listens on {LOOPBACK}:{port} after {seconds} s; see {self.folder / log_name}")

    def register(self, node_key: Path) -> int:
        """Register a node's public key with the SuperLink; returns the node id it will have."""
        return int(
            self.flwr("supernode", "register", str(node_key.with_name(node_key.name + ".pub")), CONNECTION)["node-id"]
        )

    def node_args(self, partition_id: int, *, key: Path | None = None) -> list[str]:
        args = [
            flower_bin("flower-supernode"),
            "--superlink",
            self.address,
            "--port",
            str(free_port()),
            "--node-config",
            f"partition-id={partition_id} num-partitions={self.num_nodes}",
        ]
        args += ["--root-certificates", str(self.credentials.ca_cert)] if self.tls else ["--insecure"]
        if self.auth:
            args += ["--auth-supernode-private-key", str(key or self.credentials.node_key(partition_id))]
        return args

    def start_node(self, partition_id: int, *, wait_seconds: float = 180) -> subprocess.Popen:
        """Start (or restart) the SuperNode holding partition `partition_id`.

        With authentication a node keeps its id across restarts, and the SuperLink refuses to
        activate an id it still counts as online (a crashed node stays so until its heartbeats are
        missed, about a minute): a restart first waits for the SuperLink to see the old one offline.
        """
        if partition_id in self.nodes:
            if self.nodes[partition_id].poll() is None:
                raise DeploymentError(f"the SuperNode of partition {partition_id} is already running")
            if self.auth:
                self.wait_until_offline(self.node_ids[partition_id], wait_seconds)
        self.nodes[partition_id] = self._spawn(self.node_args(partition_id), f"supernode-{partition_id}.log")
        return self.nodes[partition_id]

    def wait_until_offline(self, node_id: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(int(n["node-id"]) == node_id and n["status"] == "online" for n in self.node_list()):
            if time.monotonic() > deadline:
                raise DeploymentError(f"node {node_id} still online after {seconds} s")
            time.sleep(2.0)

    def start_foreign_node(
        self, key: Path, partition_id: int = 0, log_name: str = "supernode-foreign.log"
    ) -> subprocess.Popen:
        """A SuperNode with a key of its own choosing (e.g. one nobody registered)."""
        proc = self._spawn(self.node_args(partition_id, key=key), log_name)
        self._extra.append(proc)
        return proc

    def node_list(self) -> list[dict[str, Any]]:
        return self.flwr("supernode", "list", CONNECTION)["nodes"]

    def wait_for_nodes(self, count: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            online = [n for n in self.node_list() if n.get("status") == "online"]
            if len(online) >= count:
                return
            dead = [k for k, p in self.nodes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise DeploymentError(
                    f"{len(online)}/{count} SuperNodes online"
                    + (f"; SuperNode {dead[0]} exited, see supernode-{dead[0]}.log" if dead else f" after {seconds} s")
                    + f" (logs in {self.folder})"
                )
            time.sleep(1.0)

    # ----- stopping --------------------------------------------------------------------------
    @staticmethod
    def _stop(procs: list[subprocess.Popen], grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Stop each process with its group (a ClientApp process mid-round may outlive its SuperNode) and
        the groups of its descendants: the SuperLink starts flower-superexec in a session of its own, and
        the flwr-serverapp processes that one starts do not watch their parent. Found before signalling."""
        groups = {proc.pid for proc in procs}
        for proc in procs:
            for pid in descendants(proc.pid):
                try:
                    groups.add(os.getpgid(pid))
                except ProcessLookupError:
                    pass
        stop_process_groups(sorted(groups - {os.getpgrp()}), grace=grace, sig=sig)
        for proc in procs:
            if proc.poll() is None:
                proc.wait(5)

    def _started(self) -> list[subprocess.Popen]:
        return [p for p in [self.superlink, *self.nodes.values(), *self._extra] if p is not None]

    def _watch_descendants(self, every: float = 0.5) -> None:
        """Record what the started processes start, while they live: once a parent dies, its
        orphans are re-parented and could no longer be told from anyone else's processes."""
        while self._watching.is_set():
            self.descendants.update(_descendants({p.pid for p in self._started() if p.poll() is None}))
            time.sleep(every)

    def _stop_descendants(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, every recorded descendant still alive (same PID, same start time)."""
        alive = lambda: [pid for pid, t0 in self.descendants.items() if (_stat(pid) or (0, None))[1] == t0]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while alive() and time.monotonic() < deadline:
                time.sleep(0.2)

    def kill_node(self, partition_id: int) -> None:
        """Kill the SuperNode of a partition at once (SIGKILL), as a crash would."""
        self._stop([self.nodes[partition_id]], grace=5.0, sig=signal.SIGKILL)

    def stop(self) -> None:
        """Stop the nodes (all at once), then the SuperLink, then whatever they started that is left."""
        if self.superlink is not None:
            self.descendants.update(_descendants({p.pid for p in self._started()}))
        self._watching.clear()
        self._stop(self._extra + list(self.nodes.values()))
        if self.superlink is not None:
            self._stop([self.superlink])
        self._stop_descendants()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "Deployment":
        # SIGTERM would end this process without unwinding, leaving the (new-session) servers running.
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None

    # ----- running -----------------------------------------------------------------------------
    def run(
        self,
        config: dict[str, Any],
        out: str | Path,
        *,
        timeout: float = 1800,
        on_round: Callable[[int], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> dict[str, Any]:
        """Submit `config` as a run, follow its events until it ends, return its summary.

        `on_event(event)` is called for each of the run's events (`fedcmd.events`) and `on_round(r)`
        when round r's outputs are written, from this thread, as the run goes. A failed run raises
        DeploymentError with its error.
        """
        out = Path(out).resolve()
        if self.auth:  # each node may serve only the partition its key is bound to
            config = {**config, "partition-binding": str(self.credentials.binding)}
        app = write_app(self.folder / "app")
        run_config = write_run_config(self.folder / "run-config.toml", config, out)
        (out / EVENTS_NAME).unlink(missing_ok=True)  # so that no earlier run's end is taken for this one's
        run_id = int(self.flwr("run", str(app), CONNECTION, "--run-config", str(run_config), timeout=600)["run-id"])
        log_path = self.folder / "flwr-run.log"
        with open(log_path, "ab") as log:
            stream = subprocess.Popen(
                [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.folder,
                start_new_session=True,
            )

        def handle(event: Event) -> None:
            if on_event is not None:
                on_event(event)
            if on_round is not None and event["event"] == ROUND_FINISHED:
                on_round(event["round"])

        try:
            end = follow_events(
                EventFollower(out / EVENTS_NAME),
                timeout=timeout,
                on_event=handle,
                ended=lambda: self.run_ended(run_id, stream, log_path),
            )
            try:
                stream.wait(120)  # the stream ends once the SuperLink has closed the run: the log is whole
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._stop([stream], grace=5.0)
        self.record_run_details(run_id)
        return run_summary(end, log_path)

    def run_ended(self, run_id: int, stream: subprocess.Popen, log_path: Path) -> str | None:
        """Why run `run_id` is over without an end event, or None while it may still write one: the
        SuperLink exited, or it records the run finished (its log stream ends then)."""
        if self.superlink is not None and self.superlink.poll() is not None:
            return (
                f"the SuperLink exited with code {self.superlink.returncode} during the run; "
                f"see {self.folder / 'superlink.log'} and {log_path}"
            )
        if stream.poll() is None:
            return None
        record = run_record(run_id, env=self.env(), cwd=self.folder, connection=CONNECTION, wait=30.0)
        if not record["status"].startswith("finished"):
            return None  # the stream broke off while the run goes on: the events still tell its end
        details = f" ({record['status-details']})" if record.get("status-details") else ""
        return (
            f"run {run_id} ended {record['status']}{details} without writing its end to "
            f"{EVENTS_NAME}; see {log_path} and {self.folder / 'superlink.log'}"
        )

    def record_run_details(self, run_id: int) -> dict[str, Any] | None:
        """The SuperLink's record of the run (status, network traffic it counted, compute time), saved
        to superlink-run.json: an independent measure of the bytes the accountant counts."""
        if self.superlink is None or self.superlink.poll() is not None:
            return None
        record = run_record(run_id, env=self.env(), cwd=self.folder, connection=CONNECTION, wait=60.0)
        (self.folder / "superlink-run.json").write_text(json.dumps(record, indent=2) + "\n")
        return record


def deploy(
    config: dict[str, Any],
    out: str | Path,
    *,
    tls: bool = False,
    auth: bool = False,
    timeout: float = 1800,
    on_event: Callable[[Event], None] | None = None,
) -> dict[str, Any]:
    """Start a deployment for `config`, run it, stop everything; returns the run's summary."""
    out = Path(out)
    with Deployment(out / "deploy", config["num-clients"], tls=tls, auth=auth) as deployment:
        deployment.start()
        return deployment.run(config, out, timeout=timeout, on_event=on_event)


# ----- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedcmd.deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment on a local deployment (SuperLink + SuperNodes)")
    add_run_arguments(run)
    creds = sub.add_parser("credentials", help="make a CA, a server certificate for 127.0.0.1 and node keys")
    creds.add_argument("folder")
    creds.add_argument("--nodes", type=int, required=True, help="number of node key pairs")
    app = sub.add_parser(
        "app",
        help="write DIR/app and DIR/run-config.toml for `flwr run DIR/app <connection> "
        "--run-config DIR/run-config.toml`",
    )
    app.add_argument("folder")
    app.add_argument("config", nargs="?", help="TOML config, as for `fedcmd run`")
    app.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    app.add_argument("--out", required=True, help="where the ServerApp writes the run's outputs")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (flat kebab-case keys), as for `fedcmd run`")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--out", required=True, help="output folder: the run's outputs, and deploy/ with the logs")
    parser.add_argument("--tls", action="store_true", help="TLS between nodes, CLI and SuperLink")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the whole run may take (default 1800)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run the output folder holds (refused without this)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    from fedcmd.server import check_out_dir, make_out_dir

    config = load_config(args.config, args.set or [])
    check_out_dir(Path(args.out), resume=False, overwrite=args.overwrite)  # before any process starts
    if args.overwrite:
        make_out_dir(Path(args.out), overwrite=True)  # the ServerApp then finds no run to refuse
    deploy(config, args.out, tls=args.tls, auth=args.auth, timeout=args.timeout, on_event=print_progress)
    print(f"[fedcmd] outputs in {args.out}/, deployment logs in {args.out}/deploy/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "credentials":
            creds = make_credentials(args.folder, args.nodes)
            print(
                f"[fedcmd] CA {creds.ca_cert}, server certificate {creds.server_cert}, "
                f"node keys {creds.node_key(0)}..{args.nodes - 1} (+ .pub)"
            )
            return 0
        if args.command == "app":
            folder = Path(args.folder)
            write_app(folder / "app")
            write_run_config(folder / "run-config.toml", load_config(args.config, args.set or []), Path(args.out))
            print(f"[fedcmd] flwr run {folder / 'app'} <connection> --run-config {folder / 'run-config.toml'} --stream")
            return 0
        return run_from_args(args)
    except (ConfigError, DeploymentError) as err:
        print(f"fedcmd deploy: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
