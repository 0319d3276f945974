"""A run's outputs: per-round metrics, volume rows, summary and plots."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcmd.events import EVENTS_NAME  # noqa: E402

# Every file a run writes into its output folder (besides deploy/ for deployments, and the
# checkpoint's files: `fedcmd.checkpoint.checkpoint_files`).
RUN_OUTPUTS = (
    "config.toml",
    "partitions.csv",
    "metrics.csv",
    "volume.csv",
    "rejections.csv",
    "refusals.csv",
    EVENTS_NAME,
    "summary.json",
    "run.png",
)
REJECTION_COLUMNS = ("round", "client", "reason")
REFUSAL_COLUMNS = ("round", "node", "reason")  # nodes whose partition claim discovery refused


def _cell(value: Any) -> Any:
    """A value as a CSV cell: a figure not measured (None, NaN: e.g. accuracy in a round without
    evaluation) is an empty cell, which `read_rows` reads back as NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    os.replace(tmp, path)  # a reader (or an interrupt) never sees half a table


class RunTables:
    """metrics.csv, volume.csv, rejections.csv and refusals.csv, written as the run goes: an interrupted run
    leaves them readable and complete up to its last checkpointed round.

    `start` writes each file afresh from what the run holds (round 0, or a checkpoint's rounds when
    resuming: the rows of rounds done are kept, anything written past the checkpoint is dropped, so
    nothing is duplicated); `append_round` appends one round's rows. metrics.csv is rewritten
    instead when a row brings new columns (a strategy's figures appear from round 1 on).
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.columns: list[str] = []
        self.volume_rows = 0

    def start(self, metrics: list[dict[str, Any]], strategy) -> None:
        self.start_metrics(metrics)
        strategy.accountant.write_csv(self.out / "volume.csv")
        self.volume_rows = len(strategy.accountant.rows)
        for name, columns, rows in self._events(strategy, sorted(strategy.rounds)):
            with open(self.out / name, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(columns)
                writer.writerows(rows)

    def append_round(self, server_round: int, metrics: list[dict[str, Any]], strategy) -> None:
        row = metrics[-1]
        if any(key not in self.columns for key in row):
            self.start_metrics(metrics)
        else:
            with open(self.out / "metrics.csv", "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns).writerow({k: _cell(v) for k, v in row.items()})
        strategy.accountant.write_csv(self.out / "volume.csv", start=self.volume_rows)
        self.volume_rows = len(strategy.accountant.rows)
        for name, _, rows in self._events(strategy, [server_round]):
            with open(self.out / name, "a", newline="") as fh:
                csv.writer(fh).writerows(rows)

    @staticmethod
    def _events(strategy, rounds) -> list[tuple[str, tuple[str, ...], list[tuple]]]:
        return [
            ("rejections.csv", REJECTION_COLUMNS, _rejections(strategy, rounds)),
            ("refusals.csv", REFUSAL_COLUMNS, _refusals(strategy, rounds)),
        ]

    def start_metrics(self, metrics: list[dict[str, Any]]) -> None:
        write_rows(self.out / "metrics.csv", metrics)
        self.columns = list(dict.fromkeys(key for row in metrics for key in row))


def _rejections(strategy, rounds) -> list[tuple]:
    return [(r, pid, why) for r in rounds for pid, why in strategy.rounds[r].rejected]


def _refusals(strategy, rounds) -> list[tuple]:
    return [(r, node, why) for r in rounds for node, why in strategy.rounds[r].refused]


def read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(fh)
        ]


def plot_run(out: Path, metrics: list[dict[str, Any]], title: str) -> None:
    rounds = [m["round"] for m in metrics]
    evaluated = [m for m in metrics if not math.isnan(m["accuracy"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(
        [m["round"] for m in evaluated],
        [100 * m["accuracy"] for m in evaluated],
        marker="." if len(evaluated) <= 60 else None,
    )
    axes[0].set(xlabel="round", ylabel="test accuracy (%)", title="accuracy")
    axes[1].plot(rounds, [m["mb_cumulative"] for m in metrics], marker="." if len(rounds) <= 60 else None)
    axes[1].set(xlabel="round", ylabel="MB (serialised, up + down)", title="cumulative volume")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "run.png", dpi=110)
    plt.close(fig)


def write_summary(
    out: Path,
    config: dict[str, Any],
    strategy,
    metrics: list[dict[str, Any]],
    fedavg_floats: float,
    wall_seconds: float,
) -> dict[str, Any]:
    """summary.json and run.png of a finished run (its tables are written as it goes: RunTables)."""
    acc = strategy.accountant
    rejections = _rejections(strategy, sorted(strategy.rounds))
    totals = acc.direction_totals()
    floats = totals["floats_up"] + totals["floats_down"]
    trained = [m for m in metrics if m["round"] > 0]
    best = max((m for m in metrics if not math.isnan(m["accuracy"])), key=lambda m: m["accuracy"])
    summary = dict(
        strategy=config["strategy"],
        seed=config["seed"],
        data_seed=config["data-seed"],
        dataset=config["dataset"],
        partition=config["partition"],
        model=config["model"],
        num_clients=config["num-clients"],
        fraction_train=config["fraction-train"],
        num_parameters=int(strategy.weights.size),
        num_buffer_values=int(strategy.buffers.size),
        rounds=len(trained),
        final_accuracy=metrics[-1]["accuracy"],
        best_accuracy=best["accuracy"],
        best_round=best["round"],
        **{k: float(v) for k, v in totals.items()},
        fedavg_floats=fedavg_floats,
        volume_ratio=floats / fedavg_floats if fedavg_floats else math.nan,
        codec_up=config["codec-up"],
        codec_down=config["codec-down"],
        **{f"bits_per_value_{d}": v for d, v in acc.bits_per_value().items()},
        replies_rejected=len(rejections),
        nodes_refused=len(_refusals(strategy, sorted(strategy.rounds))),
        wall_seconds=wall_seconds,
        round_seconds_mean=sum(m["round_seconds"] for m in trained) / max(len(trained), 1),
        strategy_seconds_mean=sum(m["strategy_seconds"] for m in trained) / max(len(trained), 1),
    )
    summary.update(strategy.summary_extra() if hasattr(strategy, "summary_extra") else {})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_run(out, metrics, f"{config['strategy']} / {config['model']} / {config['dataset']} (seed {config['seed']})")
    return summary
