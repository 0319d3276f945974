"""Scale (issue 7): 1,000 simulated clients, 10 sampled per round, federated CMD, on this machine.

experiments/fmnist_lenet5_cmd.toml (Fashion-MNIST, LeNet-5) with num-clients 1000, fraction-train
0.01, 20 rounds, cmd-warmup 5. Measured:
- wall time of the run (set-up included) and per round: round_seconds and strategy_seconds from
  metrics.csv, node discovery (round 1 asks all 1,000 nodes), central evaluation and the checkpoint
  write (timers wrapped around fedcmd.server's calls; the server loop runs in this process with
  either engine);
- peak memory: the process tree's RSS, PSS and anonymous RSS summed over this process and its
  descendants, sampled every 0.5 s (Ray's workers and object store included), also per kind of
  process (driver, Ray's client actors, GCS, ...), and the kernel's exact peaks from getrusage
  (RUSAGE_SELF; RUSAGE_CHILDREN is the largest single waited-for descendant, not a sum); the
  tree's memory right before and after round 1's discovery (every node known, none trained yet),
  the median over rounds 2..R, and the nodes the server knows after each round's discovery;
- the clients' state at the end: their coefficient stores' bytes, derived from the server's log
  (either engine) and, in-process, measured in every node's context.state;
- client-side coefficient storage per embedded parameter (target <= 10 B): with the in-process
  engine, read from every node's context.state after the run, summing
  `CoefficientStore.load(ctx, n).nbytes()` over the clients whose store holds embedded weights,
  divided by their embedded counts (also the raw bytes of the stored arrays, npy headers included).
  With either engine, the same figure is derived from the server's log (its strategy after the run):
  a store rebuilt from events [0, acked version) of each client; in-process the two must agree.

    .venv/bin/python experiments/benchmarks/scale.py [--quick] [--engine inprocess|ray] [--clients 1000]
        [--fraction 0.01] [--rounds 20] [--warmup 5] [--set key=value ...] [--ray-worker-niceness N]
        [--out experiments/benchmarks/results/scale_<engine>.json]   (also writes the .md beside it)

experiments/benchmarks/scale_clients.py runs this for 1,000 and 10,000 clients, 10 and 100 per round,
both engines (issue 15), and compares them.

--quick: 100 clients, 2 per round, 3 rounds, cmd-warmup 1 (one embedding event reaches the clients
of round 3), 2,000 generated images of Fashion-MNIST's shape (a smoke run, seconds; written to
scale_<engine>_quick.*).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from benchtools import (
    PhaseTimers,
    TreeMemorySampler,
    command_line,
    default_out,
    machine,
    mb,
    rusage_peaks,
    tree_memory_bytes,
    write_outputs,
)
from flwr.app import ArrayRecord

import fedcmd.server
from clients.cmd import STORE_KEY, CoefficientStore
from fedcmd.config import load_config
from fedcmd.engine import LocalGrid, run_inprocess, run_ray
from fedcmd.report import read_rows
from fedcmd.server import CentralEvaluator

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "fmnist_lenet5_cmd.toml"
QUICK = ["dataset=synthetic", "synthetic-train-size=2000", "synthetic-test-size=200", "cmd-samples=200"]


def store_figures(stores: list[tuple[int, int, int]]) -> dict:
    """(embedded count, nbytes, stored bytes) per client -> bytes per embedded parameter."""
    holding = [s for s in stores if s[0] > 0]
    per_client = [nbytes / embedded for embedded, nbytes, _ in holding]
    embedded = sum(s[0] for s in holding)
    return dict(
        clients_with_store=len(stores),
        clients_with_embedded=len(holding),
        clients_with_empty_store=len(stores) - len(holding),
        empty_store_bytes_each=next((nbytes for embedded, nbytes, _ in stores if embedded == 0), None),
        embedded_total=embedded,
        nbytes_total=sum(s[1] for s in holding),
        bytes_per_embedded=sum(s[1] for s in holding) / embedded if embedded else float("nan"),
        stored_bytes_per_embedded=sum(s[2] for s in holding) / embedded if embedded else float("nan"),
        per_client_min=min(per_client, default=float("nan")),
        per_client_median=float(np.median(per_client)) if per_client else float("nan"),
        per_client_max=max(per_client, default=float("nan")),
    )


def measured_stores(grid: LocalGrid, n_params: int) -> list[tuple[int, int, int]]:
    """What the in-process clients actually hold in context.state."""
    stores = []
    for context in grid.contexts.values():
        record = context.state.get(STORE_KEY)
        if record is None:
            continue
        store = CoefficientStore.load(context, n_params)
        stored = sum(len(array.data) for array in record.values())
        stores.append((int(store.embedded.sum()), store.nbytes(), stored))
    return stores


def derived_stores(strategy) -> list[tuple[int, int, int]]:
    """The stores the server's log says its clients hold: events [0, acked) of each client."""
    stores = []
    for version in strategy.acked.values():
        store = CoefficientStore(strategy.weights.size)
        store.apply(0, version, strategy.events_since(0)[:version], strategy.reference_index if version else None)
        stores.append((int(store.embedded.sum()), store.nbytes(), 0))
    return stores


def state_bytes(grid: LocalGrid) -> dict:
    """Bytes of the array data every in-process client keeps in context.state (the clients' memory)."""
    held = [
        sum(len(a.data) for record in c.state.values() if isinstance(record, ArrayRecord) for a in record.values())
        for c in grid.contexts.values()
    ]
    return dict(clients=len(held), clients_with_state=sum(1 for b in held if b), bytes=sum(held))


def run(config: dict, engine: str, ray_worker_niceness: int | None = None) -> dict:
    timers = PhaseTimers()
    server = {}  # the strategy the server loop drives (it runs in this process with either engine)
    discovery: dict[int, dict] = {}  # round -> nodes known after discovery, tree memory around it

    def before_discovery(args, kw) -> None:
        timers.round = int(args[2])
        if timers.round == 1:
            discovery[1] = {"memory_before": tree_memory_bytes()}

    def after_discovery(result, args, kw, elapsed) -> None:
        known = len(args[1].partition_of)
        entry = discovery.setdefault(int(args[2]), {})
        entry.update(nodes_known=known, seconds=elapsed)
        if int(args[2]) == 1:
            entry["memory_after"] = tree_memory_bytes()

    timers.wrap(fedcmd.server, "discover_nodes", "discover", before=before_discovery, after=after_discovery)
    checkpoints: list[float] = []  # when each round's checkpoint was written: the end of each round
    timers.wrap(
        fedcmd.server, "save_checkpoint", "checkpoint", after=lambda *_: checkpoints.append(time.perf_counter())
    )
    timers.wrap(fedcmd.server, "make_strategy", after=lambda result, *_: server.__setitem__("strategy", result))
    timers.wrap(CentralEvaluator, "__call__", "evaluate")
    if engine == "ray":
        os.environ.setdefault("FLWR_HOME", str(REPO / ".flwr"))
        if ray_worker_niceness is not None:  # Ray's raylet reads it when it starts (Ray's default: 15)
            os.environ["RAY_worker_niceness"] = str(ray_worker_niceness)
    grid = None
    try:
        with tempfile.TemporaryDirectory() as out, TreeMemorySampler() as sampler:
            start = time.perf_counter()
            if engine == "inprocess":
                from fedcmd.client_app import app as client_app

                grid = LocalGrid(client_app, config["num-clients"])
                summary = run_inprocess(config, out, progress=True, grid=grid)
            else:
                summary = run_ray(config, out, progress=True)
            wall = time.perf_counter() - start
            metrics = read_rows(Path(out) / "metrics.csv")
            strategy = server["strategy"]  # as the last round left it
    finally:
        timers.restore()
    rounds = []
    for m in metrics[1:]:
        rnd = int(m["round"])
        discover, evaluate = timers.inclusive(rnd, "discover"), timers.inclusive(rnd, "evaluate")
        others = m["round_seconds"] - m["strategy_seconds"] - discover - evaluate
        rounds.append(
            dict(
                round=rnd,
                round_seconds=m["round_seconds"],
                strategy_seconds=m["strategy_seconds"],
                discover_seconds=discover,
                evaluate_seconds=evaluate,
                clients_and_transport_seconds=others,
                checkpoint_seconds=timers.inclusive(rnd, "checkpoint"),
                nodes_known=discovery.get(rnd, {}).get("nodes_known"),
                accepted=int(m["accepted"]),
                embedded_fraction=m["embedded_fraction"],
                store_version=int(m["store_version"]),
            )
        )
    n = int(strategy.weights.size)
    result = dict(
        engine=engine,
        config=config,
        num_parameters=n,
        wall_seconds=wall,
        final_accuracy=summary["final_accuracy"],
        embedded_fraction=summary["embedded_fraction"],
        embedding_events=summary["embedding_events"],
        replies_rejected=summary["replies_rejected"],
        round_seconds_mean=float(np.mean([r["round_seconds"] for r in rounds])),
        strategy_seconds_mean=float(np.mean([r["strategy_seconds"] for r in rounds])),
        memory_peak_tree=sampler.peak,
        memory_samples=sampler.samples,
        memory_peak_by_process=dict(sampler.peak_by_process),
        # rounds 2..R: what the run holds once every node is known, without the rounds' spikes
        memory_later_rounds=sampler.steady(checkpoints[0], checkpoints[-1]) if len(checkpoints) > 1 else {},
        memory_series=sampler.series,
        rusage_peak=rusage_peaks(),
        store_from_server_log=store_figures(derived_stores(strategy)),
        rounds=rounds,
        discovery_round_1=discovery.get(1, {}),
        client_state_from_server_log=sum(s[1] for s in derived_stores(strategy)),
        ray_worker_niceness=ray_worker_niceness if engine == "ray" else None,
        target_store_bytes=10.0,
    )
    if grid is not None:
        result["store_measured"] = store_figures(measured_stores(grid, n))
        result["client_state_measured"] = state_bytes(grid)
    store = result.get("store_measured", result["store_from_server_log"])
    print(
        f"[{engine}] {wall:.1f} s; peak tree RSS {mb(sampler.peak['rss'])}, PSS {mb(sampler.peak['pss'])}; "
        f"client store {store['bytes_per_embedded']:.3f} B per embedded parameter "
        f"({store['clients_with_embedded']} clients)",
        flush=True,
    )
    return result


def markdown(result: dict) -> str:
    r, c = result["run"], result["run"]["config"]
    lines = [
        "# Scale: many simulated clients, federated CMD",
        "",
        f"Machine: {result['machine']['cpus']} cores, load average {result['machine']['load_average']} at start. "
        f"Command: `{result['command']}`.",
        "",
        f"{c['num-clients']} clients, {c['fraction-train']} sampled per round, {c['num-server-rounds']} rounds, "
        f"cmd-warmup {c['cmd-warmup']}, {c['model']} ({r['num_parameters']:,} parameters) on {c['dataset']}, "
        f"engine {r['engine']}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| wall time | {r['wall_seconds']:.1f} s | - |",
        f"| round / strategy seconds, mean | {r['round_seconds_mean']:.2f} / {r['strategy_seconds_mean']:.3f} | - |",
        f"| peak memory, process tree RSS (sampled) | {mb(r['memory_peak_tree']['rss'])} "
        f"({r['memory_peak_tree']['processes']} processes) | - |",
        f"| peak memory, process tree PSS (sampled) | {mb(r['memory_peak_tree']['pss'])} | - |",
        f"| peak RSS of this process / largest child (getrusage) | {mb(r['rusage_peak']['self'])} / "
        f"{mb(r['rusage_peak']['children_max'])} | - |",
        f"| final accuracy / embedded fraction | {r['final_accuracy']:.4f} / {r['embedded_fraction']:.3f} | - |",
    ]
    d = r.get("discovery_round_1", {})
    if "memory_before" in d:
        lines.append(
            f"| discovery in round 1: nodes known after it, seconds, tree RSS before / after | {d['nodes_known']}, "
            f"{d['seconds']:.2f} s, {mb(d['memory_before']['rss'])} / {mb(d['memory_after']['rss'])} | - |"
        )
    held = r.get("client_state_measured")
    lines.append(
        "| clients' state at the end (CMD stores), from the server's log"
        + (" / measured in context.state" if held else "")
        + f" | {mb(r['client_state_from_server_log'])}"
        + (f" / {mb(held['bytes'])} ({held['clients_with_state']} clients hold state)" if held else "")
        + " | - |"
    )
    for key, title in (
        ("store_measured", "client store, measured in context.state"),
        ("store_from_server_log", "client store, derived from the server's log"),
    ):
        if key in r:
            s = r[key]
            lines.append(
                f"| {title}: bytes per embedded parameter (all / per-client min, median, max) | "
                f"{s['bytes_per_embedded']:.3f} / {s['per_client_min']:.3f}, {s['per_client_median']:.3f}, "
                f"{s['per_client_max']:.3f} ({s['clients_with_embedded']} clients; "
                f"{s['clients_with_empty_store']} hold an empty store) | <= {r['target_store_bytes']:g} B |"
            )
    if "store_measured" in r:
        lines.append(
            f"| same, raw bytes of the stored arrays (npy headers included) | "
            f"{r['store_measured']['stored_bytes_per_embedded']:.3f} | - |"
        )
    lines += [
        "",
        "| round | round s | strategy s | discovery s | evaluation s | clients + transport s | checkpoint s "
        "| nodes known | accepted | embedded | store version |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rounds"]:
        lines.append(
            f"| {row['round']} | {row['round_seconds']:.2f} | {row['strategy_seconds']:.3f} | "
            f"{row['discover_seconds']:.2f} | {row['evaluate_seconds']:.2f} | "
            f"{row['clients_and_transport_seconds']:.2f} | {row['checkpoint_seconds']:.3f} | "
            f"{row['nodes_known']} | {row['accepted']} | "
            f"{row['embedded_fraction']:.3f} | {row['store_version']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 clients, 2 per round, 3 rounds (a smoke run)")
    parser.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess")
    parser.add_argument("--clients", type=int, help="num-clients (default 1000; 100 with --quick)")
    parser.add_argument("--fraction", type=float, help="fraction-train (default 0.01; 0.02 with --quick)")
    parser.add_argument("--rounds", type=int, help="num-server-rounds (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="cmd-warmup (default 5; 1 with --quick)")
    parser.add_argument("--set", action="append", default=[], help="extra config override key=value")
    parser.add_argument(
        "--ray-worker-niceness",
        type=int,
        help="with --engine ray: the niceness Ray gives its workers, relative to this process (Ray's default 15)",
    )
    parser.add_argument("--out", type=Path, help="default results/scale_<engine>[_quick].json")
    args = parser.parse_args()
    q = args.quick
    overrides = [
        *(QUICK if q else []),
        f"num-clients={args.clients or (100 if q else 1000)}",
        f"fraction-train={args.fraction or (0.02 if q else 0.01)}",
        f"num-server-rounds={args.rounds or (3 if q else 20)}",
        f"cmd-warmup={args.warmup or (1 if q else 5)}",
        *args.set,
    ]
    config = load_config(CONFIG, overrides)
    out = args.out or default_out(f"scale_{args.engine}", args.quick)
    result = {
        "command": command_line(),
        "machine": machine(),
        "run": run(config, args.engine, args.ray_worker_niceness),
    }
    text = markdown(result)
    write_outputs(out, result, text)
    print(text)


if __name__ == "__main__":
    main()
