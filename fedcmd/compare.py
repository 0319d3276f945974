"""`fedcmd compare`: one table and four plots from finished runs, grouped by method over seeds.

A run is a folder `<method>-seed<k>/` holding `summary.json`, `metrics.csv` and `volume.csv` (what
`fedcmd run` writes); `<method>` is usually the strategy name. Volumes are ratios to the baseline
method's run with the same seed (same cohorts, same failures), from the measured volume rows: in
float32 equivalents of the payload (weights, buffers, references, coefficients, indices, masks)
and in serialised bytes (payload and metadata). The paper-style ratio a strategy reports itself
(`paper_volume_ratio` in its summary) sits next to them. Figures are mean ± sample standard
deviation (ddof 1) over seeds; plots show the mean and the min-max band.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcmd.report import read_rows

RUN_FILES = ("summary.json", "metrics.csv", "volume.csv")
RUN_NAME = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)$")
FRACTION_COLUMNS = ("frozen_fraction", "embedded_fraction")


class CompareError(ValueError):
    """Runs that cannot be compared: a missing file, no baseline, a seed without its baseline run."""


@dataclass
class Run:
    path: Path
    method: str
    seed: int
    summary: dict
    metrics: list[dict[str, float]]
    floats: float  # payload, float32 equivalents, both directions
    bytes_up: float  # serialised
    bytes_down: float
    floats_by_round: dict[int, float]  # payload floats moved in each round

    def to_target(self, target: float) -> tuple[int, float, float] | None:
        """(round, cumulative serialised bytes, cumulative floats) when the run's test accuracy
        first reached `target`; None if it never did. Only evaluated rounds count."""
        for m in self.metrics:
            if math.isfinite(m["accuracy"]) and m["accuracy"] >= target:
                rnd = int(m["round"])
                floats = sum(v for r, v in self.floats_by_round.items() if r <= rnd)
                return rnd, m["mb_cumulative"] * 1e6, floats
        return None

    @property
    def bytes(self) -> float:
        return self.bytes_up + self.bytes_down


def load_run(path: Path) -> Run:
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise CompareError(f"run folder {path} lacks {', '.join(missing)} (an unfinished or failed run?)")
    match = RUN_NAME.match(path.name)
    summary = json.loads((path / "summary.json").read_text())
    method = match["method"] if match else str(summary.get("strategy", path.name))
    seed = int(summary.get("seed", match["seed"] if match else 0))
    floats, up, down = 0.0, 0.0, 0.0
    by_round: dict[int, float] = defaultdict(float)
    with open(path / "volume.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            floats += float(row["floats"])
            by_round[int(row["round"])] += float(row["floats"])
            if row["direction"] == "up":
                up += float(row["wire_bytes"])
            else:
                down += float(row["wire_bytes"])
    metrics = read_rows(path / "metrics.csv")
    if not metrics:
        raise CompareError(f"{path / 'metrics.csv'} has no rows")
    return Run(path, method, seed, summary, metrics, floats, up, down, dict(by_round))


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Runs named on the command line: run folders, or folders holding `<method>-seed<k>/` run folders."""
    folders: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise CompareError(f"{given} is not a folder")
        if RUN_NAME.match(given.name) or any((given / name).exists() for name in RUN_FILES):
            folders.append(given)
            continue
        children = sorted(p for p in given.iterdir() if p.is_dir() and RUN_NAME.match(p.name))
        if not children:
            raise CompareError(f"{given} is neither a run folder nor holds any <method>-seed<k>/ run folder")
        folders += children
    runs = [load_run(folder) for folder in folders]
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        key = (run.method, run.seed)
        if key in seen and seen[key].resolve() != run.path.resolve():
            raise CompareError(f"two runs of {run.method} with seed {run.seed}: {seen[key]} and {run.path}")
        seen[key] = run.path
    return runs


def group(runs: list[Run], baseline: str) -> dict[str, list[Run]]:
    """Runs by method (baseline first, then in order of appearance), each checked against the baseline."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if all(r.path.resolve() != run.path.resolve() for r in groups[run.method]):
            groups[run.method].append(run)
    if baseline not in groups:
        raise CompareError(
            f"no run of the baseline method '{baseline}' among the runs given "
            f"(methods: {', '.join(groups)}); pass its run folders or choose --baseline"
        )
    base_seeds = {r.seed for r in groups[baseline]}
    for method, members in groups.items():
        lacking = sorted({r.seed for r in members} - base_seeds)
        if lacking:
            raise CompareError(f"baseline '{baseline}' has no run with seed {lacking[0]}, needed by {method}")
        members.sort(key=lambda r: r.seed)
    return {baseline: groups[baseline], **{m: g for m, g in groups.items() if m != baseline}}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def table_rows(groups: dict[str, list[Run]], baseline: str) -> list[dict[str, object]]:
    """One row per method: raw per-seed values of each column (rendering takes mean ± std)."""
    base = {r.seed: r for r in groups[baseline]}
    rows = []
    for method, runs in groups.items():
        paper = [
            100.0 if method == baseline else 100.0 * r.summary["paper_volume_ratio"]
            for r in runs
            if method == baseline or "paper_volume_ratio" in r.summary
        ]
        rows.append(
            {
                "method": method,
                "seeds": [r.seed for r in runs],
                "volume_floats": [100.0 * r.floats / base[r.seed].floats for r in runs],
                "volume_bytes": [100.0 * r.bytes / base[r.seed].bytes for r in runs],
                "volume_paper": paper,
                "mb_up": [r.bytes_up / 1e6 for r in runs],
                "mb_down": [r.bytes_down / 1e6 for r in runs],
                "final_accuracy": [100.0 * r.summary["final_accuracy"] for r in runs],
                "best_accuracy": [100.0 * r.summary["best_accuracy"] for r in runs],
                # payload bits per dense value (32: float32; a wire codec lowers it); – for runs before codecs
                "bits_up": [r.summary.get("bits_per_value_up", math.nan) for r in runs],
                "bits_down": [r.summary.get("bits_per_value_down", math.nan) for r in runs],
            }
        )
    return rows


def render(rows: list[dict[str, object]]) -> str:
    head = (
        "| method | seeds | volume % (floats) | volume % (bytes) | volume % (paper-style) | MB up | MB down "
        "| bits/value up | bits/value down | final accuracy % | best accuracy % |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        lines.append(
            f"| {row['method']} | {', '.join(map(str, row['seeds']))} | {fmt(row['volume_floats'])} "
            f"| {fmt(row['volume_bytes'])} | {fmt(row['volume_paper'])} | {fmt(row['mb_up'], 2)} "
            f"| {fmt(row['mb_down'], 2)} | {fmt(row['bits_up'], 2)} | {fmt(row['bits_down'], 2)} "
            f"| {fmt(row['final_accuracy'], 2)} | {fmt(row['best_accuracy'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def default_target(groups: dict[str, list[Run]], baseline: str) -> float:
    """The baseline's mean final accuracy minus half a point."""
    return float(np.mean([r.summary["final_accuracy"] for r in groups[baseline]])) - 0.005


def target_rows(groups: dict[str, list[Run]], baseline: str, target: float) -> list[dict[str, object]]:
    """Per method: the traffic each seed needed to first reach `target` (None: never reached)."""
    base = {r.seed: r.to_target(target) for r in groups[baseline]}
    rows = []
    for method, runs in groups.items():
        hits = {r.seed: r.to_target(target) for r in runs}
        reached = [h for h in hits.values() if h is not None]
        # A baseline that met the target before sending anything (round 0) gives no ratio.
        ratios = [
            100.0 * h[1] / base[seed][1]
            for seed, h in hits.items()
            if h is not None and base.get(seed) is not None and base[seed][1] > 0
        ]
        rows.append(
            {
                "method": method,
                "reached": len(reached),
                "seeds": len(runs),
                "round": [h[0] for h in reached],
                "mb": [h[1] / 1e6 for h in reached],
                "mfloats": [h[2] / 1e6 for h in reached],
                "bytes_pct": ratios,
            }
        )
    return rows


def render_target(rows: list[dict[str, object]], target: float, baseline: str) -> str:
    head = (
        f"| method | seeds reaching {100 * target:.2f}% | first round | MB to target | % of {baseline}'s bytes "
        "| M floats to target |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        if not row["reached"]:
            lines.append(
                f"| {row['method']} | 0 of {row['seeds']} | not reached | not reached | not reached | not reached |"
            )
            continue
        lines.append(
            f"| {row['method']} | {row['reached']} of {row['seeds']} | {fmt(row['round'], 0)} "
            f"| {fmt(row['mb'], 1)} | {fmt(row['bytes_pct'])} | {fmt(row['mfloats'], 2)} |"
        )
    return "\n".join(lines) + "\n"


# ----- plots ------------------------------------------------------------------------------------
def _curves(runs: list[Run], column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Rounds present in every run of the group and the (runs x rounds) values of `column`."""
    if not all(column in r.metrics[0] for r in runs):
        return None
    common = sorted(set.intersection(*({int(m["round"]) for m in r.metrics} for r in runs)))
    values = np.array([[next(m[column] for m in r.metrics if int(m["round"]) == k) for k in common] for r in runs])
    return np.array(common), values


def _band(ax, x, values, label, color) -> None:
    ax.plot(x, values.mean(axis=0), label=f"{label} (n={len(values)})", color=color, lw=1.6)
    if len(values) > 1:
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, lw=0)


def plot(groups: dict[str, list[Run]], out: Path, target: float | None = None) -> list[str]:
    """Write the comparison plots into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    written = []

    def figure(name, xlabel, ylabel, title, draw) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if not draw(ax):
            plt.close(fig)
            return
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if xlabel == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    def per_round(column, scale):
        def draw(ax):
            drawn = False
            for method, runs in groups.items():
                for col in (column,) if isinstance(column, str) else column:
                    curves = _curves(runs, col)
                    if curves is None:
                        continue
                    x, values = curves
                    keep = np.isfinite(values).all(axis=0)
                    if keep.any():
                        _band(ax, x[keep], scale * values[:, keep], method, colors[method])
                        drawn = True
                    break
            return drawn

        return draw

    def accuracy_vs_mb(ax):
        # Log x: methods differ by factors in traffic. The y-axis starts where the methods part
        # (a few points below the lowest final accuracy), not at the first round's 10%.
        finals, tops = [], []
        for method, runs in groups.items():
            rounds, acc = _curves(runs, "accuracy")
            _, mb = _curves(runs, "mb_cumulative")
            keep = np.isfinite(acc).all(axis=0) & (rounds > 0)
            _band(ax, mb.mean(axis=0)[keep], 100 * acc[:, keep], method, colors[method])
            finals.append(100 * acc[:, keep][:, -1].min())
            tops.append(100 * np.nanmax(acc))
        ax.set_xscale("log")
        if target is not None:
            ax.axhline(100 * target, color="grey", ls="--", lw=0.8, label=f"target {100 * target:.2f}%")
        ax.set_ylim(min(finals) - 4.0, max(tops) + 0.5)
        return True

    band = "mean over seeds, band: min-max"
    figure("accuracy_vs_round.png", "round", "test accuracy (%)", f"Accuracy ({band})", per_round("accuracy", 100.0))
    figure(
        "mb_vs_round.png",
        "round",
        "cumulative traffic (MB, serialised, up + down)",
        f"Communication volume ({band})",
        per_round("mb_cumulative", 1.0),
    )
    figure(
        "accuracy_vs_mb.png",
        "cumulative traffic (MB, serialised, up + down; mean over seeds; log scale)",
        "test accuracy (%)",
        f"Accuracy against traffic ({band})",
        accuracy_vs_mb,
    )
    figure(
        "fraction_vs_round.png",
        "round",
        "share of weights (%)",
        "Frozen (APF) or embedded (CMD) weights, per round",
        per_round(FRACTION_COLUMNS, 100.0),
    )
    return written


def compare(
    paths: list[str | Path], baseline: str = "fedavg", out: str | Path | None = None, target: float | None = None
) -> str:
    """Compare the runs under `paths`; writes comparison.md and plots into `out`, returns the Markdown.

    `target` (a fraction) is the accuracy whose traffic-to-reach the second table reports; by
    default the baseline's mean final accuracy minus 0.5 point.
    """
    runs = find_runs(paths)
    groups = group(runs, baseline)
    default = target is None
    target = default_target(groups, baseline) if default else target
    if out is None:
        parents = {r.path.resolve().parent for r in runs}
        out = parents.pop() if len(parents) == 1 else Path.cwd()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(groups, baseline)
    images = plot(groups, out, target)
    first = next(iter(groups.values()))[0].summary
    text = "\n".join(
        [
            "# Comparison",
            "",
            f"{first.get('model', '?')} on {first.get('dataset', '?')}, {first.get('num_clients', '?')} clients, "
            f"fraction {first.get('fraction_train', '?')}, {first.get('rounds', '?')} rounds. "
            f"Baseline: {baseline}. Mean ± sample std over seeds.",
            "",
            render(rows),
            f"- volume % (floats): payload float32 equivalents (weights, buffers, references, coefficients, indices, "
            f"masks), up + down, over {baseline}'s with the same seed.",
            f"- volume % (bytes): serialised bytes, payload and metadata, up + down, over {baseline}'s with the same seed.",
            "- volume % (paper-style): the strategy's own count (`paper_volume_ratio`), which leaves out masks, "
            "catch-up and metadata; – where the strategy has none.",
            "- MB: serialised, 10^6 bytes, all rounds. Accuracy: central test set, final and best round.",
            "- bits/value: encoded bytes x 8 of the dense payloads (weights, references, buffers) per value they carry "
            "(32: float32; lower under a wire codec); – for runs that predate the codecs.",
            "",
            f"Traffic to first reach {100 * target:.2f}% test accuracy"
            + (f" ({baseline}'s mean final accuracy minus 0.5 point)" if default else "")
            + ":",
            "",
            render_target(target_rows(groups, baseline, target), target, baseline),
            f"- Only evaluated rounds count (`eval-every`); MB and floats are cumulative up to and including that "
            f"round; % of {baseline}'s bytes pairs runs of the same seed where both reached the target.",
            "",
            *[f"![{name}]({name})" for name in images],
            "",
            "Runs: " + ", ".join(str(r.path) for g in groups.values() for r in g),
            "",
        ]
    )
    (out / "comparison.md").write_text(text)
    return text
