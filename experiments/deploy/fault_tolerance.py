"""A SuperNode killed mid-run and restarted: the run goes on, and the node catches up (CMD).

    .venv/bin/python experiments/deploy/fault_tolerance.py --out runs/deploy/fault [--auth]

Deploys a federated CMD run (synthetic data, 3 SuperNodes, full participation) on loopback, kills
the SuperNode of partition 1 (SIGKILL) a few seconds into the round after `--kill-after`, and starts
it again when round `--back-after` ends (or `--back-delay` seconds after the kill). The restarted
node has an empty coefficient store (a new SuperNode process; with --auth it keeps its node id,
without it gets a new one).

The deployment is then replayed in process (fedcmd's LocalGrid, same strategy and ClientApp code)
with the failures the deployment recorded for partition 1 (see `replay`). The replay checks that
every client, in every round, trains from exactly the server's model; the script checks that the
deployed run's accuracies and float counts equal the replay's and that the node is accepted again
at the end: the deployed node caught up and holds the server's model.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fedcmd.config import resolve
from fedcmd.deploy import Deployment

PARTITION = 1


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def deploy_with_a_crash(
    config: dict,
    out: Path,
    *,
    auth: bool,
    kill_after: int,
    back_after: int | None,
    kill_delay: float,
    back_delay: float | None,
) -> tuple[dict, dict]:
    events: dict[str, float] = {}
    started = time.monotonic()
    with Deployment(out / "deploy", config["num-clients"], auth=auth) as deployment:
        deployment.start()

        def restart() -> None:
            deployment.start_node(PARTITION)
            events["restarted_at_s"] = time.monotonic() - started

        def kill() -> None:
            deployment.kill_node(PARTITION)
            events["killed_at_s"] = time.monotonic() - started
            if back_delay is not None:
                threading.Timer(back_delay, restart).start()

        def on_round(rnd: int) -> None:
            if rnd == kill_after:
                threading.Timer(kill_delay, kill).start()  # mid-round: while the next round trains
            elif rnd == back_after and back_delay is None:
                restart()

        summary = deployment.run(config, out, on_round=on_round, timeout=1800)
    return summary, events


def replay(config: dict, deployed: Path, out: Path) -> tuple[dict, float, dict]:
    """The deployed run's failures, in process; returns (summary, largest client-server gap, the failures).

    From the deployment's rejections of partition 1: rounds it was `unreachable` (the SuperLink no
    longer listed the node) -> offline; rounds without a reply -> silent; the first round after
    those in which it was reached again -> restarted before that round: with the same node id and an
    empty store if it then refused its delta (the server never saw it leave), else as a new node.
    """
    import clients.cmd as cmd_client
    import fedcmd.server as server
    from fedcmd.client_app import app as client_app
    from fedcmd.engine import LocalGrid, run_inprocess
    from strategies.cmd import CMD

    mine = {
        int(r["round"]): r["reason"]
        for r in read_csv(deployed / "rejections.csv")
        if r["round"] and int(r["client"]) == PARTITION
    }
    offline = {rnd for rnd, why in mine.items() if why.startswith("unreachable")}
    silent = {rnd for rnd, why in mine.items() if rnd not in offline and "store version" not in why}
    away = offline | silent
    back = (
        next((rnd for rnd in range(min(away) + 1, config["num-server-rounds"] + 1) if rnd not in away), None)
        if away
        else None
    )
    same_id = back is not None and "store version" in mine.get(back, "")
    failures = {
        "offline": sorted(offline),
        "silent": sorted(silent),
        "back": back,
        "back_as": "same node id, empty store (refused its delta)" if same_id else "new node",
    }

    grid = LocalGrid(
        client_app,
        config["num-clients"],
        fail=lambda rnd, pid, kind: kind == "train" and pid == PARTITION and rnd in silent,
    )
    sent, gaps = {}, []
    original_discover, original_configure, original_local = (
        server.discover_nodes,
        CMD.configure_train,
        cmd_client.train_locally,
    )

    def discover(grid_, strategy, rnd, timeout):
        grid.offline = {PARTITION} if rnd in offline else set()
        if rnd == back:
            if same_id:
                grid.contexts[grid.node_of(PARTITION)].state.pop(cmd_client.STORE_KEY, None)
            else:
                grid.restart(PARTITION)
        return original_discover(grid_, strategy, rnd, timeout)

    def configure(strategy, rnd, *args):
        sent[rnd] = strategy.weights.copy()
        return original_configure(strategy, rnd, *args)

    def train_locally(cfg, pid, weights, buffers, step_hook=None, **kwargs):
        gaps.append(float(np.abs(weights - sent[cfg["server-round"]]).max()))
        return original_local(cfg, pid, weights, buffers, step_hook, **kwargs)

    server.discover_nodes, CMD.configure_train, cmd_client.train_locally = discover, configure, train_locally
    try:
        summary = run_inprocess(config, out, progress=False, grid=grid)
    finally:
        server.discover_nodes, CMD.configure_train, cmd_client.train_locally = (
            original_discover,
            original_configure,
            original_local,
        )
    return summary, max(gaps), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--auth", action="store_true", help="TLS and SuperNode authentication on")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kill-after", type=int, default=3)
    parser.add_argument("--back-after", type=int, default=4)
    parser.add_argument("--kill-delay", type=float, default=3.0, help="seconds into the next round")
    parser.add_argument(
        "--back-delay",
        type=float,
        help="restart this many seconds after the kill instead of after round --back-after: "
        "before the SuperLink notices the node is gone (with --auth it keeps its id)",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=60.0,
        help="seconds a round waits for replies (a killed node is noticed after ~60 s)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config = resolve(
        {
            "strategy": "cmd",
            "dataset": "synthetic",
            "synthetic-train-size": 600,
            "synthetic-test-size": 200,
            "num-clients": 3,
            "num-server-rounds": args.rounds,
            "batch-size": 16,
            "local-epochs": 1,
            "lr": 0.05,
            "momentum": 0.9,
            "cmd-warmup": 2,
            "cmd-every": 1,
            "cmd-fraction": 0.2,
            "cmd-modes": 3,
            "cmd-samples": 200,
            "round-timeout": args.round_timeout,
        }
    )
    deployed, events = deploy_with_a_crash(
        config,
        out / "deployed",
        auth=args.auth,
        kill_after=args.kill_after,
        back_after=args.back_after,
        kill_delay=args.kill_delay,
        back_delay=args.back_delay,
    )
    replayed, gap, failures = replay(config, out / "deployed", out / "replayed")
    acc = lambda run: [float(r["accuracy"]) for r in read_csv(out / run / "metrics.csv")]
    accepted = [int(r["accepted"]) for r in read_csv(out / "deployed" / "metrics.csv")][1:]
    totals = lambda s: {k: s[k] for k in ("floats_up", "floats_down", "bytes_up", "bytes_down")}
    report = {
        "auth": args.auth,
        **events,
        "deployed_rejections": [
            (r["round"], r["client"], r["reason"][:120])
            for r in read_csv(out / "deployed" / "rejections.csv")
            if r["round"]
        ],
        "accepted_per_round": accepted,
        "failures_replayed": failures,
        "deployed_accuracy": acc("deployed"),
        "replayed_accuracy": acc("replayed"),
        "accuracies_equal": acc("deployed") == acc("replayed"),
        "replay_max_client_server_gap": gap,
        "embedding_events": deployed.get("embedding_events"),
        "deployed_totals": totals(deployed),
        "replayed_totals": totals(replayed),
        "floats_equal": all(deployed[k] == replayed[k] for k in ("floats_up", "floats_down")),
        "wall_seconds": deployed["wall_seconds"],
    }
    (out / "fault-report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    came_back = failures["back"] is not None and accepted[-1] == config["num-clients"]
    ok = came_back and report["accuracies_equal"] and report["floats_equal"] and gap <= 1e-6
    print("[fedcmd] fault tolerance:", "OK" if ok else "NOT VERIFIED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
