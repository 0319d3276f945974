"""Node discovery cost (issue 13): how long round 1's discovery takes for N in-process clients.

Round 1 asks every node which partition it holds (`fedcmd.server.discover_nodes`): one query down and
one reply up per node, each round-tripped through Flower's serialisation by fedcmd's in-process grid
(`LocalGrid`), the real ClientApp answering, every claim checked and both messages counted by the
volume accountant. The server side was quadratic (each reply looked up its query in a list: 12 s for
6,000 clients, 150 s for 20,000); it must now be linear, and 20,000 clients under 2 s.

That target is below Flower's own floor in one process. Per node, the grid round-trips the query
and the reply through `message_to_proto`/`message_from_proto` (~25 + ~55 us) and the ClientApp
builds its reply (MetricRecord, RecordDict, Message: ~30 us): the Flower floor below, the same
queries created and carried to the same ClientApp and back with no server code at all, takes
2.7-5.1 s for 20,000 clients on this loaded 2-core machine (results/discovery.md). No server
can bring discovery under the floor; what fedcmd controls is the server part (total minus the
grid), and that part was cut by half:

- creating the queries: Flower's Message constructor, ~7 us each (`fedcmd.server.discovery_queries`,
  shared with the floor);
- reading and checking each claim and registering the node: ~5 us;
- booking both messages' exact wire size. Flower's deflate of a message hashes every object in it
  (an object's id is the hash of its deflated bytes and a parent's bytes hold its children's
  ids): the accountant deflated each message's tree, ~30 + ~45 us per query and reply. It now
  sizes what holds no arrays without a hash (`fedcmd.accountant.message_bytes`: a parent's size
  depends only on how many distinct children it has, every id being 64 characters; records are
  deduped by their deflated bytes), ~8 + ~15 us, the same bytes as Flower's own
  (tests/test_accountant.py, over random metadata, errors, every record value type, equal
  records, repeated chunks). Below array records, objects are still counted by id.

Run in turn under the same load, 20,000 clients: server part 2.4-4.0 s before, 1.1-1.5 s after (load
average 6-11; results/discovery.md's note); in the recorded run, at load 12, 1.9-2.3 s. The rest is
Flower building and serialising small objects: Message construction, `metadata_to_proto` and the
reply's MetricRecord deflate are most of what the server part still spends.

Measured for each N: wall time of `discover_nodes` (best of `--repeats`, each with a fresh strategy
and grid), split into the grid's time (`get_node_ids`, and `send_and_receive`: transport and the
ClientApp) and the server's (everything else: the queries, claim checks, registering, accounting),
and the per-node cost, whose flatness over N is the linearity check. Beside it, in turn with each
discovery run, the Flower floor (`time_floor`): the same exchange with no server code, the nodes
listed, the same queries created (`fedcmd.server.discovery_queries`), carried by the same grid to
the real ClientApp and back; what any server pays for discovery on this grid in one process.

    .venv/bin/python experiments/benchmarks/discovery.py [--clients 1000 5000 10000 20000] [--repeats 3]
        [--out experiments/benchmarks/results/discovery.json]   (also writes the .md beside it)
        [--note "what else ran on the machine"]   (a line of the .md)

From a git worktree that uses the main checkout's virtual environment, prefix `PYTHONPATH=.`: the
editable install would otherwise import the main checkout's fedcmd.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchtools import command_line, machine, write_outputs

from fedcmd.client_app import app as client_app
from fedcmd.config import resolve
from fedcmd.engine import LocalGrid
from fedcmd.server import discover_nodes, discovery_queries, make_strategy


def timed_grid(grid: LocalGrid) -> list[float]:
    """Charge the time spent in the grid's methods that discovery calls (node listing, transport
    with the ClientApp) to the one-element list returned."""
    spent = [0.0]
    for name in ("get_node_ids", "send_and_receive"):
        method = getattr(grid, name)

        def timed(*args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(grid, name, timed)
    return spent


def time_discovery(num_clients: int) -> dict[str, float]:
    # Tiny generated data and model: discovery never touches them, the strategy just needs a model.
    config = resolve(
        {
            "dataset": "synthetic",
            "synthetic-train-size": num_clients,
            "synthetic-test-size": 10,
            "synthetic-shape": "1x4x4",
            "model": "mlp",
            "num-clients": num_clients,
        }
    )
    strategy = make_strategy(config)
    grid = LocalGrid(client_app, num_clients)
    in_grid = timed_grid(grid)
    t0 = time.perf_counter()
    discover_nodes(grid, strategy, 1, timeout=600.0)
    total = time.perf_counter() - t0
    if len(strategy.node_of) != num_clients:
        raise RuntimeError(f"discovery registered {len(strategy.node_of)} of {num_clients} nodes")
    return {"seconds": total, "grid_seconds": in_grid[0], "server_seconds": total - in_grid[0]}


def time_floor(num_clients: int) -> float:
    """Seconds of the same exchange with no server code: the nodes listed, the same queries
    created, carried by the grid to the real ClientApp and its replies back; no claim checked,
    no node registered, nothing counted."""
    grid = LocalGrid(client_app, num_clients)
    t0 = time.perf_counter()
    replies = grid.send_and_receive(discovery_queries(grid.get_node_ids(), 1), timeout=600.0)
    seconds = time.perf_counter() - t0
    if len(replies) != num_clients:
        raise RuntimeError(f"{len(replies)} replies from {num_clients} nodes")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "discovery.json")
    parser.add_argument("--note", default="", help="conditions of the run, written into the .md")
    args = parser.parse_args()
    rows = []
    for n in args.clients:
        runs, floors = [], []
        for _ in range(args.repeats):  # in turn, so that both see the same load
            runs.append(time_discovery(n))
            floors.append(time_floor(n))
        row = {"clients": n, **min(runs, key=lambda r: r["seconds"]), "floor_seconds": min(floors)}
        row.update(
            server_share=row["server_seconds"] / row["seconds"],
            over_floor_seconds=row["seconds"] - min(floors),
            us_per_node=1e6 * row["seconds"] / n,
            server_us_per_node=1e6 * row["server_seconds"] / n,
            all_seconds=[r["seconds"] for r in runs],
            all_server_seconds=[r["server_seconds"] for r in runs],
            all_floor_seconds=floors,
        )
        rows.append(row)
        print(
            f"{n:>6} clients: {row['seconds']:.3f} s (grid {row['grid_seconds']:.3f} s, server "
            f"{row['server_seconds']:.3f} s = {100 * row['server_share']:.0f}%), Flower floor "
            f"{row['floor_seconds']:.3f} s, {row['us_per_node']:.0f} us per node",
            flush=True,
        )
    result = {"command": command_line(), "machine": machine(), "repeats": args.repeats, "note": args.note, "rows": rows}
    lines = [
        "# Node discovery, in-process grid",
        "",
        f"`{result['command']}`",
        "",
        "| clients | discovery (s) | grid: transport + ClientApp (s) | server (s) | server share | "
        "Flower floor (s) | over the floor (s) | us per node |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['clients']:,} | {r['seconds']:.3f} | {r['grid_seconds']:.3f} | {r['server_seconds']:.3f} | "
        f"{100 * r['server_share']:.0f}% | {r['floor_seconds']:.3f} | {r['over_floor_seconds']:.3f} | "
        f"{r['us_per_node']:.0f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Discovery: the best of {args.repeats} runs each (grid and server are that run's split); "
        f"Flower floor: the best of {args.repeats} runs of the exchange without server code, each "
        f"run right after a discovery run. Machine: {result['machine']['cpus']} CPUs, load average "
        f"{result['machine']['load_average']}." + (f" {args.note}" if args.note else ""),
    ]
    write_outputs(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
