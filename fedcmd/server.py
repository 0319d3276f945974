"""The server side of a run: discovery, rounds, central evaluation and the run's outputs.

`run_experiment(grid, config, out_dir)` is what the ServerApp executes, whatever carries the
messages: Flower's simulation engine (Ray), a real SuperLink, or fedcmd's in-process grid.
It drives the strategy round by round (rather than `Strategy.start`) because evaluation is
central and a run must write its outputs as it goes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedcmd import task
from fedcmd.accountant import VolumeAccountant, fedavg_floats
from fedcmd.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcmd.config import keeps_local_state, to_toml
from fedcmd.data import partition_report, write_partition_report
from fedcmd.registry import strategy_class
from fedcmd.report import write_run_outputs
from fedcmd.training import evaluate
from strategies.base import FedcmdStrategy

log = logging.getLogger("fedcmd")


def discover_nodes(grid: Grid, strategy: FedcmdStrategy, server_round: int, timeout: float) -> None:
    """Ask nodes the server has not heard of which partition they hold; forget nodes that left.

    Node ids are assigned by Flower (random in simulation, new when a SuperNode reconnects), while
    cohorts are drawn over partition ids, so the server keeps the mapping current every round.
    """
    present = set(grid.get_node_ids())
    for node in list(strategy.partition_of):
        if node not in present:
            strategy.forget_node(node)
    unknown = sorted(present - set(strategy.partition_of))
    if not unknown:
        return
    queries = [Message(RecordDict(), dst_node_id=node, message_type="query", group_id=f"discover-{server_round}")
               for node in unknown]
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error() or "info" not in reply.content:
            continue
        pid = int(reply.content["info"]["partition-id"])
        strategy.register_node(reply.metadata.src_node_id, pid)
        # Discovery is traffic too: the query down and the reply up, both metadata.
        query = next(q for q in queries if q.metadata.dst_node_id == reply.metadata.src_node_id)
        strategy.accountant.record_message(server_round, pid, "down", query)
        strategy.accountant.record_message(server_round, pid, "up", reply)


def last_accuracy(metrics: list[dict[str, Any]]) -> float:
    """Accuracy of the last evaluated round (rounds between `eval-every` evaluations have none)."""
    return next((m["accuracy"] for m in reversed(metrics) if not math.isnan(m["accuracy"])), float("nan"))


def make_strategy(config: dict[str, Any], accountant: VolumeAccountant | None = None) -> FedcmdStrategy:
    """The configured strategy, holding the initial global model (initialised from `seed`)."""
    model = task.new_model(config, seed=config["seed"])
    weight_layout, buffer_layout = task.layouts(config)
    cls = strategy_class(config["strategy"])
    return cls(weight_layout.flatten(model), buffer_layout.flatten(model), config, accountant)


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


def run_experiment(grid: Grid, config: dict[str, Any], out_dir: str | Path, *, progress: bool = True,
                   resume: bool = False) -> dict:
    """Run `config` over `grid`, write every output into `out_dir`, return the summary.

    A checkpoint is written to `out_dir` after every round; `resume=True` continues from it (see
    `fedcmd.checkpoint`) and ends with the outputs an uninterrupted run would have written.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(config))
    data = task.dataset(config)
    parts = task.partitions(config)
    write_partition_report(partition_report(data.train_y.numpy(), parts, data.num_classes), out / "partitions.csv")

    client_state = out / "client-state"
    if resume:
        evaluator = CentralEvaluator(config)
        checkpoint = load_checkpoint(out, config)  # restores the RNG states: after anything that draws
        strategy, metrics, spent = checkpoint.strategy, checkpoint.metrics, checkpoint.wall_seconds
        first_round = checkpoint.server_round + 1
        if progress:
            print(f"[fedcmd] {config['strategy']} on {data}: resuming after round {checkpoint.server_round} "
                  f"(last accuracy {last_accuracy(metrics):.4f})", flush=True)
    else:
        strategy = make_strategy(config)
        shutil.rmtree(client_state, ignore_errors=True)  # a new run: no client state of an earlier one
        if keeps_local_state(config):
            strategy.run_info["run-token"] = uuid.uuid4().hex
        evaluator = CentralEvaluator(config)
        loss, acc = evaluator(strategy.weights, strategy.buffers)
        metrics = [dict(round=0, accuracy=acc, loss=loss, train_loss=float("nan"), sampled=0, accepted=0,
                        rejected=0, mb_cumulative=0.0, round_seconds=0.0, strategy_seconds=0.0)]
        spent, first_round = 0.0, 1
        if progress:
            print(f"[fedcmd] {config['strategy']} on {data}, {strategy.weights.size} parameters; "
                  f"round 0: accuracy {acc:.4f}", flush=True)
    if strategy.run_info.get("run-token"):
        strategy.run_info["client-state-dir"] = str(client_state.resolve())
    timeout, last = config["round-timeout"], config["num-server-rounds"]
    rows_seen = len(strategy.accountant.rows)
    mb = sum(r.wire_bytes for r in strategy.accountant.rows) / 1e6
    for rnd in range(first_round, last + 1):
        t0 = time.perf_counter()
        discover_nodes(grid, strategy, rnd, timeout)
        t1 = time.perf_counter()
        messages = list(strategy.configure_train(rnd, None, None, grid))
        t2 = time.perf_counter()
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        t3 = time.perf_counter()
        strategy.aggregate_train(rnd, replies)
        t4 = time.perf_counter()
        evaluated = rnd % config["eval-every"] == 0 or rnd == last
        loss, acc = evaluator(strategy.weights, strategy.buffers) if evaluated else (float("nan"), float("nan"))
        t5 = time.perf_counter()
        round_log = strategy.rounds[rnd]
        rows = strategy.accountant.rows
        mb += sum(r.wire_bytes for r in rows[rows_seen:]) / 1e6
        rows_seen = len(rows)
        metrics.append(dict(round=rnd, accuracy=acc, loss=loss, train_loss=round_log.train_loss,
                            sampled=len(round_log.sampled), accepted=len(round_log.accepted),
                            rejected=len(round_log.rejected), mb_cumulative=mb,
                            round_seconds=time.perf_counter() - t0, strategy_seconds=(t2 - t1) + (t4 - t3),
                            clients_seconds=t3 - t2, client_train_seconds=round_log.train_seconds,
                            eval_seconds=t5 - t4, **strategy.round_metrics(rnd)))
        if progress and evaluated:
            print(f"[fedcmd] round {rnd}/{last}: accuracy {acc:.4f}, "
                  f"{len(round_log.accepted)}/{len(round_log.sampled)} replies, {mb:.2f} MB so far, "
                  f"{metrics[-1]['round_seconds']:.1f} s", flush=True)
        t6 = time.perf_counter()
        save_checkpoint(out, Checkpoint(config, rnd, strategy, metrics, spent + time.perf_counter() - started))
        # the checkpoint is part of the round's cost (it is saved after the row it holds was made)
        metrics[-1]["checkpoint_seconds"] = time.perf_counter() - t6
        metrics[-1]["round_seconds"] += metrics[-1]["checkpoint_seconds"]

    cohorts = [len(strategy.rounds[r].sampled) for r in range(1, config["num-server-rounds"] + 1)]
    reference = fedavg_floats(strategy.weights.size + strategy.buffers.size, cohorts)
    summary = write_run_outputs(out, config, strategy, metrics, reference, spent + time.perf_counter() - started)
    if progress:
        print(json.dumps(summary, indent=2), flush=True)
    return summary


def run_server_app(grid: Grid, config: dict[str, Any], out_dir: str | Path, progress: bool = True,
                   resume: bool = False) -> dict:
    """Entry used by ServerApps: the server thread gets its own, bounded, share of the cores."""
    torch.set_num_threads(1)
    if not logging.getLogger().handlers:  # a deployed ServerApp process has none: keep rejections visible
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_experiment(grid, config, out_dir, progress=progress, resume=resume)
