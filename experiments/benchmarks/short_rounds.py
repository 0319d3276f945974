"""Short rounds: how much of a round is spent outside the clients' optimizer steps.

    python experiments/benchmarks/short_rounds.py                    # in process and on Ray
    python experiments/benchmarks/short_rounds.py --engine inprocess --rounds 30

10 clients x 10 local Adam steps of batch 100 on LeNet-5 / Fashion-MNIST, every client in every
round, central evaluation every 10 rounds (`eval-every = 10`). Each client reports the seconds its
optimizer steps took (`train-seconds`, forward + backward + step + the strategy's step hook); the
share outside them is 1 - (sum of those seconds) / (sum of round seconds), rounds 2..R (round 1 pays
one-off imports). A round's seconds cover discovery, building and serialising the messages, the
clients (loading the model, training, building replies), aggregation, accounting, evaluation and
the checkpoint. On Ray clients run side by side in worker processes, so the client seconds are also
divided by the number of workers busy at once to give the share of wall time. Ray starts its
worker processes at niceness 15: on a machine busy with other work they get the leftovers, so
measure Ray on an otherwise idle machine. Results go to experiments/benchmarks/results/short_rounds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fedcmd.config import resolve
from fedcmd.engine import run_inprocess, run_ray
from fedcmd.report import read_rows

PARTS = ("clients_seconds", "client_train_seconds", "strategy_seconds", "eval_seconds", "checkpoint_seconds")


def config_for(strategy: str, rounds: int) -> dict:
    return resolve(
        {
            "strategy": strategy,
            "num-server-rounds": rounds,
            "num-clients": 10,
            "local-steps": 10,
            "batch-size": 100,
            "optimizer": "adam",
            "lr": 0.001,
            "weight-decay": 0.01,
            "optimizer-state": "keep",
            "eval-every": 10,
            "dataset": "fashion-mnist",
            "model": "lenet5",
            "apf-check-every": 5,
            "cmd-warmup": 5,
            "cmd-every": 5,
        }
    )


def measure(strategy: str, engine: str, rounds: int) -> dict:
    config = config_for(strategy, rounds)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        (run_ray if engine == "ray" else run_inprocess)(config, out, progress=False)
        wall = time.perf_counter() - start
        rows = [r for r in read_rows(Path(out) / "metrics.csv") if r["round"] >= 2]
    total = {k: sum(r.get(k, 0.0) for r in rows) for k in ("round_seconds", *PARTS)}
    workers = min(os.cpu_count() or 1, config["num-clients"]) if engine == "ray" else 1
    outside = 1.0 - total["client_train_seconds"] / total["round_seconds"]
    outside_wall = 1.0 - total["client_train_seconds"] / workers / total["round_seconds"]
    other = (
        total["round_seconds"]
        - total["clients_seconds"]
        - total["strategy_seconds"]
        - total["eval_seconds"]
        - total["checkpoint_seconds"]
    )
    per_round = {k: v / len(rows) for k, v in total.items()}
    per_round["clients_outside_steps_seconds"] = (
        total["clients_seconds"] - total["client_train_seconds"] / workers
    ) / len(rows)
    per_round["discovery_and_bookkeeping_seconds"] = other / len(rows)
    return {
        "strategy": strategy,
        "engine": engine,
        "rounds_measured": len(rows),
        "run_wall_seconds": wall,
        "share_outside_optimizer_steps": outside,
        "share_outside_optimizer_steps_per_worker": outside_wall,
        "parallel_workers": workers,
        "per_round_seconds": per_round,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="append", choices=("inprocess", "ray"))
    parser.add_argument("--strategy", action="append", choices=("fedavg", "cmd", "apf", "a-apf"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default="experiments/benchmarks/results/short_rounds.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # measurements are merged into the file by (engine, strategy), so engines can be measured apart
    results = json.loads(out.read_text())["results"] if out.is_file() else []
    for engine in args.engine or ["inprocess", "ray"]:
        for strategy in args.strategy or ["fedavg", "apf"]:
            result = measure(strategy, engine, args.rounds)
            result["load_average_after"] = os.getloadavg()
            results = [r for r in results if (r["engine"], r["strategy"]) != (engine, strategy)] + [result]
            out.write_text(
                json.dumps(
                    {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "results": results,
                    },
                    indent=2,
                )
                + "\n"
            )
            per = result["per_round_seconds"]
            print(
                f"{engine:9s} {strategy:6s}: round {per['round_seconds']:.3f} s, optimizer steps "
                f"{per['client_train_seconds']:.3f} s (summed over clients), outside them "
                f"{100 * result['share_outside_optimizer_steps']:.1f}%"
                + (
                    f" ({100 * result['share_outside_optimizer_steps_per_worker']:.1f}% of wall time with "
                    f"{result['parallel_workers']} workers)"
                    if engine == "ray"
                    else ""
                )
                + "; per round: "
                + ", ".join(f"{k} {v:.3f}" for k, v in per.items() if k != "round_seconds"),
                flush=True,
            )
    print(f"written {out}")


if __name__ == "__main__":
    main()
