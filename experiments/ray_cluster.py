"""A two-node Ray cluster on this machine, a fedcmd run attached to it, and the Ray node each client ran on.

    .venv/bin/python experiments/ray_cluster.py --out DIR [--port PORT] [--timeout SECONDS]

It shows, at CI size, what the README's "Past one machine: a Ray cluster" does across machines:

1. `ray start --head --port PORT --num-cpus 1 --resources '{"fedcmd-head": 1}'` and
   `ray start --address=127.0.0.1:PORT --num-cpus 1 --resources '{"fedcmd-worker": 1}'`, each with a
   temp dir of its own under /tmp/fedcmd-ray-XXXX/ and in a session of its own, then waits until
   the cluster has both nodes (Flower sizes its actor pool from the nodes present when it starts).
2. `fedcmd run DIR/config.toml --engine ray --ray-address 127.0.0.1:PORT --out DIR/run`: FedAvg, mlp,
   4 clients on generated data, 2 rounds, 1 CPU per client, so Flower makes one client actor per
   node and both nodes train clients (the run's log is DIR/run.log).
3. Asks the cluster where the run's `ClientAppActor`s lived and where each client message
   (`ClientAppActor.run`, one per query or train message) ran, while the cluster is still up.
4. Stops both nodes by process group, then looks for anything left: a process of either group, one
   whose command line names the temp dir, one whose environment holds this cluster's marker
   (FEDCMD_RAY_CLUSTER). What is found is killed and reported.

DIR/ray-cluster.json holds the report: per node its Ray node id, resources, client actors (PIDs)
and client messages run; the run's time; what was left running. The exit code is 0 only if the
run wrote its summary, both nodes ran client messages and nothing was left; the temp dir is then
removed (kept, with the nodes' Ray logs, otherwise). `tests/test_ray_cluster.py` runs this script.

Decisions:
- The nodes are started with `ray start` (no --block) in sessions of their own: each node's
  processes (gcs_server, raylet, log monitor, dashboard and runtime-env agents, workers, the
  ClientAppActors) share the process group of the `ray start` that spawned them, which is what is
  stopped, SIGTERM then SIGKILL after 10 s (`fedcmd.deploy.stop_process_groups`), the worker node
  first, as `ray stop` orders it (raylets before the GCS). The head's gcs_server and autoscaler
  monitor ignore SIGTERM (still alive 20 s after it, measured) and are killed, as `ray stop` kills
  them after its grace period. A machine-wide `ray stop` would also stop other users' Ray
  instances on this machine. The command-line and environment scans are the check, not the
  means: Ray renames its workers (`ray::ClientAppActor`), and a renamed process's environment may
  read empty. SIGTERM and Ctrl-C stop the nodes too (except in the second or two this process is
  itself a Ray driver, asking the cluster: Ray's core worker then dies at SIGTERM, unwinding nothing).
- Fixed default ports would collide with other Ray instances on the machine, so the GCS port
  (unless --port), the Ray client server and the dashboard agents get free ports, and the
  dashboard is off.
- Where actors and tasks ran is read from the GCS through `ray._private.state` (the actor table,
  the task events). `ray.util.state.list_actors` / `list_tasks` would say the same, but they go
  through the dashboard's HTTP API, which Flower's `ray` (without the `ray[default]` extras) does
  not serve.

Measured on 2 cores shared with other jobs (load 8-9): both nodes up in 55 s; the run 449 s, of
which 403 s in round 1, where the two client actors start (Python, torch and Flower imports at Ray's
worker niceness 15) and 1.4 s for round 2; stop 10 s (the head's GCS waits for its SIGKILL); 8.5
minutes in all. 12 client messages (4 discovery queries, 4 train messages per round): 8 on the head
and 4 on the worker in one run, 6 and 6 in another (Flower hands each message to an idle actor).
The run's accuracies and losses are those of the in-process run of the same config, to the bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedcmd.config import resolve, to_toml
from fedcmd.deploy import LOOPBACK, _exit_on_sigterm, flower_bin, free_port, live_group_members, stop_process_groups

PROJECT = Path(__file__).resolve().parents[1]
MARKER = "FEDCMD_RAY_CLUSTER"  # set for both `ray start`s, inherited by what they start
NODE_NAMES = ("head", "worker")
CONFIG = {
    "dataset": "synthetic",
    "synthetic-train-size": 400,
    "synthetic-test-size": 200,
    "model": "mlp",
    "num-clients": 4,
    "num-server-rounds": 2,
    "batch-size": 16,
    "local-epochs": 1,
    "lr": 0.05,
    "strategy": "fedavg",
}


@contextmanager
def ray_driver(address: str):
    """`ray`, attached to the cluster at `address` as a driver, for queries.

    ray.init replaces this process's SIGTERM handler, and from then on (even after ray.shutdown,
    measured) SIGTERM ends the process at once, without unwinding, so the nodes would be left
    running: ours is put back when the driver is shut down.
    """
    import ray

    ray.init(address=address, logging_level="error", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


class LocalRayCluster:
    """A head node and a worker node on this machine, started and stopped here, by process group."""

    def __init__(self, folder: Path, port: int, *, cpus_per_node: int = 1) -> None:
        self.folder = folder
        self.port = port
        self.cpus_per_node = cpus_per_node
        self.token = uuid.uuid4().hex[:12]
        # Short: Ray's socket paths (temp dir + session name + /sockets/plasma_store) must fit in 107 bytes.
        self.temp_root = Path(tempfile.mkdtemp(prefix="fedcmd-ray-", dir="/tmp"))
        self.groups: dict[str, int] = {}  # node name -> process group of its `ray start`

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            MARKER: self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONPATH": os.pathsep.join([str(PROJECT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }

    def _ray_start(self, name: str, args: list[str], timeout: float) -> None:
        command = [
            flower_bin("ray"),
            "start",
            *args,
            "--num-cpus",
            str(self.cpus_per_node),
            "--num-gpus",
            "0",
            "--resources",
            json.dumps({f"fedcmd-{name}": 1}),
            "--temp-dir",
            str(self.temp_root / name),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--disable-usage-stats",
        ]
        with open(self.folder / f"ray-{name}.log", "wb") as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
            self.groups[name] = proc.pid  # its children keep this group after it exits
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"`ray start` of the {name} node still running after {timeout} s; "
                    f"see {self.folder / f'ray-{name}.log'}"
                ) from None
        if code != 0:
            raise RuntimeError(
                f"`ray start` of the {name} node exited with {code}; see {self.folder / f'ray-{name}.log'}"
            )

    def start(self, timeout: float = 300) -> "LocalRayCluster":
        self._ray_start(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard",
                "false",
                "--ray-client-server-port",
                str(free_port()),
            ],
            timeout,
        )
        self._ray_start("worker", [f"--address={self.address}"], timeout)
        self.wait_for_nodes(len(NODE_NAMES), timeout)
        return self

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        with ray_driver(self.address) as ray:
            deadline = time.monotonic() + timeout
            while sum(1 for n in ray.nodes() if n["Alive"]) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fewer than {count} Ray nodes alive after {timeout} s")
                time.sleep(0.5)

    def placement(self) -> dict[str, Any]:
        """Per node: its Ray node id and CPUs, the client actors it hosted (their PIDs) and the client
        messages it ran (`ClientAppActor.run` tasks), as the GCS recorded them."""
        from ray._private import state
        from ray.core.generated import gcs_pb2

        with ray_driver(self.address) as ray:
            nodes: dict[str, dict[str, Any]] = {}

            def node(node_id: str, resources: dict[str, float] | None = None) -> dict[str, Any]:
                resources = resources or {}
                name = next((k for k in NODE_NAMES if f"fedcmd-{k}" in resources), node_id or "unknown")
                return nodes.setdefault(
                    node_id,
                    {
                        "name": name,
                        "node_id": node_id,
                        "cpus": resources.get("CPU"),
                        "actors": [],
                        "client_messages": 0,
                    },
                )

            for info in ray.nodes():
                node(info["NodeID"], info["Resources"])
            for actor in state.actors().values():
                if actor["ActorClassName"] == "ClientAppActor":
                    node(actor["Address"]["NodeID"])["actors"].append(actor["Pid"])
            ran: dict[str, str] = {}  # task id -> node id of each client message
            for raw in state.state._connect_and_get_accessor().get_task_events():
                event = gcs_pb2.TaskEvents.FromString(raw)
                if event.task_info.name == "ClientAppActor.run":
                    ran[event.task_id.hex()] = ran.get(event.task_id.hex()) or event.state_updates.node_id.hex()
            for node_id in ran.values():
                node(node_id)["client_messages"] += 1
        return {info.pop("name"): info for info in sorted(nodes.values(), key=lambda n: n["name"] != "head")}

    def processes(self) -> dict[int, str]:
        """PID -> command line of every live process of this cluster: in one of its process groups,
        naming its temp dir on the command line, or holding its marker in the environment."""
        members = {pid for pgid in self.groups.values() for pid in live_group_members(pgid)}
        temp_dir, marker = str(self.temp_root).encode(), f"{MARKER}={self.token}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                mine = temp_dir in cmdline or marker in (entry / "environ").read_bytes().split(b"\0")
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, IndexError):
                continue
            if not zombie and (mine or int(entry.name) in members):
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        return found

    def stop(self, grace: float = 10.0) -> dict[int, str]:
        """Stop the worker node's process group, then the head's (the order of `ray stop`: raylets
        before the GCS); SIGKILL and return whatever of the cluster is still alive then."""
        for name in reversed(NODE_NAMES):
            if name in self.groups:
                stop_process_groups([self.groups[name]], grace=grace)
        deadline = time.monotonic() + 5.0  # stop_process_groups sends its SIGKILL without waiting
        while any(live_group_members(g) for g in self.groups.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.processes()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def run_attached(cluster: LocalRayCluster, out: Path, timeout: float) -> tuple[dict[str, Any], float]:
    """`fedcmd run --engine ray --ray-address` on the cluster; returns the run's summary and seconds."""
    config_path = out / "config.toml"
    config_path.write_text(to_toml(resolve(CONFIG)))
    command = [
        sys.executable,
        "-m",
        "fedcmd.cli",
        "run",
        str(config_path),
        "--engine",
        "ray",
        "--ray-address",
        cluster.address,
        "--out",
        str(out / "run"),
        "--overwrite",
    ]
    env = {
        **os.environ,
        "FLWR_HOME": str(out / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONPATH": cluster.env()["PYTHONPATH"],
    }
    started = time.monotonic()
    with open(out / "run.log", "wb") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out, timeout=timeout)
    seconds = time.monotonic() - started
    summary_path = out / "run" / "summary.json"
    if done.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"the run exited with {done.returncode} without a summary; see {out / 'run.log'}")
    return json.loads(summary_path.read_text()), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the run, the logs and ray-cluster.json")
    parser.add_argument("--port", type=int, help="the head's GCS port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each of start and run (default 900)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwind, and so stop the nodes
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": CONFIG}
    started = time.monotonic()
    cluster = LocalRayCluster(out, args.port or free_port())
    report.update(address=cluster.address, temp_dir=str(cluster.temp_root), marker=f"{MARKER}={cluster.token}")
    error = None
    try:
        cluster.start(args.timeout)
        report["start_seconds"] = round(time.monotonic() - started, 1)
        summary, seconds = run_attached(cluster, out, args.timeout)
        report["run_seconds"] = round(seconds, 1)
        report["final_accuracy"] = summary["final_accuracy"]
        report["nodes"] = cluster.placement()
    except Exception as err:  # report it after the cluster is stopped
        error = f"{type(err).__name__}: {err}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        stop_started = time.monotonic()
        left = cluster.stop()
        report["stop_seconds"] = round(time.monotonic() - stop_started, 1)
    report["left_running"] = {str(pid): cmd for pid, cmd in left.items()}
    nodes = report.get("nodes", {})
    idle = [name for name in NODE_NAMES if not nodes.get(name, {}).get("client_messages")]
    if error is None and idle:
        error = f"node(s) {', '.join(idle)} ran no client message"
    if error is None and left:
        error = f"{len(left)} process(es) of the cluster were left running (killed): {sorted(left)}"
    report["error"] = error
    report["total_seconds"] = round(time.monotonic() - started, 1)
    (out / "ray-cluster.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, node in nodes.items():
        print(
            f"[ray-cluster] {name} node {node['node_id'][:12]} ({node['cpus']} CPU): {len(node['actors'])} "
            f"client actor(s) (pid {', '.join(map(str, node['actors'])) or '-'}), "
            f"{node['client_messages']} client message(s)"
        )
    if error:
        print(f"[ray-cluster] FAILED: {error}; Ray logs kept in {cluster.temp_root}", file=sys.stderr)
        return 1
    shutil.rmtree(cluster.temp_root, ignore_errors=True)
    print(
        f"[ray-cluster] run {report['run_seconds']:.0f} s, final accuracy {report['final_accuracy']:.4f}, "
        f"nothing left running; report in {out / 'ray-cluster.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
