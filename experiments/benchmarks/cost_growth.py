"""Cost growth (issue 7): time and memory of one federated CMD round's server-side work against the
number of weights N (1e5 ... 1e7) and the clients per round C (2, 5, 10, 20).

No clients, no engine, no data: a `strategies.cmd.CMD` is built directly over a weight layout of N
weights (`fedcmd.task.layouts` is monkeypatched to return it) and fed generated client replies
shaped like clients/cmd.py's (free weights, references once embedding started, metrics with
num-examples and store-version) through `configure_train` / `aggregate_train`, for cmd-warmup W
rounds: W - 1 FedAvg rounds, round W whose aggregation fits CMD (and records the schedule's
baseline), then E rounds that each embed 15% of the remaining weights. The replies follow planted
CMD dynamics (every weight an affine copy of one of 10 random-walk profiles, plus per-client
noise), so the fit, the schedule and the rebuilt weights do real work.

Per round (all server-side; generating the replies is not counted): configure_train and
aggregate_train seconds, their split into components (self time of timers wrapped around the
library's calls, as in cmd_server_overhead.py), and, in a second pass under tracemalloc (numpy
reports its buffers to it), the peak traced memory during the round above what was held at its start
(messages out, replies in, aggregation and fit temporaries) and the memory held after it (the
strategy's state: global model, OnlineCMD, schedule, event log, accountant). Timing and memory are
separate passes because tracing slows allocation-heavy code.

"One CMD round" in the table is the mean of the embedding-event rounds; the fit round is given apart.

    .venv/bin/python experiments/benchmarks/cost_growth.py [--quick] [--sizes 1e5,3e5,1e6,3e6,1e7]
        [--clients 2,5,10,20] [--warmup 3] [--events 3] [--no-memory]
        [--out experiments/benchmarks/results/cost_growth.json]   (also writes .md and .png beside it)

--quick: N in (2,000, 20,000), C in (2, 3), warmup 1, 1 event (a smoke run, seconds; written to
cost_growth_quick.*).
Results are written after every (N, C), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from pathlib import Path
from uuid import uuid4

import numpy as np
from benchtools import PhaseTimers, command_line, default_out, machine, mb, wrap_cmd_strategy, write_outputs
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedcmd.accountant
import fedcmd.task
from fedcmd.config import resolve
from fedcmd.flat import ParamLayout
from fedcmd.wire import vector_record
from strategies.cmd import CMD

N_TENSORS = 8
N_PROFILES = 10
STRATEGY_ROOTS = ("configure_train", "aggregate_train")


def fake_layouts(n_params: int) -> tuple[ParamLayout, ParamLayout]:
    """A layout of n_params weights in N_TENSORS tensors (so CMD's per-tensor sampling has work),
    and an empty buffer layout."""
    sizes = np.diff(np.linspace(0, n_params, N_TENSORS + 1).astype(np.int64))
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)])
    weights = ParamLayout(tuple(f"tensor{k}" for k in range(N_TENSORS)), tuple((int(s),) for s in sizes), offsets)
    return weights, ParamLayout((), (), np.zeros(1, dtype=np.int64), "buffers")


def cmd_config(n_clients: int, warmup: int) -> dict:
    return resolve(
        {
            "strategy": "cmd",
            "model": "mlp",
            "dataset": "synthetic",
            "num-clients": n_clients,
            "fraction-train": 1.0,
            "cmd-warmup": warmup,
            "cmd-every": 1,
            "cmd-fraction": 0.15,
            "cmd-of-remaining": True,
            "cmd-max-embedded": 0.9,
            "cmd-modes": 10,
            "cmd-samples": 1000,
            "seed": 0,
        }
    )


class PlantedTrajectory:
    """theta_i(t) = base_i + scale_i * profile_{mode_i}(t): every weight follows one of N_PROFILES
    random walks, as CMD assumes; client k adds offset_k * noise (offsets sum to 0)."""

    def __init__(self, n_params: int, n_rounds: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.base = rng.normal(0.0, 0.05, n_params).astype(np.float32)
        self.scale = rng.normal(0.0, 0.01, n_params).astype(np.float32)
        self.mode = rng.integers(0, N_PROFILES, n_params).astype(np.uint8)
        self.profile = np.cumsum(rng.normal(size=(N_PROFILES, n_rounds + 1)), axis=1).astype(np.float32)
        self.noise = rng.normal(0.0, 1e-3, n_params).astype(np.float32)

    def theta(self, t: int) -> np.ndarray:
        return self.base + self.scale * self.profile[self.mode, t]


def replies_for(strategy: CMD, messages: list[Message], theta: np.ndarray, noise: np.ndarray) -> list[Message]:
    """One reply per train message, as clients/cmd.py builds it, each with its own offset."""
    version = strategy.version
    free, refs = theta[strategy.free_index], theta[strategy.reference_index]
    noise_free, noise_refs = noise[strategy.free_index], noise[strategy.reference_index]
    replies = []
    for k, msg in enumerate(messages):
        offset = np.float32(k - (len(messages) - 1) / 2)
        content = RecordDict({"weights": vector_record(free + offset * noise_free)})
        if version:
            content["references"] = vector_record(refs + offset * noise_refs)
        examples = float(strategy.examples_of(strategy.partition_of[msg.metadata.dst_node_id]))
        content["metrics"] = MetricRecord({"num-examples": examples, "train-loss": 0.5, "store-version": version})
        msg.metadata.__dict__["_message_id"] = str(uuid4())  # as a grid would: a reply names the message it answers
        replies.append(Message(content, reply_to=msg))
    return replies


def install_timers() -> PhaseTimers:
    return wrap_cmd_strategy(PhaseTimers())


def run_rounds(n_params: int, n_clients: int, warmup: int, events: int, timers: PhaseTimers, trace: bool) -> list[dict]:
    """All rounds of one (N, C) configuration; with trace, memory figures instead of trusted times."""
    n_rounds = warmup + events
    config = cmd_config(n_clients, warmup)
    trajectory = PlantedTrajectory(n_params, n_rounds)
    layouts = fake_layouts(n_params)
    original_layouts = fedcmd.task.layouts
    fedcmd.task.layouts = lambda config: layouts  # CMD asks the task for the tensor sizes
    timers.reset()
    if trace:
        tracemalloc.start()
    try:
        strategy = CMD(trajectory.theta(0), np.zeros(0, dtype=np.float32), config)
        for pid in range(n_clients):
            strategy.register_node(10_000 + pid, pid)
        rows = []
        for rnd in range(1, n_rounds + 1):
            timers.round = rnd
            theta = trajectory.theta(rnd)
            gc.collect()
            if trace:
                tracemalloc.reset_peak()
                at_start = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            messages = list(strategy.configure_train(rnd, None, None, None))
            t1 = time.perf_counter()
            replies = replies_for(strategy, messages, theta, trajectory.noise)
            t2 = time.perf_counter()
            strategy.aggregate_train(rnd, replies)
            t3 = time.perf_counter()
            row = dict(
                round=rnd,
                configure_seconds=t1 - t0,
                aggregate_seconds=t3 - t2,
                server_seconds=(t1 - t0) + (t3 - t2),
                accepted=len(strategy.rounds[rnd].accepted),
                version=strategy.version,
                embedded_fraction=float(strategy.embedded.mean()),
                phase=(
                    "fit"
                    if timers.inclusive(rnd, "online_fit") > 0
                    else "event"
                    if rnd in strategy.event_rounds
                    else "warm-up"
                    if rnd < warmup
                    else "cmd, no event"
                ),
                components=timers.self_seconds(rnd, STRATEGY_ROOTS),
            )
            if row["accepted"] != n_clients:
                raise RuntimeError(
                    f"round {rnd}: {row['accepted']} of {n_clients} replies accepted: "
                    f"{strategy.rounds[rnd].rejected[:2]}"
                )
            if trace:
                row["peak_extra_bytes"] = tracemalloc.get_traced_memory()[1] - at_start
                del messages, replies, theta
                gc.collect()
                row["held_after_bytes"] = tracemalloc.get_traced_memory()[0]
            rows.append(row)
        return rows
    finally:
        if trace:
            tracemalloc.stop()
        fedcmd.task.layouts = original_layouts


def summarise(n_params: int, n_clients: int, timing: list[dict], memory: list[dict] | None) -> dict:
    event = [r for r in timing if r["phase"] == "event"]
    fit = next(r for r in timing if r["phase"] == "fit")
    warm = [r["server_seconds"] for r in timing if r["phase"] == "warm-up"]
    components: dict[str, float] = {}
    for r in event:
        for label, seconds in r["components"].items():
            components[label] = components.get(label, 0.0) + seconds / len(event)
    out = dict(
        n_params=n_params,
        clients=n_clients,
        event_round_seconds=float(np.mean([r["server_seconds"] for r in event])),
        event_configure_seconds=float(np.mean([r["configure_seconds"] for r in event])),
        event_aggregate_seconds=float(np.mean([r["aggregate_seconds"] for r in event])),
        fit_round_seconds=fit["server_seconds"],
        warmup_round_seconds=float(np.mean(warm)) if warm else float("nan"),
        event_components=dict(sorted(components.items(), key=lambda kv: -kv[1])),
        timing_rounds=timing,
    )
    out["ns_per_client_weight"] = 1e9 * out["event_round_seconds"] / (n_clients * n_params)
    if memory is not None:
        out.update(
            peak_extra_bytes_event=max(r["peak_extra_bytes"] for r in memory if r["phase"] == "event"),
            peak_extra_bytes_fit=next(r["peak_extra_bytes"] for r in memory if r["phase"] == "fit"),
            held_bytes_end=memory[-1]["held_after_bytes"],
            memory_rounds=memory,
        )
        out["peak_total_bytes"] = max(r["held_after_bytes"] + r["peak_extra_bytes"] for r in memory)
        out["held_bytes_per_weight"] = out["held_bytes_end"] / n_params
    return out


def markdown(result: dict) -> str:
    lines = [
        "# CMD server cost against model size N and clients per round C",
        "",
        f"Machine: {result['machine']['cpus']} cores, load average {result['machine']['load_average']} at start "
        "(shared: absolute times drift). "
        f"Command: `{result['command']}`. cmd-warmup {result['warmup']}, {result['events']} embedding events "
        "(15% of the remaining weights each), 10 modes, K = 1000 samples.",
        "",
        'Server seconds = configure_train + aggregate_train (replies generated outside). "Event round": mean '
        'over the rounds that embed; "peak extra": traced peak above what the round started with (messages, '
        'replies, temporaries); "held": traced memory after the last round (the strategy\'s state).',
        "",
        "| N | C | event round s | configure / aggregate s | ns per client-weight | fit round s | warm-up round s "
        "| peak extra, event round | peak extra, fit round | held after | held B/weight "
        "| top components (event rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["configs"]:
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(r["event_components"].items())[:3])
        memory = (
            f"{mb(r['peak_extra_bytes_event'])} | {mb(r['peak_extra_bytes_fit'])} | {mb(r['held_bytes_end'])} | "
            f"{r['held_bytes_per_weight']:.1f}"
            if "held_bytes_end" in r
            else "- | - | - | -"
        )
        lines.append(
            f"| {r['n_params']:,} | {r['clients']} | {r['event_round_seconds']:.3f} | "
            f"{r['event_configure_seconds']:.3f} / {r['event_aggregate_seconds']:.3f} | "
            f"{r['ns_per_client_weight']:.2f} | {r['fit_round_seconds']:.3f} | "
            f"{r['warmup_round_seconds']:.3f} | "
            f"{memory} | {top} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for clients in sorted({r["clients"] for r in configs}):
        rows = sorted((r for r in configs if r["clients"] == clients), key=lambda r: r["n_params"])
        n = [r["n_params"] for r in rows]
        (line,) = axes[0].plot(n, [r["event_round_seconds"] for r in rows], marker="o", label=f"C = {clients}")
        axes[0].plot(n, [r["fit_round_seconds"] for r in rows], ls="--", color=line.get_color(), alpha=0.6)
        if all("held_bytes_end" in r for r in rows):
            axes[1].plot(
                n,
                [(r["held_bytes_end"] + r["peak_extra_bytes_event"]) / 1e6 for r in rows],
                marker="o",
                color=line.get_color(),
                label=f"C = {clients}, event round",
            )
            axes[1].plot(
                n,
                [(r["held_bytes_end"] + r["peak_extra_bytes_fit"]) / 1e6 for r in rows],
                ls="--",
                color=line.get_color(),
                alpha=0.6,
            )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="weights N",
        ylabel="server seconds per round",
        title="time: event round (solid), fit round (dashed)",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="weights N",
        ylabel="MB (tracemalloc)",
        title="memory: held + round peak (dashed: fit round)",
    )
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny N, 2-3 clients, 1 event (a smoke run)")
    parser.add_argument("--sizes", help="comma-separated N (default 1e5,3e5,1e6,3e6,1e7)")
    parser.add_argument("--clients", help="comma-separated clients per round (default 2,5,10,20)")
    parser.add_argument("--warmup", type=int, help="cmd-warmup W (default 3; 1 with --quick)")
    parser.add_argument("--events", type=int, help="embedding events after the baseline (default 3; 1 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--out", type=Path, help="default results/cost_growth[_quick].json")
    args = parser.parse_args()
    args.out = args.out or default_out("cost_growth", args.quick)
    sizes = [int(float(s)) for s in (args.sizes or ("2e3,2e4" if args.quick else "1e5,3e5,1e6,3e6,1e7")).split(",")]
    clients = [int(c) for c in (args.clients or ("2,3" if args.quick else "2,5,10,20")).split(",")]
    warmup = args.warmup or (1 if args.quick else 3)
    events = args.events or (1 if args.quick else 3)
    # Messages are built outside any grid here; Flower takes their source from the task identity.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    timers = install_timers()
    result = {"command": command_line(), "machine": machine(), "warmup": warmup, "events": events, "configs": []}
    try:
        for n_params in sizes:
            for n_clients in clients:
                timing = run_rounds(n_params, n_clients, warmup, events, timers, trace=False)
                memory = None if args.no_memory else run_rounds(n_params, n_clients, warmup, events, timers, trace=True)
                row = summarise(n_params, n_clients, timing, memory)
                result["configs"].append(row)
                print(
                    f"N = {n_params:,}, C = {n_clients}: event round {row['event_round_seconds']:.3f} s "
                    f"({row['ns_per_client_weight']:.2f} ns per client-weight), "
                    f"fit round {row['fit_round_seconds']:.3f} s"
                    + (
                        f"; held {mb(row['held_bytes_end'])}, peak extra {mb(row['peak_extra_bytes_event'])} "
                        f"(fit {mb(row['peak_extra_bytes_fit'])})"
                        if memory
                        else ""
                    ),
                    flush=True,
                )
                write_outputs(args.out, result, markdown(result))
    finally:
        timers.restore()
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
