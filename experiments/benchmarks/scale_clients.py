"""Scale (issue 15, point 4): 10,000 simulated clients, federated CMD, in-process and on Ray, and what
the clients that are not sampled cost.

The runs: experiments/benchmarks/scale.py (experiments/fmnist_lenet5_cmd.toml: LeNet-5 on
Fashion-MNIST, IID; 20 rounds, cmd-warmup 5) for every engine (in-process, Ray), number of clients
(1,000 and 10,000) and clients per round (10 and 100; fraction-train = per round / clients), each
in a process of its own so that its peaks are its own; each run's results go to
results/scale/<engine>-<clients>-<per round>.{json,md}. Fashion-MNIST has 60,000 training images,
so 10,000 clients hold 6 each (1,000 clients: 60); that changes what a client trains on, not what
the server and the engines hold per client. Then, at equal clients per round, the growth of peak
memory (process tree: RSS, PSS, anonymous RSS; Ray's processes included) from 1,000 to 10,000
clients, per 1,000 more clients that are never sampled; also net of the state the sampled clients
keep (their CMD coefficient stores, in context.state: from 10,000 clients more distinct clients are
sampled than from 1,000, and each keeps its store; that is client memory, which a deployment keeps
on the devices, not a cost of the idle ones).

Idle clients, measured directly (`idle_costs`: tracemalloc, for 1,000 and 10,000 nodes, nothing
trained), bytes per node:
- partitions: the index arrays of the partitions (`fedcmd.task.partitions`, held by the server and
  by every client process);
- fedcmd's in-process grid: one Context per node (`fedcmd.engine.LocalGrid`, as Flower keeps one);
- fedcmd's server after discovery (`fedcmd.server.discover_nodes`, the real ClientApp answering):
  the node maps and the two volume rows of each node's discovery exchange, kept for the run; and
  the peak while discovering (all queries and replies are held at once);
- Flower 1.41's simulation engine (`run_simulation`), per node, before any message: its LinkState's
  node record and a DeprecatedRunInfoStore with a Context (`vce_api._register_nodes`,
  `_register_node_info_stores`).
And time: one pass of Flower's message sweep (`vce_api.add_messages_to_queue`, which the engine
repeats every 0.1 s for the whole run, under the LinkState's lock) over all nodes with 0, 10 and 100
messages waiting for their replies: it asks each node for its messages, and each ask scans every
stored message, so its cost grows with nodes x messages in flight.

    .venv/bin/python experiments/benchmarks/scale_clients.py [--engines inprocess,ray]
        [--clients 1000,10000] [--per-round 10,100] [--rounds 20] [--warmup 5]
        [--ray-worker-niceness 0] [--reuse] [--out experiments/benchmarks/results/scale_clients.json]

--reuse keeps the results of runs already in results/scale/ (e.g. after an interrupted matrix) and
runs only the missing ones; the idle-client figures are always measured afresh.
--ray-worker-niceness: the niceness Ray adds to its workers (Ray's default 15; given, it is set
through RAY_worker_niceness). The recorded results used 0: run at `nice -n 2` on a 2-core machine
shared with other jobs, workers at 15 would get little CPU beside the driver they serve.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from benchtools import command_line, machine, mb, write_outputs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG = REPO / "experiments" / "fmnist_lenet5_cmd.toml"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# --------------------------------------------------------------------------------------- the runs


def run_name(engine: str, clients: int, per_round: int) -> str:
    return f"{engine}-{clients}-{per_round}"


def run_one(engine: str, clients: int, per_round: int, args, out: Path) -> dict:
    """One scale.py run in a process of its own; its result (results/scale/<name>.json)."""
    if args.reuse and out.exists():
        print(f"== {out.name}: kept (--reuse)", flush=True)
        return json.loads(out.read_text())
    command = [
        sys.executable,
        str((HERE / "scale.py").relative_to(REPO)),
        f"--engine={engine}",
        f"--clients={clients}",
        f"--fraction={per_round / clients!r}",
        f"--rounds={args.rounds}",
        f"--warmup={args.warmup}",
        f"--out={out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out}",
    ]
    if engine == "ray" and args.ray_worker_niceness is not None:
        command.append(f"--ray-worker-niceness={args.ray_worker_niceness}")
    print("==", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if done.returncode:
        print(done.stdout[-4000:])
        raise SystemExit(f"{out.name}: scale.py exited with {done.returncode}")
    print(f"   {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def distinct_sampled(config: dict) -> int:
    from fedcmd.sampling import sample_cohort

    c = config
    cohorts = [
        sample_cohort(c["num-clients"], c["fraction-train"], c["seed"], r) for r in range(1, c["num-server-rounds"] + 1)
    ]
    return len(set().union(*(set(x.tolist()) for x in cohorts)))


def run_row(result: dict) -> dict:
    """The figures of one run that the tables show."""
    r = result["run"]
    c = r["config"]
    rounds = r["rounds"]
    store = r.get("store_measured", r["store_from_server_log"])
    sampled = distinct_sampled(c)
    return dict(
        engine=r["engine"],
        clients=c["num-clients"],
        per_round=round(c["num-clients"] * c["fraction-train"]),
        rounds=len(rounds),
        distinct_sampled=sampled,
        never_sampled=c["num-clients"] - sampled,
        wall_seconds=r["wall_seconds"],
        round_1_seconds=rounds[0]["round_seconds"],
        discovery_seconds=rounds[0]["discover_seconds"],
        nodes_known_after_round_1=rounds[0]["nodes_known"],
        later_round_seconds=sum(x["round_seconds"] for x in rounds[1:]) / max(len(rounds) - 1, 1),
        later_evaluate_seconds=sum(x["evaluate_seconds"] for x in rounds[1:]) / max(len(rounds) - 1, 1),
        later_checkpoint_seconds=sum(x["checkpoint_seconds"] for x in rounds[1:]) / max(len(rounds) - 1, 1),
        peak_rss=r["memory_peak_tree"]["rss"],
        peak_pss=r["memory_peak_tree"]["pss"],
        peak_rss_anon=r["memory_peak_tree"].get("rss_anon"),
        processes=r["memory_peak_tree"]["processes"],
        after_discovery_rss_anon=r["discovery_round_1"]["memory_after"].get("rss_anon"),
        later_rounds_rss_anon=r.get("memory_later_rounds", {}).get("tree_rss_anon_median"),
        peak_by_process=r.get("memory_peak_by_process", {}),
        client_state=r["client_state_from_server_log"],
        store_bytes_per_embedded=store["bytes_per_embedded"],
        store_clients=store["clients_with_embedded"],
        final_accuracy=r["final_accuracy"],
        embedded_fraction=r["embedded_fraction"],
    )


def growth(rows: list[dict]) -> list[dict]:
    """Peak memory from the fewest to the most clients, at equal engine and clients per round."""
    out = []
    for engine in dict.fromkeys(r["engine"] for r in rows):
        for k in dict.fromkeys(r["per_round"] for r in rows):
            group = sorted(
                (r for r in rows if r["engine"] == engine and r["per_round"] == k), key=lambda r: r["clients"]
            )
            if len(group) < 2:
                continue
            a, b = group[0], group[-1]
            idle = b["never_sampled"] - a["never_sampled"]
            state = b["client_state"] - a["client_state"]
            row = dict(engine=engine, per_round=k, clients=(a["clients"], b["clients"]), more_never_sampled=idle)
            row["client_state_difference"] = state
            for key in ("peak_rss", "peak_pss", "peak_rss_anon", "after_discovery_rss_anon"):
                if a[key] is None or b[key] is None:
                    continue
                row[key] = (a[key], b[key])
                row[f"{key}_per_1000_idle"] = (b[key] - a[key]) / idle * 1000
                # after discovery no client has trained yet: no client state to take off
                held = 0 if key == "after_discovery_rss_anon" else state
                row[f"{key}_net_per_1000_idle"] = (b[key] - a[key] - held) / idle * 1000
            out.append(row)
    return out


# ------------------------------------------------------------------------------------ idle clients


def traced(fn) -> tuple[object, int, int]:
    """(fn(), bytes it left allocated, its peak above the start), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = fn()
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, kept, peak


def flower_simulation_state():
    """A LinkState as Flower's `run_simulation` makes it, with a run registered, and a grid on it."""
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(1)
    run.primary_task_id, run.federation_id = 7, NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 1, 1  # as a ServerApp's
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return factory, state, run, grid


def idle_costs(n: int) -> dict:
    """Bytes per node of what every node costs before it trains (module docstring), and Flower's sweep."""
    from flwr.app import Message, RecordDict
    from flwr.server.superlink.fleet.vce import vce_api

    import fedcmd.server
    from fedcmd import task
    from fedcmd.client_app import app
    from fedcmd.config import load_config
    from fedcmd.engine import LocalGrid

    def fedcmd_side() -> dict:
        config = load_config(CONFIG, [f"num-clients={n}", f"fraction-train={10 / n!r}"])
        task.dataset(config)  # loaded before measuring: shared by all clients
        _, partitions, _ = traced(lambda: task.partitions(config))
        grid, grid_bytes, _ = traced(lambda: LocalGrid(app, n))
        strategy = fedcmd.server.make_strategy(config)
        started = time.perf_counter()
        _, discovered, discovery_peak = traced(lambda: fedcmd.server.discover_nodes(grid, strategy, 1, 600.0))
        seconds = time.perf_counter() - started
        assert len(strategy.partition_of) == n
        return dict(
            partitions_bytes_per_node=partitions / n,
            local_grid_bytes_per_node=grid_bytes / n,
            server_after_discovery_bytes_per_node=discovered / n,
            server_discovery_peak_bytes_per_node=discovery_peak / n,
            discovery_volume_rows=len(strategy.accountant.rows),
            discovery_seconds_inprocess=seconds,
        )

    ours = fedcmd_side()
    gc.collect()
    factory, state, run, flower_grid = flower_simulation_state()
    mapping, link_bytes, _ = traced(lambda: vce_api._register_nodes(n, factory))
    stores, store_bytes, _ = traced(lambda: vce_api._register_node_info_stores(mapping, run))
    sweeps = {}
    nodes = sorted(mapping)  # a cohort's nodes are in no particular order of registration
    for waiting in (0, 10, 100):
        flower_grid.push_messages(
            [Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1") for node in nodes[:waiting]]
        )
        for node_id in mapping:  # the first pass hands the messages out
            state.get_message_ins(node_id=node_id, limit=1)
        started_sweep = time.perf_counter()
        for node_id in mapping:  # the passes that follow, while the clients train, find nothing new
            state.get_message_ins(node_id=node_id, limit=1)
        sweeps[waiting] = time.perf_counter() - started_sweep
        state.delete_messages(set(state.message_ins_store))
    return dict(
        nodes=n,
        **ours,
        flower_linkstate_bytes_per_node=link_bytes / n,
        flower_run_info_store_bytes_per_node=store_bytes / n,
        flower_sweep_seconds={str(k): v for k, v in sweeps.items()},
    )


# ---------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Scale: 1,000 and 10,000 simulated clients, federated CMD, in-process and on Ray",
        "",
        f"Machine: {m['cpus']} cores, shared with other jobs (load average {m['load_average']} at start); "
        f"flwr {m['flwr']}, torch {m['torch']}. Command: `{result['command']}` (each run: "
        "`experiments/benchmarks/scale.py`, results in `results/scale/`). "
        f"experiments/fmnist_lenet5_cmd.toml, {result['rounds']} rounds, cmd-warmup {result['warmup']}; "
        f"Ray workers at niceness +{result['ray_worker_niceness']} relative to the driver. Fashion-MNIST's "
        "60,000 training images over 10,000 clients: 6 each (1,000 clients: 60).",
        "",
        "| engine | clients | per round | wall s | round 1 s (discovery s) | later rounds s (evaluation, checkpoint) "
        "| peak RSS / PSS / anon RSS (processes) | anon RSS after discovery / later rounds (median) "
        "| clients' state | store B per embedded param | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['engine']} | {r['clients']:,} | {r['per_round']} | {r['wall_seconds']:.0f} | "
            f"{r['round_1_seconds']:.1f} ({r['discovery_seconds']:.1f}) | {r['later_round_seconds']:.2f} "
            f"({r['later_evaluate_seconds']:.2f}, {r['later_checkpoint_seconds']:.3f}) | "
            f"{mb(r['peak_rss'])} / {mb(r['peak_pss'])} / {mb(r['peak_rss_anon'] or 0)} ({r['processes']}) | "
            f"{mb(r['after_discovery_rss_anon'] or 0)} / {mb(r['later_rounds_rss_anon'] or 0)} | "
            f"{mb(r['client_state'])} ({r['distinct_sampled']} clients) | {r['store_bytes_per_embedded']:.2f} | "
            f"{r['final_accuracy']:.4f} |"
        )
    lines += [
        "",
        "Peak memory from the fewest to the most clients, per 1,000 more clients never sampled (net: less the "
        "difference in the sampled clients' state):",
        "",
        "| engine | per round | clients | more never sampled | peak RSS | peak RSS per 1,000 idle (net) "
        "| peak PSS per 1,000 idle (net) | peak anon RSS per 1,000 idle (net) | anon RSS after discovery, per 1,000 idle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result["growth"]:
        cells = []
        for key in ("peak_rss", "peak_pss", "peak_rss_anon"):
            if f"{key}_per_1000_idle" in g:
                cells.append(f"{mb(g[f'{key}_per_1000_idle'])} ({mb(g[f'{key}_net_per_1000_idle'])})")
            else:
                cells.append("-")
        cells.append(mb(g["after_discovery_rss_anon_per_1000_idle"]) if "after_discovery_rss_anon" in g else "-")
        a, b = g["peak_rss"]
        lines.append(
            f"| {g['engine']} | {g['per_round']} | {g['clients'][0]:,} -> {g['clients'][1]:,} | "
            f"{g['more_never_sampled']:,} | {mb(a)} -> {mb(b)} | " + " | ".join(cells) + " |"
        )
    labels = ["this process", "ray::ClientAppActor", "gcs_server", "raylet"]
    ray_runs = [r for r in result["runs"] if r["engine"] == "ray" and r["peak_by_process"]]
    if ray_runs:
        lines += [
            "",
            "On Ray, peak anonymous RSS by process (same-named processes summed; sampled every 0.5 s; the "
            "driver is this process: the server, Flower's simulation engine and every node's Context):",
            "",
            "| clients | per round | " + " | ".join(labels) + " | all others |",
            "|---|---|" + "---|" * (len(labels) + 1),
        ]
        for r in ray_runs:
            p = r["peak_by_process"]
            others = sum(v for k, v in p.items() if k not in labels)
            lines.append(
                f"| {r['clients']:,} | {r['per_round']} | "
                + " | ".join(mb(p.get(k, 0)) for k in labels)
                + f" | {mb(others)} |"
            )
    lines += [
        "",
        "Idle clients, measured directly (tracemalloc; bytes per node; nothing trained):",
        "",
        "| nodes | partitions | in-process grid (Context) | server after discovery | server peak while discovering "
        "| Flower LinkState | Flower run-info store (Context) | discovery in-process s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in result["idle"]:
        lines.append(
            f"| {i['nodes']:,} | {i['partitions_bytes_per_node']:.0f} | {i['local_grid_bytes_per_node']:.0f} | "
            f"{i['server_after_discovery_bytes_per_node']:.0f} | {i['server_discovery_peak_bytes_per_node']:.0f} | "
            f"{i['flower_linkstate_bytes_per_node']:.0f} | {i['flower_run_info_store_bytes_per_node']:.0f} | "
            f"{i['discovery_seconds_inprocess']:.2f} |"
        )
    lines += [
        "",
        "Flower's message sweep (one pass over all nodes, repeated every 0.1 s for the whole run), seconds:",
        "",
        "| nodes | no message waiting | 10 waiting | 100 waiting |",
        "|---|---|---|---|",
    ]
    for i in result["idle"]:
        s = i["flower_sweep_seconds"]
        lines.append(f"| {i['nodes']:,} | {s['0']:.3f} | {s['10']:.3f} | {s['100']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="inprocess,ray")
    parser.add_argument("--clients", type=ints, default=[1000, 10000])
    parser.add_argument("--per-round", type=ints, default=[10, 100])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ray-worker-niceness", type=int)
    parser.add_argument("--reuse", action="store_true", help="keep runs whose results/scale/<run>.json exists")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale_clients.json")
    args = parser.parse_args()
    folder = args.out.parent / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command_line(),
        "machine": machine(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "ray_worker_niceness": 15 if args.ray_worker_niceness is None else args.ray_worker_niceness,
    }
    idle_costs(50)  # imports what the first partitioning and messages import, which is no per-node cost
    idle = [idle_costs(n) for n in args.clients]
    runs = []
    for engine in args.engines.split(","):
        for k in args.per_round:
            for n in args.clients:
                runs.append(run_row(run_one(engine, n, k, args, folder / f"{run_name(engine, n, k)}.json")))
    result.update(runs=runs, growth=growth(runs), idle=idle)
    text = markdown(result)
    write_outputs(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
