"""A SuperNode killed mid-run and restarted: the run goes on, and the node catches up (CMD).

    .venv/bin/python experiments/deploy/fault_tolerance.py --out runs/deploy/fault [--auth]

Deploys a federated CMD run (synthetic data, 3 SuperNodes, full participation) on loopback, kills
the SuperNode of partition 1 (SIGKILL) a few seconds into the round after `--kill-after`, and starts
it again when round `--back-after` ends. The restarted node has an empty coefficient store (a new
SuperNode process, and with --auth the same node id, without it a new one).

The deployment is then replayed in process (fedcmd's LocalGrid, same strategy and ClientApp code):
partition 1 never answers in the rounds the deployment rejected it for being away, and is
restarted with an empty state before the round in which the deployment first reached the new
node. The replay checks that every client, in every round, trains from exactly the server's
model, and the script checks that the deployed run's accuracies equal the replay's, round by round:
the deployed node caught up and holds the server's model.
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


def deploy_with_a_crash(config: dict, out: Path, *, auth: bool, kill_after: int, back_after: int,
                        kill_delay: float) -> tuple[dict, dict]:
    events: dict[str, float] = {}
    started = time.monotonic()
    with Deployment(out / "deploy", config["num-clients"], auth=auth) as deployment:
        deployment.start()

        def on_round(rnd: int) -> None:
            if rnd == kill_after:
                def kill() -> None:
                    deployment.kill_node(PARTITION)
                    events["killed_at_s"] = time.monotonic() - started
                threading.Timer(kill_delay, kill).start()  # mid-round: while the next round trains
            elif rnd == back_after:
                deployment.start_node(PARTITION)
                events["restarted_at_s"] = time.monotonic() - started

        summary = deployment.run(config, out, on_round=on_round, timeout=1800)
    return summary, events


def replay(config: dict, deployed: Path, out: Path) -> tuple[dict, float, list[tuple[int, int]]]:
    """The deployed run's failures, in process; returns (summary, largest client-server gap, failures)."""
    import clients.cmd as cmd_client
    import fedcmd.server as server
    from fedcmd.client_app import app as client_app
    from fedcmd.engine import LocalGrid, run_inprocess
    from strategies.cmd import CMD

    rejected = [(int(r["round"]), int(r["client"]), r["reason"]) for r in read_csv(deployed / "rejections.csv")
                if r["round"]]
    refused = [rnd for rnd, pid, why in rejected if pid == PARTITION and "store version" in why]
    away = {(rnd, pid) for rnd, pid, why in rejected if "store version" not in why}
    back_round = refused[0] if refused else None

    grid = LocalGrid(client_app, config["num-clients"],
                     fail=lambda rnd, pid, kind: kind == "train" and (rnd, pid) in away)
    sent, gaps = {}, []
    original_discover, original_configure, original_local = (server.discover_nodes, CMD.configure_train,
                                                             cmd_client.train_locally)

    def discover(grid_, strategy, rnd, timeout):
        if rnd == back_round:
            grid.restart(PARTITION)  # a new SuperNode: new id, empty coefficient store
        return original_discover(grid_, strategy, rnd, timeout)

    def configure(strategy, rnd, *args):
        sent[rnd] = strategy.weights.copy()
        return original_configure(strategy, rnd, *args)

    def train_locally(cfg, pid, weights, buffers, step_hook=None):
        gaps.append(float(np.abs(weights - sent[cfg["server-round"]]).max()))
        return original_local(cfg, pid, weights, buffers, step_hook)

    server.discover_nodes, CMD.configure_train, cmd_client.train_locally = discover, configure, train_locally
    try:
        summary = run_inprocess(config, out, progress=False, grid=grid)
    finally:
        server.discover_nodes, CMD.configure_train, cmd_client.train_locally = (original_discover, original_configure,
                                                                                original_local)
    return summary, max(gaps), sorted(away)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--auth", action="store_true", help="TLS and SuperNode authentication on")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kill-after", type=int, default=3)
    parser.add_argument("--back-after", type=int, default=4)
    parser.add_argument("--kill-delay", type=float, default=3.0, help="seconds into the next round")
    parser.add_argument("--round-timeout", type=float, default=60.0,
                        help="seconds a round waits for replies (a killed node is noticed after ~60 s)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config = resolve({"strategy": "cmd", "dataset": "synthetic", "synthetic-train-size": 600,
                      "synthetic-test-size": 200, "num-clients": 3, "num-server-rounds": args.rounds,
                      "batch-size": 16, "local-epochs": 1, "lr": 0.05, "momentum": 0.9,
                      "cmd-warmup": 2, "cmd-every": 1, "cmd-fraction": 0.2, "cmd-modes": 3, "cmd-samples": 200,
                      "round-timeout": args.round_timeout})
    deployed, events = deploy_with_a_crash(config, out / "deployed", auth=args.auth, kill_after=args.kill_after,
                                           back_after=args.back_after, kill_delay=args.kill_delay)
    replayed, gap, away = replay(config, out / "deployed", out / "replayed")
    acc = lambda run: [float(r["accuracy"]) for r in read_csv(out / run / "metrics.csv")]
    report = {
        "auth": args.auth, **events,
        "deployed_rejections": [(r["round"], r["client"], r["reason"][:120])
                                for r in read_csv(out / "deployed" / "rejections.csv") if r["round"]],
        "accepted_per_round": [int(r["accepted"]) for r in read_csv(out / "deployed" / "metrics.csv")][1:],
        "replayed_away": away,
        "deployed_accuracy": acc("deployed"), "replayed_accuracy": acc("replayed"),
        "accuracies_equal": acc("deployed") == acc("replayed"),
        "replay_max_client_server_gap": gap,
        "embedding_events": deployed.get("embedding_events"),
        "floats_equal": (deployed["floats_up"], deployed["floats_down"]) == (replayed["floats_up"],
                                                                             replayed["floats_down"]),
        "wall_seconds": deployed["wall_seconds"],
    }
    (out / "fault-report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = report["accuracies_equal"] and gap <= 1e-6 and any("store version" in r[2] for r in report["deployed_rejections"])
    print("[fedcmd] fault tolerance:", "OK" if ok else "NOT VERIFIED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
