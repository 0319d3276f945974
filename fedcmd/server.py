"""The server side of a run: discovery, rounds, central evaluation and the run's outputs.

`run_experiment(grid, config, out_dir)` is what the ServerApp executes, whatever carries the
messages: Flower's simulation engine (Ray), a real SuperLink, or fedcmd's in-process grid.
It drives the strategy round by round (rather than `Strategy.start`) because evaluation is
central and a run must write its outputs as it goes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid

from fedcmd import task
from fedcmd.accountant import DIRECTIONS, VolumeAccountant, VolumeRow, fedavg_floats
from fedcmd.algorithms import algorithm
from fedcmd.binding import pem_fingerprint, read_binding
from fedcmd.checkpoint import (
    CHECKPOINT_NAME,
    LEGACY_NAME,
    Checkpoint,
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
)
from fedcmd.config import ConfigError, SetupError, keeps_local_state, to_toml
from fedcmd.data import DatasetNotFoundError, partition_report, write_partition_report
from fedcmd.events import EVENTS_NAME, ROUND_FINISHED, RUN_FAILED, RUN_FINISHED, RUN_STARTED, EventLog, print_progress
from fedcmd.report import RUN_OUTPUTS, RunTables, write_summary
from fedcmd.training import evaluate
from strategies.base import FedcmdStrategy, RoundLog

log = logging.getLogger("fedcmd")


class ReplyStream:
    """The replies to `messages` as they arrive, one at a time. The messages are pushed through the
    grid when the stream is made (so they have their ids before the strategy reads a reply), then
    replies are pulled until every message is answered or `timeout` seconds have passed. A reply is
    yielded as soon as it is pulled and is not kept here, so the strategy holds one reply at a time
    (it aggregates each and drops it). `waiting` is the time spent waiting on the grid: the
    clients' and the transport's share of a round.

    fedcmd's in-process grid computes each reply when it is asked for (`LocalGrid.replies`); any
    other grid (Flower's simulation, a SuperLink) is used through push_messages and pull_messages,
    the calls Flower's own send_and_receive makes, at the grid's pull interval (0.5 s if it has none).
    Flower's in-memory grid returns every reply that has arrived at each pull: those wait in the
    list it returns until their turn.
    """

    def __init__(self, grid: Grid, messages: list[Message], timeout: float | None) -> None:
        self.grid, self.timeout = grid, timeout
        self.waiting = 0.0
        start = time.perf_counter()
        if hasattr(grid, "replies"):  # LocalGrid: ids now, each reply made when asked for
            self._source: Iterator[Message] = iter(grid.replies(messages))
        else:
            self._source = self._pull(set(grid.push_messages(messages)) if messages else set())
        messages.clear()  # the grid holds them now
        self.waiting += time.perf_counter() - start

    def __iter__(self) -> Iterator[Message]:
        while True:
            start = time.perf_counter()
            reply = next(self._source, None)
            self.waiting += time.perf_counter() - start
            if reply is None:
                return
            yield reply
            reply = None

    def _pull(self, pending: set[str]) -> Iterator[Message]:
        end = time.time() + (self.timeout if self.timeout is not None else float("inf"))
        interval = getattr(self.grid, "pull_interval", 0.5)
        while pending and time.time() < end:
            pulled = list(self.grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            pulled.reverse()
            while pulled:
                yield pulled.pop()
            if pending:
                time.sleep(interval)


def discover_nodes(
    grid: Grid, strategy: FedcmdStrategy, server_round: int, timeout: float, binding: dict[str, int] | None = None
) -> None:
    """Ask nodes the server has not heard of which partition they hold; forget nodes that left.

    Node ids are assigned by Flower (random in simulation, new when a SuperNode reconnects), while
    cohorts are drawn over partition ids, so the server keeps the mapping current every round.

    A claim is a node's word, so it is checked (`FedcmdStrategy.claim_refusal`): an integer in
    [0, num-clients), and not a partition a live node already serves. With `binding` (key
    fingerprint -> partition, see `fedcmd.binding`) the claim must be the partition the node's
    public key is bound to. A refused node is logged, left unregistered (it gets no train
    message) and asked again next round, so a restarted node is accepted once its old id is gone;
    its exchange is not in the volume table (it belongs to no partition); the refusal is in the
    round's log (refusals.csv, `nodes_refused` in the summary). Replies are matched to
    queries by message id, in time linear in the number of nodes. Queries go out in the order
    the nodes registered (`registration_order`).
    """
    nodes = None
    if binding is None:
        present, keys = set(grid.get_node_ids()), {}
    else:
        nodes = list(grid.get_nodes())
        present, keys = {n.node_id for n in nodes}, {n.node_id: n.public_key for n in nodes}
    for node in [n for n in strategy.partition_of if n not in present]:
        strategy.forget_node(node)
    unknown = present - strategy.partition_of.keys()
    if not unknown:
        return
    queries = discovery_queries(registration_order(grid, unknown, nodes), server_round)
    first_row = len(strategy.accountant.rows)
    replies = grid.send_and_receive(queries, timeout=timeout)
    asked = {q.metadata.message_id: q for q in queries}  # ids exist once the grid has sent them
    for reply in replies:
        query = asked.pop(reply.metadata.reply_to_message_id, None)
        if query is None:
            log.warning("round %d: ignoring a discovery reply that answers no query", server_round)
            continue
        node = query.metadata.dst_node_id
        try:
            pid = partition_claim(reply)
            # The key binding first: it is the authority, and its reason does not depend on the
            # order in which a partition's rightful node and an impostor happen to answer.
            refusal = binding_refusal(binding, keys.get(node), pid) if binding is not None else None
            if refusal is None:
                refusal = strategy.claim_refusal(node, pid, present)
        except Exception as err:  # a reply that makes reading it fail is refused like any other lie
            refusal = f"unreadable discovery reply: {type(err).__name__}: {err}"
        if refusal is not None:
            log.warning("round %d: node %d refused: %s", server_round, node, refusal[:300])
            strategy.rounds.setdefault(server_round, RoundLog()).refused.append((node, refusal[:300]))
            continue
        strategy.register_node(node, pid)
        # Discovery is traffic too: the query down and the reply up, both metadata.
        strategy.accountant.record_message(server_round, pid, "down", query)
        strategy.accountant.record_message(server_round, pid, "up", reply)
    # The volume rows in partition order and refusals by node, whatever order the nodes answered in.
    rows = strategy.accountant.rows
    rows[first_row:] = sorted(rows[first_row:], key=lambda row: row.client)
    if server_round in strategy.rounds:
        strategy.rounds[server_round].refused.sort(key=lambda item: item[0])


def registration_order(grid: Grid, node_ids: set[int], nodes: list[NodeInfo] | None = None) -> list[int]:
    """`node_ids`, the earliest registered first (`NodeInfo.registered_at`; then by id, as for nodes
    whose grid reports no registration time: fedcmd's in-process grid, Flower's default
    `Grid.get_nodes`). `nodes` is the grid's `get_nodes()` when the caller has it already.

    Why: Flower 1.41's simulation engine hands messages to its nodes by sweeping them in
    registration order, every 0.1 s, and for each node scans its store of messages from the
    oldest until it finds one for that node (`vce_api.add_messages_to_queue`,
    `InMemoryLinkState.get_message_ins`). Queries pushed in any other order cost it
    (nodes x queries) scans: discovering 10,000 nodes on Ray took 355 s here, 64 s in its
    sweep order, where each node's query is near the front of the store
    (experiments/benchmarks/scale_clients.py).
    """
    if len(node_ids) < 2:
        return sorted(node_ids)
    registered = {n.node_id: n.registered_at for n in (grid.get_nodes() if nodes is None else nodes)}
    return sorted(node_ids, key=lambda n: (registered.get(n, ""), n))


def discovery_queries(nodes: Iterable[int], server_round: int) -> list[Message]:
    """The query asking each of `nodes` which partition it holds (answered by `fedcmd.client_app.query`)."""
    group = f"discover-{server_round}"
    return [Message(RecordDict(), dst_node_id=node, message_type="query", group_id=group) for node in nodes]


def last_accuracy(metrics: list[dict[str, Any]]) -> float:
    """Accuracy of the last evaluated round (rounds between `eval-every` evaluations have none)."""
    return next((m["accuracy"] for m in reversed(metrics) if not math.isnan(m["accuracy"])), float("nan"))


def partition_claim(reply: Message):
    """The partition id a discovery reply claims, as sent (checked by the strategy); ValueError if none."""
    if reply.has_error():
        raise ValueError(f"error reply: {str(reply.error.reason)[:200]}")
    info = reply.content.get("info")
    if not isinstance(info, (MetricRecord, ConfigRecord)) or "partition-id" not in info:
        raise ValueError("reply has no 'info' record with a 'partition-id'")
    return info["partition-id"]


def binding_refusal(binding: dict[str, int], public_key: bytes | None, partition_id: int) -> str | None:
    fingerprint = pem_fingerprint(public_key or b"")
    if fingerprint is None:
        return "the node has no readable public key, and partitions are bound to keys"
    bound = binding.get(fingerprint)
    if bound is None:
        return f"its public key (sha256 {fingerprint[:16]}...) is bound to no partition"
    if bound != partition_id:
        return f"it claims partition {partition_id}, but its public key is bound to partition {bound}"
    return None


def make_strategy(config: dict[str, Any], accountant: VolumeAccountant | None = None) -> FedcmdStrategy:
    """The configured strategy, holding the initial global model (initialised from `seed`)."""
    model = task.new_model(config, seed=config["seed"])
    weight_layout, buffer_layout = task.layouts(config)
    cls = algorithm(config["strategy"]).server_class()
    strategy = cls(weight_layout.flatten(model), buffer_layout.flatten(model), config, accountant)
    strategy.prepare()
    return strategy


class CentralEvaluator:
    """Test-set accuracy of a global model given as (weights, buffers)."""

    def __init__(self, config: dict[str, Any]) -> None:
        data = task.dataset(config)
        self.x, self.y = data.test_x, data.test_y
        self.model = task.new_model(config)
        self.weight_layout, self.buffer_layout = task.layouts(config)

    def __call__(self, weights: np.ndarray, buffers: np.ndarray) -> tuple[float, float]:
        self.weight_layout.load(self.model, weights)
        self.buffer_layout.load(self.model, buffers)
        return evaluate(self.model, self.x, self.y)


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, an output folder that holds another run's checkpoint or
    summary, unless the run resumes it or replaces it."""
    if resume and overwrite:
        raise SetupError("--resume continues the run in the output folder and --overwrite replaces it: pass one")
    if out.exists() and not out.is_dir():
        raise SetupError(f"output folder {out} is a file")
    if resume or overwrite:
        return
    for name, what in ((CHECKPOINT_NAME, "checkpointed"), (LEGACY_NAME, "checkpointed"), ("summary.json", "finished")):
        if (out / name).exists():
            raise SetupError(
                f"{out} holds a {what} run ({name}): pass --resume to continue it or "
                "--overwrite to replace it, or choose another output folder"
            )


def make_out_dir(out: Path, *, overwrite: bool) -> None:
    """Create the output folder; with `overwrite`, remove the outputs of the run it held."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in [*(out / name for name in RUN_OUTPUTS), *checkpoint_files(out)]:
                path.unlink(missing_ok=True)
    except OSError as err:
        raise SetupError(f"cannot write to output folder {out}: {err.strerror or err}") from err


@contextmanager
def setup_errors() -> Iterator[None]:
    """What building a run from a valid config raises (num-clients above the dataset's size, a
    partitioner giving up, classes-per-client above the classes, an image too small for the model)
    as one SetupError line; the config and checkpoint errors, which name their key, as they are."""
    try:
        yield
    except (ConfigError, CheckpointError, DatasetNotFoundError):
        raise
    except (ValueError, RuntimeError) as err:
        raise SetupError("cannot set up the run: " + " ".join(str(err).split())) from err


def run_experiment(
    grid: Grid,
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    flower_run_id: int | None = None,
) -> dict:
    """Run `config` over `grid`, write every output into `out_dir`, return the summary.

    A checkpoint is written to `out_dir` after every round; `resume=True` continues from it (see
    `fedcmd.checkpoint`) and ends with the outputs an uninterrupted run would have written. A folder
    holding another run is refused unless `resume` or `overwrite` (which replaces that run).
    metrics.csv, volume.csv and rejections.csv are appended round by round (`fedcmd.report.RunTables`),
    and so is events.jsonl (`fedcmd.events`), from which `progress` prints the progress lines.
    `flower_run_id` (the Flower run executing the ServerApp, if any) goes into the run_started event.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out, resume=resume, overwrite=overwrite)
    # Everything is checked before anything is written: a refused run leaves the folder as it was.
    with setup_errors():
        binding = read_binding(config["partition-binding"]) if config["partition-binding"] else None
        data = task.dataset(config)
        parts = task.partitions(config)
        if resume:
            evaluator = CentralEvaluator(config)
            checkpoint = load_checkpoint(out, config)  # restores the RNG states: after anything that draws
            strategy, metrics, spent = checkpoint.strategy, checkpoint.metrics, checkpoint.wall_seconds
            first_round = checkpoint.server_round + 1
        else:
            strategy = make_strategy(config)
            evaluator = CentralEvaluator(config)
            loss, acc = evaluator(strategy.weights, strategy.buffers)  # also checks the model fits the images
            metrics = [
                dict(
                    round=0,
                    accuracy=acc,
                    loss=loss,
                    train_loss=float("nan"),
                    sampled=0,
                    accepted=0,
                    rejected=0,
                    mb_cumulative=0.0,
                    round_seconds=0.0,
                    strategy_seconds=0.0,
                )
            ]
            spent, first_round = 0.0, 1
    make_out_dir(out, overwrite=overwrite)
    events = EventLog(out / EVENTS_NAME, append=resume, listeners=[print_progress] if progress else [])
    done = first_round - 1  # the last round whose outputs are written
    try:
        config_text = to_toml(config)
        (out / "config.toml").write_text(config_text)
        write_partition_report(partition_report(data.train_y.numpy(), parts, data.num_classes), out / "partitions.csv")
        client_state = out / "client-state"
        if not resume:
            shutil.rmtree(client_state, ignore_errors=True)  # a new run: no client state of an earlier one
            if keeps_local_state(config):
                strategy.run_info["run-token"] = uuid.uuid4().hex
        if strategy.run_info.get("run-token"):
            strategy.run_info["client-state-dir"] = str(client_state.resolve())
        tables = RunTables(out)
        tables.start(metrics, strategy)
        timeout, last = config["round-timeout"], config["num-server-rounds"]
        events.emit(
            RUN_STARTED,
            strategy=config["strategy"],
            dataset=str(data),
            parameters=int(strategy.weights.size),
            rounds=last,
            first_round=first_round,
            resumed=resume,
            accuracy=last_accuracy(metrics),
            config_digest=hashlib.sha256(config_text.encode()).hexdigest(),
            flower_run_id=flower_run_id,
        )
        rows_seen = len(strategy.accountant.rows)
        mb = sum(r.wire_bytes for r in strategy.accountant.rows) / 1e6
        for rnd in range(first_round, last + 1):
            t0 = time.perf_counter()
            discover_nodes(grid, strategy, rnd, timeout, binding)
            t1 = time.perf_counter()
            messages = list(strategy.configure_train(rnd, None, None, grid))
            t2 = time.perf_counter()
            replies = ReplyStream(grid, messages, timeout)
            strategy.aggregate_train(rnd, replies)  # aggregates each reply as it arrives
            t4 = time.perf_counter()
            t3 = t2 + replies.waiting  # the strategy's time is what is not spent waiting for replies
            evaluated = rnd % config["eval-every"] == 0 or rnd == last
            loss, acc = evaluator(strategy.weights, strategy.buffers) if evaluated else (float("nan"), float("nan"))
            t5 = time.perf_counter()
            round_log = strategy.rounds[rnd]
            new_rows = strategy.accountant.rows[rows_seen:]
            rows_seen += len(new_rows)
            mb += sum(r.wire_bytes for r in new_rows) / 1e6
            metrics.append(
                dict(
                    round=rnd,
                    accuracy=acc,
                    loss=loss,
                    train_loss=round_log.train_loss,
                    sampled=len(round_log.sampled),
                    accepted=len(round_log.accepted),
                    rejected=len(round_log.rejected),
                    mb_cumulative=mb,
                    round_seconds=time.perf_counter() - t0,
                    strategy_seconds=(t2 - t1) + (t4 - t3),
                    clients_seconds=t3 - t2,
                    client_train_seconds=round_log.train_seconds,
                    eval_seconds=t5 - t4,
                    **strategy.round_metrics(rnd),
                )
            )
            t6 = time.perf_counter()
            save_checkpoint(out, Checkpoint(config, rnd, strategy, metrics, spent + time.perf_counter() - started))
            # the checkpoint is part of the round's cost (it is saved after the row it holds was made)
            metrics[-1]["checkpoint_seconds"] = time.perf_counter() - t6
            metrics[-1]["round_seconds"] += metrics[-1]["checkpoint_seconds"]
            tables.append_round(rnd, metrics, strategy)  # after the checkpoint: the tables never run ahead of it
            done = rnd
            events.emit(
                ROUND_FINISHED,
                round=rnd,
                rounds=last,
                evaluated=evaluated,
                accuracy=acc,
                loss=loss,
                train_loss=round_log.train_loss,
                sampled=len(round_log.sampled),
                replies=len(round_log.accepted),
                rejected=len(round_log.rejected),
                refused=len(round_log.refused),
                **round_volume(new_rows),
                mb_cumulative=mb,
                round_seconds=metrics[-1]["round_seconds"],
                metrics=metrics[-1],
            )

        cohorts = [len(strategy.rounds[r].sampled) for r in range(1, config["num-server-rounds"] + 1)]
        reference = fedavg_floats(strategy.weights.size + strategy.buffers.size, cohorts)
        summary = write_summary(out, config, strategy, metrics, reference, spent + time.perf_counter() - started)
    except BaseException as err:  # Ctrl-C too: a follower must learn that the run stopped, and why
        events.emit(RUN_FAILED, error=f"{type(err).__name__}: {err}", round=done)
        raise
    events.emit(RUN_FINISHED, summary_path=str((out / "summary.json").resolve()), summary=summary)
    return summary


def round_volume(rows: list[VolumeRow]) -> dict[str, float]:
    """bytes_up, bytes_down (serialised), floats_up, floats_down of a round's volume rows."""
    volume = {f"{kind}_{d}": 0 for kind in ("bytes", "floats") for d in DIRECTIONS}
    for row in rows:
        volume[f"bytes_{row.direction}"] += row.wire_bytes
        volume[f"floats_{row.direction}"] += row.floats
    return volume


def run_server_app(grid: Grid, config: dict[str, Any], out_dir: str | Path, **options: Any) -> dict:
    """Entry used by ServerApps: the server thread gets its own, bounded, share of the cores;
    `options` are `run_experiment`'s."""
    torch.set_num_threads(1)
    if not logging.getLogger().handlers:  # a deployed ServerApp process has none: keep rejections visible
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_experiment(grid, config, out_dir, **options)
