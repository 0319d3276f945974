"""CMD server overhead (issue 7): the CMD strategy's time per round against the round's wall time.

Each case is a federated CMD run with the in-process engine (`fedcmd.engine.run_inprocess`):
- lenet5: experiments/fmnist_lenet5_cmd.toml (Fashion-MNIST, LeNet-5, 61,706 parameters, 10 clients,
  all sampled), 12 rounds, cmd-warmup 5.
- resnet18: the same CMD settings on ResNet-18 (11,173,962 parameters) over generated 3x32x32 data
  (dataset synthetic, 16 images per client, 32 test images, batch 16): the data are tiny so that the
  costs that grow with the number of parameters show.

Per round: `strategy_seconds` and `round_seconds` as fedcmd.server writes them to metrics.csv
(strategy = configure_train + aggregate_train), their ratio (target <= 2%), and the strategy time
split into its components by timers wrapped around the library's calls (monkeypatched here, no
library edit): train_content (of which encode_events, vector_record), accountant (of which
wire_size), parse_reply, aggregate (weighted_mean, advance_cmd: online_observe, online_fit,
schedule_step, refresh_layout, rebuild_embedded), global_arrays. Each figure is self time: the
components add up to the strategy time. Also the checkpoint write per round (seconds, bytes):
fedcmd.server writes it after taking round_seconds, so it is in neither figure; the tables also give
the ratio against round + checkpoint, and what the checkpoint is made of.

    .venv/bin/python experiments/benchmarks/cmd_server_overhead.py [--quick] [--case lenet5] [--case resnet18]
        [--rounds 12] [--warmup 5] [--set key=value ...] [--cprofile]
        [--out experiments/benchmarks/results/cmd_server_overhead.json]   (also writes .md and .png beside it)

--quick: 3 rounds, cmd-warmup 1 (so one embedding event is sent), 4 clients on 400 generated images;
the cases become LeNet-5 and the 50,890-parameter MLP (a smoke run, seconds; written to *_quick.*).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
from benchtools import PhaseTimers, command_line, default_out, machine, mb, wrap_cmd_strategy, write_outputs

import clients.cmd
import fedcmd.accountant
import fedcmd.engine
import fedcmd.server
from fedcmd.checkpoint import split_arrays
from fedcmd.config import load_config
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.report import read_rows
from fedcmd.server import CentralEvaluator
from strategies.cmd import CMD

REPO = Path(__file__).resolve().parents[2]
LENET5_CONFIG = REPO / "experiments" / "fmnist_lenet5_cmd.toml"
CASES = {
    "lenet5": (LENET5_CONFIG, []),
    "resnet18": (
        LENET5_CONFIG,
        [
            "dataset=synthetic",
            "synthetic-shape=3x32x32",
            "synthetic-train-size=160",
            "synthetic-test-size=32",
            "batch-size=16",
            "model=resnet18",
        ],
    ),
}
QUICK_SET = [
    "dataset=synthetic",
    "synthetic-train-size=400",
    "synthetic-test-size=100",
    "num-clients=4",
    "cmd-samples=200",
]
QUICK_CASES = {
    "lenet5-quick": (LENET5_CONFIG, QUICK_SET),
    "mlp-quick": (LENET5_CONFIG, [*QUICK_SET, "model=mlp"]),
}
# The server loop's calls: their inclusive times partition a round (plus untimed glue).
LOOP = ("discover", "configure_train", "send_and_receive", "aggregate_train", "evaluate", "checkpoint")
STRATEGY_ROOTS = ("configure_train", "aggregate_train")
COMPONENTS = (
    "train_content",
    "encode_events",
    "vector_record",
    "accountant",
    "wire_size",
    "parse_reply",
    "aggregate",
    "weighted_mean",
    "advance_cmd",
    "online_observe",
    "online_fit",
    "schedule_step",
    "refresh_layout",
    "rebuild_embedded",
    "global_arrays",
    "configure_train",
    "aggregate_train",
)


class Probe:
    """Timers around the server loop, the CMD strategy and the in-process clients, for one run."""

    def __init__(self) -> None:
        self.timers = PhaseTimers()
        self.checkpoint_bytes: dict[int, int] = {}
        self.strategy: CMD | None = None

    def install(self) -> None:
        t = self.timers
        t.wrap(fedcmd.server, "discover_nodes", "discover", before=lambda args, kw: setattr(t, "round", int(args[2])))
        t.wrap(fedcmd.server, "make_strategy", after=lambda result, *_: setattr(self, "strategy", result))
        t.wrap(
            fedcmd.server,
            "save_checkpoint",
            "checkpoint",
            after=lambda paths, *_: self.checkpoint_bytes.__setitem__(t.round, sum(map(os.path.getsize, paths))),
        )
        t.wrap(CentralEvaluator, "__call__", "evaluate")
        t.wrap(LocalGrid, "send_and_receive")
        t.wrap(fedcmd.engine, "_wire", "serialise")
        t.wrap(clients.cmd, "train", "client_train")
        wrap_cmd_strategy(t)


def checkpoint_parts(strategy: CMD) -> dict[str, int]:
    """Bytes of the strategy's checkpointed parts (what every per-round checkpoint rewrites): their
    arrays and their JSON."""
    sizes = {}
    for name, part in strategy.state_dict().items():
        tree, arrays = split_arrays(part)
        sizes[name] = len(json.dumps(tree)) + sum(a.nbytes for a in arrays.values())
    sizes["whole strategy"] = sum(sizes.values())
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def run_case(name: str, config: dict, cprofile_path: Path | None) -> dict:
    probe = Probe()
    probe.install()
    profiler = cProfile.Profile() if cprofile_path else None
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            summary = run_inprocess(config, out, progress=True)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - start
            metrics = read_rows(Path(out) / "metrics.csv")
    finally:
        probe.timers.restore()
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        cprofile_path.write_text(text.getvalue())
    strategy, timers = probe.strategy, probe.timers
    rows = []
    for m in metrics[1:]:
        rnd = int(m["round"])
        parts = timers.self_seconds(rnd, STRATEGY_ROOTS)
        loop = {label: timers.inclusive(rnd, label) for label in LOOP}
        checkpoint = loop["checkpoint"]
        phase = (
            "fit"
            if timers.inclusive(rnd, "online_fit") > 0
            else "event"
            if rnd in strategy.event_rounds
            else "warm-up"
            if rnd < config["cmd-warmup"]
            else "cmd, no event"
        )
        rows.append(
            dict(
                round=rnd,
                phase=phase,
                round_seconds=m["round_seconds"],
                strategy_seconds=m["strategy_seconds"],
                ratio=m["strategy_seconds"] / m["round_seconds"],
                checkpoint_seconds=checkpoint,
                checkpoint_bytes=probe.checkpoint_bytes.get(rnd, 0),
                ratio_with_checkpoint=m["strategy_seconds"] / (m["round_seconds"] + checkpoint),
                embedded_fraction=m.get("embedded_fraction", float("nan")),
                loop_seconds=loop,
                client_train_seconds=timers.inclusive(rnd, "client_train"),
                serialise_seconds=timers.inclusive(rnd, "serialise"),
                strategy_components=parts,
            )
        )
    strategy_s = sum(r["strategy_seconds"] for r in rows)
    round_s = sum(r["round_seconds"] for r in rows)
    checkpoint_s = sum(r["checkpoint_seconds"] for r in rows)
    not_fit = [r for r in rows if r["phase"] != "fit"]
    components: dict[str, float] = {}
    for r in rows:
        for label, seconds in r["strategy_components"].items():
            components[label] = components.get(label, 0.0) + seconds / len(rows)
    result = dict(
        case=name,
        config=config,
        num_parameters=int(strategy.weights.size),
        num_buffer_values=int(strategy.buffers.size),
        wall_seconds=wall,
        final_accuracy=summary["final_accuracy"],
        embedded_fraction=summary.get("embedded_fraction"),
        strategy_seconds_mean=strategy_s / len(rows),
        round_seconds_mean=round_s / len(rows),
        checkpoint_seconds_mean=checkpoint_s / len(rows),
        ratio_of_means=strategy_s / round_s,
        ratio_mean=float(np.mean([r["ratio"] for r in rows])),
        ratio_max=max(r["ratio"] for r in rows),
        ratio_max_round=max(rows, key=lambda r: r["ratio"])["round"],
        ratio_of_means_without_fit=(
            sum(r["strategy_seconds"] for r in not_fit) / sum(r["round_seconds"] for r in not_fit)
        )
        if not_fit
        else float("nan"),
        ratio_with_checkpoint=strategy_s / (round_s + checkpoint_s),
        checkpoint_share_of_loop=checkpoint_s / (round_s + checkpoint_s),
        target_ratio=0.02,
        meets_target=strategy_s / round_s <= 0.02,
        strategy_components_mean=dict(sorted(components.items(), key=lambda kv: -kv[1])),
        checkpoint_parts_bytes=checkpoint_parts(strategy),
        rounds=rows,
    )
    print(
        f"[{name}] strategy {result['strategy_seconds_mean']:.3f} s / round {result['round_seconds_mean']:.2f} s "
        f"= {result['ratio_of_means']:.2%} (max {result['ratio_max']:.2%} in round {result['ratio_max_round']}); "
        f"checkpoint {result['checkpoint_seconds_mean']:.3f} s/round",
        flush=True,
    )
    return result


def markdown(result: dict) -> str:
    lines = [
        "# CMD server overhead",
        "",
        f"Machine: {result['machine']['cpus']} cores, load average {result['machine']['load_average']} at start "
        "(shared: absolute seconds drift, ratios within a run are what to compare). "
        f"Command: `{result['command']}`.",
        "",
        "Strategy time = configure_train + aggregate_train (metrics.csv `strategy_seconds`); round = "
        "`round_seconds` (discovery, strategy, clients, central evaluation); the checkpoint is written after "
        "`round_seconds` is taken, so it is in neither.",
        "",
        "| case | parameters | strategy s/round | round s/round | strategy / round | max (round) "
        "| without fit round "
        "| checkpoint s/round | strategy / (round + checkpoint) | target <= 2% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        lines.append(
            f"| {c['case']} | {c['num_parameters']:,} | {c['strategy_seconds_mean']:.3f} | "
            f"{c['round_seconds_mean']:.2f} | {c['ratio_of_means']:.2%} | {c['ratio_max']:.2%} "
            f"({c['ratio_max_round']}) | {c['ratio_of_means_without_fit']:.2%} | "
            f"{c['checkpoint_seconds_mean']:.3f} | {c['ratio_with_checkpoint']:.2%} | "
            f"{'met' if c['meets_target'] else 'missed'} |"
        )
    for c in result["cases"]:
        total = c["strategy_seconds_mean"]
        lines += [
            "",
            f"## {c['case']} ({c['num_parameters']:,} parameters)",
            "",
            "| round | phase | round s | strategy s | ratio | checkpoint s | checkpoint | clients s | "
            "serialise s | evaluate s | largest strategy components (self s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rounds"]:
            top = sorted(r["strategy_components"].items(), key=lambda kv: -kv[1])[:3]
            lines.append(
                f"| {r['round']} | {r['phase']} | {r['round_seconds']:.2f} | {r['strategy_seconds']:.3f} | "
                f"{r['ratio']:.2%} | {r['checkpoint_seconds']:.3f} | {mb(r['checkpoint_bytes'])} | "
                f"{r['client_train_seconds']:.2f} | {r['serialise_seconds']:.3f} | "
                f"{r['loop_seconds']['evaluate']:.2f} | " + ", ".join(f"{k} {v:.3f}" for k, v in top) + " |"
            )
        lines += [
            "",
            "Strategy time by component (self time, mean over rounds):",
            "",
            "| component | s/round | share of strategy time |",
            "|---|---|---|",
        ]
        for label, seconds in c["strategy_components_mean"].items():
            lines.append(f"| {label} | {seconds:.4f} | {seconds / total:.1%} |")
        lines += ["", "Checkpoint by part (after the last round):", "", "| part | bytes |", "|---|---|"]
        for part, size in c["checkpoint_parts_bytes"].items():
            lines.append(f"| {part} | {mb(size)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for c in result["cases"]:
        rounds = [r["round"] for r in c["rounds"]]
        axes[0].plot(rounds, [100 * r["ratio"] for r in c["rounds"]], marker=".", label=c["case"])
    axes[0].axhline(2.0, color="k", ls="--", lw=0.8, label="target 2%")
    axes[0].set(
        xlabel="round", ylabel="strategy / round wall time (%)", yscale="log", title="CMD strategy share of each round"
    )
    for set_formatter in (axes[0].yaxis.set_major_formatter, axes[0].yaxis.set_minor_formatter):
        set_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].legend()
    labels = sorted({k for c in result["cases"] for k in c["strategy_components_mean"]})
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(labels), 1)))
    bottom = np.zeros(len(result["cases"]))
    for label, colour in zip(labels, colours):
        values = np.array(
            [c["strategy_components_mean"].get(label, 0.0) / c["strategy_seconds_mean"] for c in result["cases"]]
        )
        axes[1].bar([c["case"] for c in result["cases"]], 100 * values, bottom=100 * bottom, label=label, color=colour)
        bottom += values
    axes[1].set(ylabel="% of strategy time", title="strategy time by component (self time)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 3 rounds (a smoke run)")
    parser.add_argument("--case", action="append", help=f"cases to run (default: all); one of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, help="num-server-rounds (default 12; 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="cmd-warmup (default 5; 1 with --quick)")
    parser.add_argument("--set", action="append", default=[], help="extra config override key=value (all cases)")
    parser.add_argument("--cprofile", action="store_true", help="also write the top functions of each run (cProfile)")
    parser.add_argument("--out", type=Path, help="default results/cmd_server_overhead[_quick].json")
    args = parser.parse_args()
    args.out = args.out or default_out("cmd_server_overhead", args.quick)
    cases = QUICK_CASES if args.quick else CASES
    names = args.case or list(cases)
    rounds = args.rounds or (3 if args.quick else 12)
    warmup = args.warmup or (1 if args.quick else 5)
    result = {"command": command_line(), "machine": machine(), "cases": []}
    for name in names:
        config_path, overrides = cases[name]
        config = load_config(
            config_path, [*overrides, f"num-server-rounds={rounds}", f"cmd-warmup={warmup}", *args.set]
        )
        profile = args.out.with_name(f"{args.out.stem}_{name}_cprofile.txt") if args.cprofile else None
        result["cases"].append(run_case(name, config, profile))
    text = markdown(result)
    write_outputs(args.out, result, text)
    plot(result, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
