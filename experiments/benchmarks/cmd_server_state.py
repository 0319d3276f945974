"""CMD server state (issue 15): the bytes per weight the CMD strategy holds, at ResNet-18's size.

No clients, no training, no data beyond the partition sizes: `fedcmd.server.make_strategy` builds
the CMD strategy of the `resnet18` case of cmd_server_overhead.py (experiments/fmnist_lenet5_cmd.toml
with model resnet18 on generated 3x32x32 images: 11,173,962 weights, 9,620 buffer values; CMD as
configured there: M = 10, K = 1000, cmd-every 1, 15% of the remaining weights per event, cap 90%).
It is driven through `configure_train` / `aggregate_train` with generated replies shaped like
clients/cmd.py's (the free weights, the references once embedding started, the buffers, metrics
with num-examples and store-version), for cmd-warmup F rounds (the fit happens in round F's
aggregation) and then E rounds that each make an embedding event. The replies follow planted CMD
dynamics: in round t client k sends w_i(t) = w0_i + s_i r_{m_i}(t) + (k - (C - 1) / 2) e_i, where w0
is the initial model, r_1..r_10 are random walks, s_i ~ N(0, 0.01^2) and e_i ~ N(0, 0.001^2), so the
fit, the schedule and the rebuilt weights do real work.

After the fit round and after each event round, every array reachable from the strategy is listed
(`benchtools.held_arrays`: attributes, dicts, lists and tuples walked recursively, including the
online statistics, the schedule and the accountant; a view counts as the array owning its data, once)
with its dtype, shape, bytes and bytes per weight, and the total against the target of 32 bytes per
weight. Also what the strategy holds in the middle of an event round, after configure_train (the
train messages it keeps until their replies come, and what it derived for the round), and the
server-side seconds of each round, wall and CPU (configure_train + aggregate_train; generating the
replies is not counted). The 15 events reach the 90% cap; the 2 rounds after them (--after) make
none, as every later round. The script uses only what both the compact state and the state before
it have, so the same command run against an older checkout (PYTHONPATH) measures that one.

    .venv/bin/python experiments/benchmarks/cmd_server_state.py [--quick] [--events 15] [--clients 2]
        [--after 2] [--warmup 5] [--set key=value ...]
        [--out experiments/benchmarks/results/cmd_server_state.json]   (also writes the .md beside it)

--quick: LeNet-5 (61,706 weights) instead of ResNet-18, 2 events, then 2 more event rounds (below the
cap; a smoke run, seconds; written to cmd_server_state_quick.*).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from benchtools import command_line, default_out, held_arrays, machine, mb, write_outputs
from cmd_server_overhead import CASES
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcmd.config import load_config
from fedcmd.server import make_strategy
from fedcmd.wire import vector_record

TARGET = 32.0  # bytes per weight
N_PROFILES = 10


class PlantedTrajectory:
    """w_i(t) = w0_i + s_i r_{m_i}(t): every weight follows one of N_PROFILES random walks."""

    def __init__(self, initial: np.ndarray, n_rounds: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        n = initial.size
        self.initial = initial
        self.scale = rng.normal(0.0, 0.01, n).astype(np.float32)
        self.mode = rng.integers(0, N_PROFILES, n).astype(np.intp)
        self.profile = np.cumsum(rng.normal(size=(N_PROFILES, n_rounds + 1)), axis=1).astype(np.float32)
        self.noise = rng.normal(0.0, 1e-3, n).astype(np.float32)

    def theta(self, t: int) -> np.ndarray:
        return self.initial + self.scale * self.profile[self.mode, t]


def replies_for(strategy: Any, messages: list[Message], theta: np.ndarray, noise: np.ndarray) -> list[Message]:
    """One reply per train message, as clients/cmd.py builds it, each client with its own offset."""
    version, free, refs = strategy.version, strategy.free_index, strategy.reference_index
    replies = []
    for k, msg in enumerate(messages):
        offset = np.float32(k - (len(messages) - 1) / 2)
        pid = strategy.partition_of[msg.metadata.dst_node_id]
        content = RecordDict({"weights": vector_record(theta[free] + offset * noise[free])})
        if version:
            content["references"] = vector_record(theta[refs] + offset * noise[refs])
        if strategy.buffers.size:
            content["buffers"] = vector_record(strategy.buffers)
        content["metrics"] = MetricRecord(
            {"num-examples": float(strategy.examples_of(pid)), "train-loss": 0.5, "store-version": version}
        )
        msg.metadata.__dict__["_message_id"] = str(uuid4())  # as a grid would: a reply names the message it answers
        replies.append(Message(content, reply_to=msg))
    return replies


def snapshot(strategy: Any, label: str, server_round: int, seconds: float) -> dict[str, Any]:
    n = strategy.weights.size
    arrays = held_arrays(strategy)
    for row in arrays:
        row["bytes_per_weight"] = row["bytes"] / n
    total = sum(row["bytes"] for row in arrays)
    return dict(
        label=label,
        round=server_round,
        version=strategy.version,
        embedded_fraction=float(np.mean(strategy.embedded)),
        server_seconds=seconds,
        total_bytes=total,
        bytes_per_weight=total / n,
        meets_target=total / n <= TARGET,
        arrays=arrays,
    )


def run(config: dict, events: int, after: int = 0, progress: bool = True) -> dict[str, Any]:
    """Build the configured strategy and `drive` it."""
    strategy = make_strategy({**config, "num-server-rounds": config["cmd-warmup"] + events + after})
    return drive(strategy, events, after, progress)


def drive(strategy: Any, events: int, after: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run `strategy` (a CMD strategy, freshly built) with generated replies through its warm-up,
    `events` rounds that (with cmd-every 1, below the cap) each make an embedding event, and `after`
    more rounds; the state it holds after the fit, after each event and after the last round."""
    config = strategy.config
    warmup = config["cmd-warmup"]
    n_rounds = warmup + events + after
    # Messages are built outside any grid here; Flower takes their source from the task identity.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    n = strategy.weights.size
    trajectory = PlantedTrajectory(strategy.weights.copy(), n_rounds, seed=config["seed"])
    for pid in range(config["num-clients"]):
        strategy.register_node(10_000 + pid, pid)
    snapshots, rounds, mid_round = [], [], None
    for rnd in range(1, n_rounds + 1):
        theta = trajectory.theta(rnd)
        c0, t0 = time.process_time(), time.perf_counter()
        messages = list(strategy.configure_train(rnd, None, None, None))
        t1, c1 = time.perf_counter(), time.process_time()
        if mid_round is None and strategy.version:  # the first round that carries an event
            mid_round = snapshot(strategy, f"round {rnd}, after configure_train", rnd, float("nan"))
        replies = replies_for(strategy, messages, theta, trajectory.noise)
        c2, t2 = time.process_time(), time.perf_counter()
        strategy.aggregate_train(rnd, replies)
        t3, c3 = time.perf_counter(), time.process_time()
        accepted = len(strategy.rounds[rnd].accepted)
        if accepted != len(messages):
            raise RuntimeError(
                f"round {rnd}: {accepted} of {len(messages)} replies accepted: {strategy.rounds[rnd].rejected[:2]}"
            )
        del messages, replies, theta
        seconds = (t1 - t0) + (t3 - t2)
        event = bool(strategy.event_rounds) and strategy.event_rounds[-1] == rnd
        phase = "fit" if rnd == warmup else "event" if event else "warm-up" if rnd < warmup else "cmd, no event"
        rounds.append(
            dict(
                round=rnd,
                phase=phase,
                configure_seconds=t1 - t0,
                aggregate_seconds=t3 - t2,
                server_seconds=seconds,
                server_cpu_seconds=(c1 - c0) + (c3 - c2),
            )
        )
        if phase in ("fit", "event") or rnd == n_rounds:
            label = {"fit": "after the fit", "event": f"after event {strategy.version}"}.get(
                phase, "after a round without an event"
            )
            snapshots.append(snapshot(strategy, label, rnd, seconds))
            if progress:
                print(report_snapshot(snapshots[-1], n), flush=True)
        elif progress:
            print(f"round {rnd} ({phase}): {seconds:.2f} s server-side", flush=True)
    return dict(
        n_params=n,
        n_buffer_values=int(strategy.buffers.size),
        n_modes=int(strategy.reference_index.size),
        clients=config["num-clients"],
        warmup=warmup,
        events=strategy.version,
        rounds_after=after,
        config=config,
        snapshots=snapshots,
        mid_round=mid_round,
        rounds=rounds,
        max_bytes_per_weight=max(s["bytes_per_weight"] for s in snapshots),
        meets_target=all(s["meets_target"] for s in snapshots),
    )


def report_snapshot(s: dict[str, Any], n: int) -> str:
    lines = [
        f"--- {s['label']} (round {s['round']}, store version {s['version']}, "
        f"{s['embedded_fraction']:.1%} embedded, {s['server_seconds']:.2f} s server-side): "
        f"{s['bytes_per_weight']:.2f} B/weight ({mb(s['total_bytes'])}), target <= {TARGET:g}: "
        f"{'met' if s['meets_target'] else 'MISSED'}"
    ]
    for row in s["arrays"]:
        lines.append(
            f"    {row['path']:<52} {row['dtype']:<9} {str(tuple(row['shape'])):<14} {row['bytes']:>12,} B "
            f"{row['bytes_per_weight']:8.3f} B/weight"
        )
    return "\n".join(lines)


def array_table(s: dict[str, Any], limit: float = 0.001) -> list[str]:
    lines = ["| array | dtype | shape | bytes | bytes/weight |", "|---|---|---|---|---|"]
    small = [row for row in s["arrays"] if row["bytes_per_weight"] < limit]
    for row in s["arrays"]:
        if row["bytes_per_weight"] >= limit:
            shape = "x".join(str(d) for d in row["shape"]) or "scalar"
            lines.append(
                f"| `{row['path']}` | {row['dtype']} | {shape} | {row['bytes']:,} | {row['bytes_per_weight']:.3f} |"
            )
    if small:
        lines.append(
            f"| {len(small)} smaller arrays (each < {limit:g} B/weight) | | | {sum(r['bytes'] for r in small):,} | "
            f"{sum(r['bytes_per_weight'] for r in small):.3f} |"
        )
    lines.append(f"| **total** | | | {s['total_bytes']:,} | **{s['bytes_per_weight']:.2f}** |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    r = result["run"]
    lines = [
        "# CMD server state",
        "",
        f"Machine: {result['machine']['cpus']} cores, load average {result['machine']['load_average']} at start "
        f"(shared: seconds are indicative). Command: `{result['command']}`."
        + (f" Code measured: {result['code']}." if "code" in result else ""),
        "",
        f"CMD strategy over {r['n_params']:,} weights ({r['n_buffer_values']:,} buffer values), "
        f"{r['n_modes']} modes, {r['clients']} clients per round, warm-up {r['warmup']} rounds, then "
        f"{r['events']} embedding events, {r['warmup'] + r['events'] + r['rounds_after']} rounds in all, driven with generated replies (no training). Bytes per weight = "
        "every array reachable from the strategy (online statistics, schedule, accountant included; "
        f"views counted once) / N. Target: <= {TARGET:g}.",
        "",
        "| state | round | store version | embedded | bytes/weight | target | server s that round |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["snapshots"]:
        lines.append(
            f"| {s['label']} | {s['round']} | {s['version']} | {s['embedded_fraction']:.1%} | "
            f"{s['bytes_per_weight']:.2f} | {'met' if s['meets_target'] else 'missed'} | {s['server_seconds']:.2f} |"
        )
    first, last = r["snapshots"][0], r["snapshots"][-1]
    lines += ["", f"## Arrays held {first['label']} (round {first['round']})", "", *array_table(first)]
    if last is not first:
        lines += ["", f"## Arrays held {last['label']} (round {last['round']})", "", *array_table(last)]
    m = r["mid_round"]
    if m is not None:
        lines += [
            "",
            f"## Within a round: {m['label']}",
            "",
            "The train messages wait for their replies, and what the round derived is kept until its "
            "aggregation ends; neither is held between rounds.",
            "",
            *array_table(m),
        ]
    lines += [
        "",
        "## Server seconds per round",
        "",
        "Wall seconds drift with the machine's load; CPU seconds (this process) much less.",
        "",
        "| phase | rounds | mean wall s | mean CPU s |",
        "|---|---|---|---|",
    ]
    for phase in ("warm-up", "fit", "event", "cmd, no event"):
        rows = [row for row in r["rounds"] if row["phase"] == phase]
        if rows:
            lines.append(
                f"| {phase} | {len(rows)} | {np.mean([x['server_seconds'] for x in rows]):.3f} | "
                f"{np.mean([x['server_cpu_seconds'] for x in rows]):.3f} |"
            )
    lines += [
        "",
        "| round | phase | configure_train s | aggregate_train s | CPU s (both) |",
        "|---|---|---|---|---|",
    ]
    for row in r["rounds"]:
        lines.append(
            f"| {row['round']} | {row['phase']} | {row['configure_seconds']:.3f} | {row['aggregate_seconds']:.3f} | "
            f"{row['server_cpu_seconds']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LeNet-5, 2 events (a smoke run)")
    parser.add_argument("--events", type=int, help="embedding events after the fit (default 15: up to the 90%% cap)")
    parser.add_argument(
        "--after", type=int, default=2, help="rounds after the events (default 2: no event once at the cap)"
    )
    parser.add_argument("--clients", type=int, default=2, help="num-clients, all sampled (default 2)")
    parser.add_argument("--warmup", type=int, default=5, help="cmd-warmup (default 5)")
    parser.add_argument("--set", action="append", default=[], help="extra config override key=value")
    parser.add_argument("--out", type=Path, help="default results/cmd_server_state[_quick].json")
    args = parser.parse_args()
    args.out = args.out or default_out("cmd_server_state", args.quick)
    config_path, overrides = CASES["lenet5" if args.quick else "resnet18"]
    overrides = [*overrides, "dataset=synthetic"] if args.quick else overrides
    config = load_config(
        config_path,
        [*overrides, f"num-clients={args.clients}", "fraction-train=1.0", f"cmd-warmup={args.warmup}", *args.set],
    )
    events = args.events if args.events is not None else (2 if args.quick else 15)
    result = {"command": command_line(), "machine": machine(), "run": run(config, events, args.after)}
    text = markdown(result)
    write_outputs(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
