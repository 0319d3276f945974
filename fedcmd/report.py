"""A run's outputs: per-round metrics, volume rows, summary and plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _cell(value: Any) -> Any:
    """NaN (a round that was not evaluated, a loss not measured) is written as an empty cell."""
    return "" if isinstance(value, float) and math.isnan(value) else value


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(fh)]


def plot_run(out: Path, metrics: list[dict[str, Any]], title: str) -> None:
    rounds = [m["round"] for m in metrics]
    evaluated = [m for m in metrics if not math.isnan(m["accuracy"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot([m["round"] for m in evaluated], [100 * m["accuracy"] for m in evaluated],
                 marker="." if len(evaluated) <= 60 else None)
    axes[0].set(xlabel="round", ylabel="test accuracy (%)", title="accuracy")
    axes[1].plot(rounds, [m["mb_cumulative"] for m in metrics], marker="." if len(rounds) <= 60 else None)
    axes[1].set(xlabel="round", ylabel="MB (serialised, up + down)", title="cumulative volume")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "run.png", dpi=110)
    plt.close(fig)


def write_run_outputs(out: Path, config: dict[str, Any], strategy, metrics: list[dict[str, Any]],
                      fedavg_floats: float, wall_seconds: float) -> dict[str, Any]:
    acc = strategy.accountant
    acc.write_csv(out / "volume.csv")
    write_rows(out / "metrics.csv", metrics)
    rejections = [dict(round=r, client=pid, reason=why)
                  for r, log_ in sorted(strategy.rounds.items()) for pid, why in log_.rejected]
    write_rows(out / "rejections.csv", rejections or [dict(round="", client="", reason="")])
    totals = acc.direction_totals()
    floats = totals["floats_up"] + totals["floats_down"]
    trained = [m for m in metrics if m["round"] > 0]
    best = max((m for m in metrics if not math.isnan(m["accuracy"])), key=lambda m: m["accuracy"])
    summary = dict(
        strategy=config["strategy"], seed=config["seed"], data_seed=config["data-seed"],
        dataset=config["dataset"], partition=config["partition"], model=config["model"],
        num_clients=config["num-clients"], fraction_train=config["fraction-train"],
        num_parameters=int(strategy.weights.size), num_buffer_values=int(strategy.buffers.size),
        rounds=len(trained), final_accuracy=metrics[-1]["accuracy"], best_accuracy=best["accuracy"],
        best_round=best["round"],
        **{k: float(v) for k, v in totals.items()},
        fedavg_floats=fedavg_floats, volume_ratio=floats / fedavg_floats if fedavg_floats else math.nan,
        replies_rejected=len(rejections), wall_seconds=wall_seconds,
        round_seconds_mean=sum(m["round_seconds"] for m in trained) / max(len(trained), 1),
        strategy_seconds_mean=sum(m["strategy_seconds"] for m in trained) / max(len(trained), 1),
    )
    summary.update(strategy.summary_extra() if hasattr(strategy, "summary_extra") else {})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_run(out, metrics, f"{config['strategy']} / {config['model']} / {config['dataset']} (seed {config['seed']})")
    return summary
