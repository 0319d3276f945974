"""Simulation overhead: wall time of a federated run / wall time of the same SGD steps done plainly.

Both are run here, one after the other, in one invocation (absolute times drift on a shared
machine; the ratio is what to compare). "Plainly" means one process, no Flower: for every round
and every sampled client, the same local epochs over the same partition in the same batch order,
then the same sample-weighted average. The process uses every core (torch's default threads).

    python experiments/benchmarks/overhead.py experiments/fmnist_lenet5_fedavg.toml [--set k=v ...]
        [--engine ray|inprocess ...] [--out experiments/benchmarks/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedcmd import task
from fedcmd.config import load_config
from fedcmd.engine import run_inprocess, run_ray
from fedcmd.sampling import local_seed, sample_cohort
from fedcmd.training import evaluate, train


def plain_fedavg(config: dict) -> tuple[float, float]:
    """(seconds, final accuracy) of the run's SGD steps and averaging in one plain process."""
    start = time.perf_counter()
    model = task.new_model(config, seed=config["seed"])
    layout, _ = task.layouts(config)
    theta = layout.flatten(model)
    for rnd in range(1, config["num-server-rounds"] + 1):
        total, weight = np.zeros(theta.size), 0.0
        for pid in sample_cohort(config["num-clients"], config["fraction-train"], config["seed"], rnd):
            x, y = task.client_data(config, int(pid))
            layout.load(model, theta)
            train(
                model,
                x,
                y,
                epochs=config["local-epochs"],
                batch_size=config["batch-size"],
                lr=config["lr"],
                momentum=config["momentum"],
                weight_decay=config["weight-decay"],
                seed=local_seed(config["seed"], rnd, int(pid)),
            )
            total += len(y) * layout.flatten(model)
            weight += len(y)
        theta = (total / weight).astype(np.float32)
    layout.load(model, theta)
    data = task.dataset(config)
    return time.perf_counter() - start, evaluate(model, data.test_x, data.test_y)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--engine", action="append", choices=("ray", "inprocess"))
    parser.add_argument("--out", default="experiments/benchmarks/results/overhead.json")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    task.partitions(config)  # data decoding and partitioning are set-up, not training: keep them out of both
    plain_s, plain_acc = plain_fedavg(config)
    print(f"plain single process: {plain_s:.1f} s, final accuracy {plain_acc:.4f}", flush=True)
    result = dict(
        config=args.config,
        overrides=args.set,
        cpus=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        plain_seconds=plain_s,
        plain_final_accuracy=plain_acc,
        engines={},
    )
    for engine in args.engine or ["ray"]:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = (run_ray if engine == "ray" else run_inprocess)(config, out, progress=False)
            fl_s = time.perf_counter() - start
        result["engines"][engine] = dict(
            seconds=fl_s,
            ratio=fl_s / plain_s,
            final_accuracy=summary["final_accuracy"],
            round_seconds_mean=summary["round_seconds_mean"],
            strategy_seconds_mean=summary["strategy_seconds_mean"],
        )
        print(
            f"{engine}: {fl_s:.1f} s, ratio {fl_s / plain_s:.2f}, final accuracy {summary['final_accuracy']:.4f}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
