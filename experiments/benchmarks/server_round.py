"""The server's cost per round at ResNet-18 scale (issue 15): the strategy's time against a floor,
and its peak memory, with replies aggregated as they arrive.

    .venv/bin/python experiments/benchmarks/server_round.py [--quick] [--part time] [--part memory]
        [--out experiments/benchmarks/results/server_round.json]   (also writes the .md beside it)

The strategies are the real ones (FedAvg, CMD), driven round by round as `fedcmd.server` drives them:
`configure_train`, a `ReplyStream` over a stand-in grid, `aggregate_train`. The stand-in grid
(`BenchGrid`) is a SuperLink elsewhere: pushing records each message's id and drops the message;
each pull returns one reply, made then: the values the client was sent (read from the strategy,
which does not change its model before the round's last reply) plus noise, as the float32 .npy
Array a client's reply carries, with the metrics the strategy checks. Time spent making replies is
the grid's (`ReplyStream.waiting`), not the strategy's.

Time (ResNet-18's layout, N = 11,173,962 weights and 9,600 float buffer values; 10 clients, all
sampled): per round, the strategy's seconds (configure_train + aggregate_train, less the time the
grid spent making replies) and the floor, timed in the same round on the same reply values: one
pass that adds every reply's float32 values into one float64 accumulator (allocated for the round,
as the strategy's is). CMD runs cmd-warmup 3 and cmd-every 2, so its rounds are warm-up (FedAvg),
the fit, rounds with an embedding event and rounds without. Targets: at most 3x the floor on
rounds without an event, 6x on rounds with one.

Memory (N = 10,000,010: the MLP on 1x1x156,239 inputs; 2 and 20 clients): tracemalloc's peak during
a round (from configure_train to the new model) less what was allocated before it (the model and
the strategy's state), against 3 x N x 4 bytes (an accumulator and one reply); FedAvg and CMD, every
round (warm-up, the fit, rounds with and without an embedding event). What the stand-in client
allocates while making a reply is left out (the peak is reset once the reply is made); the reply
it returns counts from then on. Also the strategy's state (every array it holds) in bytes per weight.

--quick: LeNet-5's layout (61,706 weights), 3 rounds each: a smoke run of the script, seconds.
"""

from __future__ import annotations

import argparse
import gc
import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
from benchtools import command_line, default_out, held_arrays, machine, mb, write_outputs
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcmd.config import resolve
from fedcmd.server import ReplyStream, make_strategy
from strategies.cmd import CMD

CHUNK = 1 << 16


def reply_record(n: int, fill) -> ArrayRecord:
    """A record of one float32 .npy Array of `n` values written in chunks by `fill(lo, hi, out)`: no full-size
    temporary (a client's own arrays are not the server's memory)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n,)}
    )
    head = header.getvalue()
    buffer = bytearray(len(head) + 4 * n)
    buffer[: len(head)] = head
    values = np.frombuffer(buffer, dtype=np.float32, offset=len(head))
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        fill(lo, hi, values[lo:hi])
    array = Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=b"")
    array.data = buffer  # the bytes as they would come off the wire (Flower's Array keeps them as given)
    record = ArrayRecord()
    record["values"] = array
    return record


class BenchGrid:
    """A grid whose clients answer from the strategy's own model (see the module docstring)."""

    pull_interval = 0.0

    def __init__(self, strategy, server_round: int, drift: float, noise: float) -> None:
        self.strategy, self.round, self.drift, self.noise = strategy, server_round, drift, noise
        self.pending: list[tuple[str, Message, int]] = []
        self.peak = 0  # under tracemalloc: the highest traced memory outside making replies
        self.values_seen: list[np.ndarray] | None = None  # set to collect reply values for the floor
        self.cpu = 0.0  # this process's CPU seconds spent making replies

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"{self.round}-{i}"
            stub = Message(RecordDict(), dst_node_id=msg.metadata.dst_node_id, message_type="train", group_id="")
            stub.metadata.__dict__["_message_id"] = msg.metadata.message_id
            pid = self.strategy.partition_of[msg.metadata.dst_node_id]
            self.pending.append((msg.metadata.message_id, stub, pid))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        if not self.pending:
            return []
        _, stub, pid = self.pending.pop(0)
        if not tracemalloc.is_tracing():
            start = time.process_time()
            reply = self.make_reply(stub, pid)
            self.cpu += time.process_time() - start
            return [reply]
        # The server's peak so far, then the reply made with the peak reset after it: what the
        # client and the transport allocate to make a reply is not the server's (the reply itself,
        # once made, is: it stays in the current memory the next peak starts from).
        self.peak = max(self.peak, tracemalloc.get_traced_memory()[1])
        reply = self.make_reply(stub, pid)
        tracemalloc.reset_peak()
        return [reply]

    def make_reply(self, stub: Message, pid: int) -> Message:
        s = self.strategy
        rng = np.random.default_rng([self.round, pid])
        step = np.float32(self.drift)

        def around(source, positions):
            def fill(lo, hi, out):
                part = source[lo:hi] if positions is None else source[positions[lo:hi]]
                np.add(part, step + rng.standard_normal(hi - lo, dtype=np.float32) * self.noise, out=out)

            return fill

        is_cmd = isinstance(s, CMD)
        sent = s.free_values(s.weights) if is_cmd else s.weights  # the client's copy, made here
        records = {"weights": reply_record(sent.size, around(sent, None))}
        metrics = {"num-examples": s.examples_of(pid), "train-loss": 0.5}
        if is_cmd:
            metrics["store-version"] = s.sent[(self.round, pid)]
            if s.version:
                refs = s.reference_index
                records["references"] = reply_record(refs.size, around(s.weights, refs))
        if s.buffers.size:
            records["buffers"] = reply_record(s.buffers.size, around(s.buffers, None))
        records["metrics"] = MetricRecord(metrics)
        if self.values_seen is not None:
            from fedcmd.wire import array_view

            self.values_seen.append(array_view(records["weights"]["values"]))
        return Message(RecordDict(records), reply_to=stub)


def build(config: dict):
    strategy = make_strategy(config)
    for pid in range(config["num-clients"]):
        strategy.register_node(10_000 + pid, pid)
    return strategy


def run_round(strategy, rnd: int, *, drift: float, noise: float, floor: bool) -> dict:
    grid = BenchGrid(strategy, rnd, drift, noise)
    events_before = getattr(strategy, "version", 0)
    fit_before = getattr(getattr(strategy, "online", None), "ready", None)
    start, cpu_start = time.perf_counter(), time.process_time()
    messages = list(strategy.configure_train(rnd, None, None, grid))
    configured = time.perf_counter()
    stream = ReplyStream(grid, messages, 600.0)
    if floor:
        grid.values_seen = []
    strategy.aggregate_train(rnd, stream)
    end, cpu_end = time.perf_counter(), time.process_time()
    row = {
        "round": rnd,
        "strategy_seconds": (end - start) - stream.waiting,
        "strategy_cpu_seconds": (cpu_end - cpu_start) - grid.cpu,
        "configure_seconds": configured - start,
        "grid_seconds": stream.waiting,
        "accepted": len(strategy.rounds[rnd].accepted),
    }
    if fit_before is not None:
        row["phase"] = (
            "event"
            if strategy.version > events_before
            else "fit"
            if strategy.online.ready and not fit_before
            else "warm-up"
            if not strategy.online.ready
            else "no event"
        )
    else:
        row["phase"] = "fedavg"
    if floor:
        values, grid.values_seen = grid.values_seen, None
        t0, c0 = time.perf_counter(), time.process_time()
        total = np.zeros(values[0].size, dtype=np.float64)
        for v in values:
            total += v
        row["floor_seconds"] = time.perf_counter() - t0
        row["floor_cpu_seconds"] = time.process_time() - c0
        row["ratio"] = row["strategy_seconds"] / row["floor_seconds"]
        row["cpu_ratio"] = row["strategy_cpu_seconds"] / row["floor_cpu_seconds"]
        del values, total
    assert row["accepted"] == strategy.config["num-clients"], strategy.rounds[rnd].rejected
    if tracemalloc.is_tracing():
        row["traced_peak"] = max(grid.peak, tracemalloc.get_traced_memory()[1])
    return row


def strategy_arrays(strategy) -> dict[str, int]:
    """Bytes of every array the strategy holds, by path (`benchtools.held_arrays`)."""
    return {row["path"]: row["bytes"] for row in held_arrays(strategy)}


def warm_kernels(layout: dict) -> float:
    """Run both strategies for a few rounds on LeNet-5's layout first: numba compiles the server's
    loops (`fedcmd.kernels`) on their first call in a process, or loads them from its disk cache,
    which a long-running server pays once. Returns the seconds that took."""
    start = time.perf_counter()
    time_part(layout, {"fedavg": 2, "cmd": 7}, quiet=True)
    return time.perf_counter() - start


def first_touch(n: int) -> dict:
    """The seconds this process takes to add one reply into an accumulator of n float64 values in
    memory it has never used, then in memory it used before (the first touch costs the page faults
    of fresh memory, ~0.3 s for 90 MB here: a server pays it in its first round only). Timing
    starts once it has been paid, so that round 1 is like the others."""
    values = np.ones(n, dtype=np.float32)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        total = np.zeros(n)
        total += values
        seconds.append(time.perf_counter() - start)
        del total
    return {"fresh_memory_seconds": seconds[0], "reused_memory_seconds": seconds[1]}


def time_part(layout: dict, rounds: dict[str, int], quiet: bool = False, repeats: int = 1) -> list[dict]:
    """Each case's rounds, run `repeats` times from a fresh strategy (the same rounds each time: the
    sequence is deterministic); per round, the median over the runs of each figure (this machine is
    shared: one run's round can be slowed by a neighbour's burst, on either side of the ratio)."""
    cases = []
    for name, extra in (("fedavg", {"strategy": "fedavg"}), ("cmd", {"strategy": "cmd"})):
        config = resolve({**layout, **extra})
        runs = []
        for run in range(repeats):
            strategy = build(config)
            rows = []
            for rnd in range(1, rounds[name] + 1):
                rows.append(run_round(strategy, rnd, drift=1e-3, noise=1e-3, floor=True))
                r = rows[-1]
                if not quiet:
                    print(
                        f"[time] {name} run {run + 1}/{repeats} round {rnd} ({r['phase']}): strategy "
                        f"{r['strategy_seconds']:.3f} s, floor {r['floor_seconds']:.3f} s, ratio {r['ratio']:.2f}",
                        flush=True,
                    )
                gc.collect()
            runs.append(rows)
            n = int(strategy.weights.size)
            del strategy
            gc.collect()
        merged = []
        for rows in zip(*runs):
            assert len({r["phase"] for r in rows}) == 1, rows
            row = {"round": rows[0]["round"], "phase": rows[0]["phase"], "accepted": rows[0]["accepted"]}
            for key in (
                "strategy_seconds",
                "configure_seconds",
                "grid_seconds",
                "floor_seconds",
                "ratio",
                "strategy_cpu_seconds",
                "floor_cpu_seconds",
                "cpu_ratio",
            ):
                row[key] = float(np.median([r[key] for r in rows]))
                row[key + "_runs"] = [r[key] for r in rows]
            merged.append(row)
        cases.append({"case": name, "num_parameters": n, "repeats": repeats, "rounds": merged})
    return cases


def memory_part(layout: dict, clients: list[int], cmd_rounds: int) -> list[dict]:
    """Every round traced: its peak above what was allocated when it started (gc'd first)."""
    cases = []
    for strategy_name in ("fedavg", "cmd"):
        for k in clients:
            config = resolve({**layout, "strategy": strategy_name, "num-clients": k, "synthetic-train-size": 2 * k})
            tracemalloc.start()  # before the strategy exists: what it frees later was traced when allocated
            strategy = build(config)
            for rnd in range(1, (cmd_rounds if strategy_name == "cmd" else 3) + 1):
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                row = run_round(strategy, rnd, drift=1e-3, noise=1e-3, floor=False)
                peak = row["traced_peak"] - before
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
                n = int(strategy.weights.size)
                state = strategy_arrays(strategy)
                cases.append(
                    {
                        "case": strategy_name,
                        "clients": k,
                        "num_parameters": n,
                        "round": rnd,
                        "phase": row["phase"],
                        "peak_above_before_bytes": peak,
                        "limit_bytes": 3 * n * 4,
                        "peak_over_n4": peak / (4 * n),
                        "excess_over_limit_bytes": peak - 3 * n * 4,
                        # above what is held before or after the round, whichever is more (the fit
                        # round turns the warm-up snapshots into the state: it grows by 10 B/weight)
                        "peak_above_held_bytes": row["traced_peak"] - max(before, after),
                        "state_bytes": sum(state.values()),
                        "state_bytes_per_weight": sum(state.values()) / n,
                        "state_arrays": state,
                    }
                )
                print(
                    f"[memory] {strategy_name}, {k} clients, round {rnd} ({row['phase']}): peak above the round's "
                    f"start {mb(peak)} = {peak / (4 * n):.2f} x N x 4 (limit 3); state "
                    f"{sum(state.values()) / n:.1f} B/weight",
                    flush=True,
                )
            tracemalloc.stop()
            del strategy
            gc.collect()
    return cases


def markdown(result: dict) -> str:
    lines = [
        "# Server cost per round (issue 15)",
        "",
        f"Machine: {result['machine']['cpus']} cores, load average {result['machine']['load_average']} at start "
        "(shared: absolute seconds drift; the ratios are measured side by side in each round). "
        f"Command: `{result['command']}`.",
        "",
    ]
    if result.get("time"):
        lines += [
            "## Strategy time against the floor",
            "",
            "Floor: one pass adding the round's replies' float32 values into one float64 accumulator, timed in the same "
            "round on the same values. Strategy: configure_train + aggregate_train, less the stand-in grid's time. "
            f"Each case's rounds were run {result['time'][0].get('repeats', 1)} times from a fresh strategy; a round's "
            "figures are the medians over those runs (its ratio in each run is in the per-round table). "
            f"Before timing: numba's loops loaded ({result.get('kernel_warmup_seconds', float('nan')):.1f} s, "
            "LeNet-5 rounds) and this process's first touch of fresh memory paid "
            f"({result.get('first_touch', {}).get('fresh_memory_seconds', float('nan')):.2f} s for one accumulator's "
            f"worth, against {result.get('first_touch', {}).get('reused_memory_seconds', float('nan')):.2f} s in "
            "reused memory: a server pays this once, in its first round).",
            "",
            "Wall time counts whatever else the machine runs meanwhile; CPU time (this process's, "
            "`time.process_time`, all its threads, the grid's share taken out likewise) counts only its own work. "
            "The floor runs on one thread; two of the strategy's loops run on numba's threads (as many as cores: "
            f"{result['machine']['cpus']} here), so the strategy's CPU time can exceed its wall time.",
            "",
            "| case | parameters | phase | rounds | strategy s (mean) | floor s (mean) | ratio, wall (mean / max) "
            "| ratio, CPU (mean / max) | target |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result["time"]:
            phases = sorted(
                {r["phase"] for r in c["rounds"]}, key=lambda p: min(r["round"] for r in c["rounds"] if r["phase"] == p)
            )
            for phase in phases:
                rows = [r for r in c["rounds"] if r["phase"] == phase]
                target = 6 if phase == "event" else None if phase == "fit" else 3
                ratios, cpu = [r["ratio"] for r in rows], [r["cpu_ratio"] for r in rows]
                verdict = (
                    "-"
                    if target is None
                    else f"<= {target}: wall {'met' if max(ratios) <= target else 'missed'}, "
                    f"CPU {'met' if max(cpu) <= target else 'missed'}"
                )
                lines.append(
                    f"| {c['case']} | {c['num_parameters']:,} | {phase} | {', '.join(str(r['round']) for r in rows)} | "
                    f"{np.mean([r['strategy_seconds'] for r in rows]):.3f} | "
                    f"{np.mean([r['floor_seconds'] for r in rows]):.3f} | {np.mean(ratios):.2f} / {max(ratios):.2f} | "
                    f"{np.mean(cpu):.2f} / {max(cpu):.2f} | {verdict} |"
                )
        lines += [
            "",
            "Per round (medians over the runs; then each run's wall and CPU ratios):",
            "",
            "| case | round | phase | strategy s | of which configure s | floor s | ratio, wall | ratio, CPU "
            "| wall ratio in each run | CPU ratio in each run |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result["time"]:
            for r in c["rounds"]:
                lines.append(
                    f"| {c['case']} | {r['round']} | {r['phase']} | {r['strategy_seconds']:.3f} | "
                    f"{r['configure_seconds']:.3f} | {r['floor_seconds']:.3f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | "
                    + ", ".join(f"{x:.2f}" for x in r["ratio_runs"])
                    + " | "
                    + ", ".join(f"{x:.2f}" for x in r["cpu_ratio_runs"])
                    + " |"
                )
    if result.get("memory"):
        lines += [
            "",
            "## Peak memory during a round",
            "",
            "tracemalloc's peak from configure_train to the new model, less what was allocated before the round "
            "(the model and the strategy's state). Limit: 3 x N x 4 bytes (an accumulator, 8 bytes per value, and one "
            "reply, 4). 'over the limit': the peak less 3 x N x 4, in bytes: the reply's .npy header and the Python "
            "objects of the message being read (Message, records, metadata) and the round's records of its clients "
            "(messages sent, volume rows: a few KB per client), none of it growing with N; 'met' where the peak is "
            "within 0.5% of the limit (3.00 at two decimals) and that excess is such bookkeeping. 'above held': the "
            "peak less what the process holds before or after the round, whichever is more (different only in the "
            "fit round, which turns the warm-up snapshots into the 31 B/weight state).",
            "",
            "| case | parameters | clients | round (phase) | peak above before | / (N x 4) | over the limit | limit 3 "
            "| above held / (N x 4) | state B/weight |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result["memory"]:
            lines.append(
                f"| {c['case']} | {c['num_parameters']:,} | {c['clients']} | {c['round']} ({c['phase']}) | "
                f"{mb(c['peak_above_before_bytes'])} | {c['peak_over_n4']:.3f} | {c['excess_over_limit_bytes']:,} B | "
                f"{'met' if c['peak_over_n4'] < 3.005 else 'missed'} | "
                f"{c['peak_above_held_bytes'] / (4 * c['num_parameters']):.3f} | {c['state_bytes_per_weight']:.1f} |"
            )
        for c in result["memory"]:
            if c["clients"] == max(x["clients"] for x in result["memory"]) and c["round"] == max(
                x["round"] for x in result["memory"] if x["case"] == c["case"]
            ):
                lines += [
                    "",
                    f"Arrays the {c['case']} strategy holds after round {c['round']} ({c['num_parameters']:,} weights):",
                    "",
                    "| array | bytes | B/weight |",
                    "|---|---|---|",
                ]
                for path, size in c["state_arrays"].items():
                    lines.append(f"| `{path}` | {size:,} | {size / c['num_parameters']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", action="append", choices=("time", "memory"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each time case (medians per round)")
    args = parser.parse_args()
    args.out = args.out or default_out("server_round", args.quick)
    parts = args.part or ["time", "memory"]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cmd_keys = {"cmd-warmup": 3, "cmd-every": 2, "cmd-fraction": 0.15, "cmd-samples": 1000, "cmd-modes": 10}
    data = {"dataset": "synthetic", "synthetic-test-size": 10}
    if args.quick:
        time_layout = {**data, **cmd_keys, "model": "lenet5", "num-clients": 10, "synthetic-train-size": 20}
        memory_layout = {**data, **cmd_keys, "model": "lenet5"}
        rounds, clients = {"fedavg": 3, "cmd": 6}, [2, 4]
    else:
        time_layout = {
            **data,
            **cmd_keys,
            "model": "resnet18",
            "synthetic-shape": "3x32x32",
            "num-clients": 10,
            "synthetic-train-size": 20,
        }
        memory_layout = {**data, **cmd_keys, "model": "mlp", "synthetic-shape": "1x1x156239"}
        rounds, clients = {"fedavg": 4, "cmd": 10}, [2, 20]
    result = {"command": command_line(), "machine": machine()}
    warm_layout = {**data, **cmd_keys, "model": "lenet5", "num-clients": 4, "synthetic-train-size": 8}
    result["kernel_warmup_seconds"] = warm_kernels(warm_layout)
    if "time" in parts:
        result["first_touch"] = first_touch(2 * 11_173_962)  # an accumulator and the floor's, at ResNet-18's size
        result["time"] = time_part(time_layout, rounds, repeats=1 if args.quick else args.repeats)
    if "memory" in parts:
        result["memory"] = memory_part(memory_layout, clients, cmd_rounds=7)
    text = markdown(result)
    write_outputs(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
