"""Engines that carry a run's messages: Flower's simulation engine (Ray), or fedcmd's in-process grid.

Both execute the same ServerApp logic (`fedcmd.server.run_experiment`) and the same ClientApp
(`fedcmd.client_app.app`). The in-process grid calls the ClientApp directly, one persistent
Context per node, with every message and reply round-tripped through Flower's protobuf
serialisation; it exists for tests and quick runs. Real runs use Ray (`run_ray`) or a deployment.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("fedcmd")

FailureRule = Callable[[int, int, str], bool]
"""(server round, partition id, message type) -> True if that client drops this message."""


def _wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


class LocalGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    `fail(round, partition, message_type)` injects failures: a failing client never replies,
    as when a node vanishes mid-round. `offline` holds partitions whose nodes are down (absent from
    `get_node_ids`), and `restart(partition)` brings one back under a new node id with an empty
    state, as a restarted SuperNode would. `public_keys` (node id -> PEM) are what `get_nodes`
    reports, as a SuperLink with node authentication does.
    """

    def __init__(self, client_app, num_nodes: int, *, fail: FailureRule | None = None, run_id: int = 1) -> None:
        self.client_app = client_app
        self.fail = fail
        self._run_id = run_id
        self.contexts: dict[int, Context] = {}
        self.offline: set[int] = set()
        self.public_keys: dict[int, bytes] = {}
        self._next_node = 1000
        for pid in range(num_nodes):
            self._add_node(pid)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0

    def _add_node(self, pid: int) -> int:
        self._next_node += 1
        self.contexts[self._next_node] = Context(
            run_id=self._run_id,
            node_id=self._next_node,
            node_config={"partition-id": pid, "num-partitions": 0},
            state=RecordDict(),
            run_config={},
        )
        return self._next_node

    def node_of(self, pid: int) -> int:
        return next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == pid)

    def restart(self, pid: int) -> int:
        del self.contexts[self.node_of(pid)]
        self.offline.discard(pid)
        return self._add_node(pid)

    # --- Grid API -------------------------------------------------------------------------------
    def set_run(self, run) -> None:
        raise NotImplementedError("LocalGrid has a fixed run")

    @property
    def run(self):
        raise NotImplementedError("LocalGrid has no Run object")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, c in self.contexts.items() if c.node_config["partition-id"] not in self.offline]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.public_keys.get(n, b"")) for n in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.replies(messages))

    def replies(self, messages: Iterable[Message]) -> Iterator[Message]:
        """The replies to `messages`, each made (the client run) when the next one is asked for:
        what a server that aggregates replies as they arrive sees, one reply at a time. Every message
        gets its id now (as when a grid pushes them all), before any client runs."""
        pending = list(messages)
        for msg in pending:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
        pending.reverse()
        return self._run_clients(pending)

    def _run_clients(self, pending: list[Message]) -> Iterator[Message]:
        while pending:
            msg = pending.pop()
            context = self.contexts.get(msg.metadata.dst_node_id)
            if context is None:
                continue
            pid = int(context.node_config["partition-id"])
            group = msg.metadata.group_id
            server_round = int(group) if group.isdigit() else 0
            if pid in self.offline or (self.fail and self.fail(server_round, pid, msg.metadata.message_type)):
                continue
            received = _wire(msg)
            try:
                reply = self.client_app(received, context)
            except Exception as err:  # Flower turns a client exception into an error reply, so do we
                log.debug("client %d raised: %s", pid, traceback.format_exc())
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=received)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            wired, reply, received, msg = _wire(reply), None, None, None
            yield wired
            wired = None  # the server has it: nothing of a reply is kept here once the next is asked for


def run_inprocess(
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    progress: bool = True,
    grid: LocalGrid | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run `config` with the in-process grid; returns the summary."""
    from fedcmd.client_app import app as client_app
    from fedcmd.server import run_experiment

    grid = grid or LocalGrid(client_app, config["num-clients"])
    return run_experiment(grid, config, out_dir, progress=progress, resume=resume, overwrite=overwrite)


class RayClusterError(RuntimeError):
    """The Ray cluster address given does not answer, or is not a Ray cluster's head."""


def check_ray_address(address: str, *, timeout: float = 5.0) -> str:
    """`address` (HOST:PORT of a Ray head's GCS) if a Ray cluster answers there; RayClusterError if not.

    `ray.init(address=...)` waits indefinitely for an address where nothing answers (still waiting
    after 5 minutes, measured), so the address is tried first: a TCP connection (refused at once,
    or no answer within `timeout` seconds), then the GCS's cluster id, as `ray health-check` asks
    it (a port that answers but is no GCS fails after about 35 s).
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise RayClusterError(
            f"--ray-address {address!r}: expected HOST:PORT of the Ray head, the "
            f"--port of its `ray start --head` (Ray's default is 6379)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise RayClusterError(
            f"no Ray cluster answers at {address} ({err}); start one with `ray start --head --port {port}` on {host}"
        ) from None
    from ray._raylet import GcsClient  # what `ray health-check` uses; Ray has no public equivalent

    try:
        GcsClient(address=address).cluster_id  # noqa: B018 (asking for it is the health check)
    except Exception as err:
        raise RayClusterError(f"{address} answers but is not the head of a Ray cluster: {err}") from None
    return address


def _ray_env() -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def run_ray(
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    progress: bool = True,
    cpus_per_client: float = 1.0,
    resume: bool = False,
    overwrite: bool = False,
    ray_address: str | None = None,
) -> dict:
    """Run `config` on Flower's simulation engine (Ray); returns the summary.

    Without `ray_address`, on a Ray instance started for the run with this machine's CPUs; with it
    (HOST:PORT of a Ray head), on that running cluster, which is left running afterwards.
    """
    import json

    from flwr.simulation import run_simulation

    from fedcmd.client_app import app as client_app
    from fedcmd.server import run_server_app

    if ray_address is not None:
        check_ray_address(ray_address)
    _ray_env()
    server_app = ServerApp()
    errors: list[BaseException] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server_app(
                grid,
                config,
                out_dir,
                progress=progress,
                resume=resume,
                overwrite=overwrite,
                flower_run_id=context.run_id,
            )
        except BaseException as err:  # keep it: run_simulation only logs the server thread's failure
            errors.append(err)
            raise

    # Flower passes init_args to ray.init as they are. Attaching, ray.init refuses num_cpus (the
    # nodes declared theirs); "local" starts a new instance even where RAY_ADDRESS names a cluster.
    where = {"address": ray_address} if ray_address else {"address": "local", "num_cpus": os.cpu_count()}
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {**where, "include_dashboard": False, "logging_level": "error", "log_to_driver": True},
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=config["num-clients"],
        backend_config=backend_config,
    )
    if errors:
        raise errors[0]
    return json.loads((Path(out_dir) / "summary.json").read_text())
