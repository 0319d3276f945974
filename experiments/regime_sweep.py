"""The regime sweep: local work per round from 10 steps to one epoch at one compute budget.

    nice -n 10 python experiments/regime_sweep.py                       # every point, seed 0
    python experiments/regime_sweep.py --points 120 --seeds 0 1 2       # one point, three seeds
    python experiments/regime_sweep.py --plot-only                      # table and plot from what exists

Every point is the APF-regime setting (`experiments/table3/apf-regime/`: 5 clients, batch 100, Adam
with its state kept, all four methods) with the same budget of 4,000 local steps per client, spent
as `steps` per round for 4,000 / steps rounds. What is counted in steps in that setting keeps its
meaning in steps at every point: APF checks stability every 50 local steps (Fc = 50, at least once
a round); CMD warms up for 1,000 steps and embeds every 100 steps (at least once a round); the test
set is evaluated about 40 times per run. The 10-step point is the APF-regime runs themselves
(`experiments/results/apf-regime/`), not rerun. Each point's runs go to
`experiments/results/regime-sweep/steps-<k>/<method>-seed<s>/` with its `fedcmd compare` table; the
sweep's table and plot (volume ratio and bytes to FedAvg's target accuracy against local steps per
round) go to `experiments/results/regime-sweep/`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUDGET = 4000  # local steps per client, every point
POINTS = (10, 30, 60, 120)  # 120 steps of batch 100 = one epoch of a 12,000-sample partition
METHODS = ("fedavg", "cmd", "apf", "a-apf")


def point_settings(steps: int) -> dict[str, int]:
    rounds = round(BUDGET / steps)
    return {
        "local-steps": steps,
        "num-server-rounds": rounds,
        "eval-every": max(1, round(rounds / 40)),
        "apf-check-every": max(1, round(50 / steps)),
        "cmd-warmup": max(1, round(1000 / steps)),
        "cmd-every": max(1, round(100 / steps)),
    }


def point_folder(steps: int) -> Path:
    return RESULTS / "apf-regime" if steps == 10 else RESULTS / "regime-sweep" / f"steps-{steps}"


def run_point(steps: int, seeds: list[int], methods: list[str]) -> int:
    settings = point_settings(steps)
    command = [
        sys.executable,
        str(HERE / "table3" / "run.py"),
        "--variant",
        "apf-regime",
        "--out",
        str(point_folder(steps)),
        "--seeds",
        *map(str, seeds),
        "--methods",
        *methods,
    ]
    if steps != 10:  # the 10-step point is the APF-regime setting as it stands
        for key, value in settings.items():
            command += ["--set", f"{key}={value}"]
    print("[sweep] " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def collect() -> list[dict]:
    """Per point and method: volume ratios and bytes to FedAvg's target, per seed."""
    from fedcmd.compare import default_target, find_runs, group

    rows = []
    for steps in POINTS:
        folder = point_folder(steps)
        if not folder.is_dir():
            continue
        finished = [p for p in sorted(folder.iterdir()) if (p / "summary.json").is_file()]  # not runs under way
        runs = [r for r in find_runs(finished) if r.method in METHODS] if finished else []
        try:
            groups = group(runs, "fedavg")
        except Exception as err:  # a point whose baseline has not run yet
            print(f"[sweep] steps {steps}: skipped ({err})")
            continue
        target = default_target(groups, "fedavg")
        base = {r.seed: r for r in groups["fedavg"]}
        for method, members in groups.items():
            hits = {r.seed: r.to_target(target) for r in members}
            base_hits = {s: base[s].to_target(target) for s in hits}
            rows.append(
                {
                    "steps": steps,
                    "method": method,
                    "seeds": [r.seed for r in members],
                    "volume_bytes_pct": [100 * r.bytes / base[r.seed].bytes for r in members],
                    "volume_floats_pct": [100 * r.floats / base[r.seed].floats for r in members],
                    "final_accuracy_pct": [100 * r.summary["final_accuracy"] for r in members],
                    "target_pct": 100 * target,
                    "bytes_to_target_pct": [
                        100 * hits[s][1] / base_hits[s][1] if hits[s] and base_hits[s] else None for s in hits
                    ],
                    "mb_to_target": [hits[s][1] / 1e6 if hits[s] else None for s in hits],
                }
            )
    return rows


def mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def report(rows: list[dict]) -> str:
    lines = [
        "| local steps per round | method | seeds | volume % (bytes) | volume % (floats) | final accuracy % "
        "| bytes to target, % of FedAvg's | MB to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reached = [v for v in r["mb_to_target"] if v is not None]
        to_target = (
            f"{mean(r['bytes_to_target_pct']):.1f} ({len(reached)} of {len(r['seeds'])} reached "
            f"{r['target_pct']:.2f}%) | {mean(reached):.1f}"
            if reached
            else f"not reached ({r['target_pct']:.2f}%) | not reached"
        )
        lines.append(
            f"| {r['steps']} | {r['method']} | {', '.join(map(str, r['seeds']))} "
            f"| {mean(r['volume_bytes_pct']):.1f} | {mean(r['volume_floats_pct']):.1f} "
            f"| {mean(r['final_accuracy_pct']):.2f} | {to_target} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        x = [r["steps"] for r in mine]
        axes[0].plot(x, [mean(r["volume_bytes_pct"]) for r in mine], marker="o", label=method)
        axes[1].plot(x, [mean(r["bytes_to_target_pct"]) for r in mine], marker="o", label=method)
    axes[0].set(
        xscale="log",
        xlabel="local steps per round (log)",
        ylabel="bytes, % of FedAvg's (whole run)",
        title="Volume ratio at a budget of 4,000 local steps per client",
    )
    axes[1].set(
        xscale="log",
        xlabel="local steps per round (log)",
        ylabel="bytes to target, % of FedAvg's",
        title="Traffic to reach FedAvg's final accuracy - 0.5 pt",
    )
    for ax in axes:
        ax.set_xticks(list(POINTS), [str(p) for p in POINTS])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "regime_sweep.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", nargs="+", type=int, default=list(POINTS), choices=POINTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.plot_only:
        for steps in args.points:
            if run_point(steps, args.seeds, args.methods) != 0:
                return 1
    out = RESULTS / "regime-sweep"
    out.mkdir(parents=True, exist_ok=True)
    rows = collect()
    text = report(rows)
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out)
    print(text + f"[sweep] table: {out / 'sweep.md'}; plot: {out / 'regime_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
