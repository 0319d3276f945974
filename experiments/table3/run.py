"""Table 3 (FedAvg, CMD, APF, A-APF over seeds), then `fedcmd compare`: one command.

    nice -n 10 python experiments/table3/run.py                     # Fashion-MNIST / LeNet-5, seeds 0 1 2
    python experiments/table3/run.py --variant cifar10 --engine ray # CIFAR-10 / ResNet-18 (data + GPU)
    python experiments/table3/run.py --methods fedavg apf --seeds 0 --set num-server-rounds=5 --out /tmp/t3

A variant is a folder of configs: `base.toml` and one `<method>.toml` per method (its strategy and
keys); its methods are those files, FedAvg (the baseline) first. Each run's config is
`<variant>/base.toml` overlaid with `<variant>/<method>.toml`, the seed and any
`--set key=value`; it runs in its own process (`fedcmd run`) into `<out>/<method>-seed<k>/`, and a run
whose summary.json exists is skipped (so an interrupted table resumes; `--force` reruns). Table and
plots go to `<out>/comparison.md` and `<out>/*.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASELINE = "fedavg"


def variant_methods(variant: str) -> list[str]:
    """The methods of a variant: its `<method>.toml` files, the baseline first, then by name."""
    names = sorted(p.stem for p in (HERE / variant).glob("*.toml") if p.stem != "base")
    return sorted(names, key=lambda name: name != BASELINE)


def merged_config(variant: str, method: str, seed: int) -> dict:
    values = tomllib.loads((HERE / variant / "base.toml").read_text())
    values.update(tomllib.loads((HERE / variant / f"{method}.toml").read_text()))
    values["seed"] = seed
    return values


def run_one(args: argparse.Namespace, name: str, path: Path, run_dir: Path) -> int:
    """Run one config in its own `fedcmd run` process; 0 when it finished."""
    command = [
        sys.executable,
        "-m",
        "fedcmd.cli",
        "run",
        str(path),
        "--out",
        str(run_dir),
        "--engine",
        args.engine,
        "--overwrite",
    ]  # what is left of an interrupted (or --force) run starts afresh
    print(f"[table3] {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    log_path = run_dir.parent / f"{name}.log"
    if args.quiet:
        with open(log_path, "w") as log:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    else:
        code = subprocess.run(command, cwd=REPO).returncode
    if code != 0:
        where = f" (log: {log_path})" if args.quiet else ""
        print(f"[table3] {name} failed{where}; stopping (finished runs are kept, rerun to resume)", file=sys.stderr)
        return 1
    if args.quiet:
        summary = json.loads((run_dir / "summary.json").read_text())
        print(
            f"[table3] {name}: {time.perf_counter() - started:.0f} s, final accuracy "
            f"{100 * summary['final_accuracy']:.2f}%, {summary['volume_ratio'] * 100:.1f}% of FedAvg's floats",
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="fmnist", choices=sorted(p.name for p in HERE.iterdir() if p.is_dir()))
    parser.add_argument(
        "--methods", nargs="+", help="methods of the variant to run (default: all of its <method>.toml)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--engine",
        choices=("inprocess", "ray"),
        default="inprocess",
        help="inprocess (default): same strategy and client code, no Ray; ray: Flower's simulation",
    )
    parser.add_argument(
        "--out",
        help="results folder (default experiments/results/table3 for fmnist, "
        "experiments/results/apf-regime for apf-regime, "
        "experiments/results/table3-<variant> for the others)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run (repeatable)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="run folders are <method>-<tag>-seed<k> (e.g. a codec's name, "
        "with its keys in --set); the baseline stays fedavg-seed<k>",
    )
    parser.add_argument("--force", action="store_true", help="rerun runs that already have a summary.json")
    parser.add_argument(
        "--quiet", action="store_true", help="one line per run (its progress goes to <run>/run.log), then the table"
    )
    args = parser.parse_args(argv)
    available = variant_methods(args.variant)
    args.methods = args.methods or available
    unknown = [m for m in args.methods if m not in available]
    if unknown:
        parser.error(f"variant {args.variant} has no method {unknown[0]!r} (its methods: {', '.join(available)})")

    default_out = {"fmnist": "table3", "apf-regime": "apf-regime"}.get(args.variant, f"table3-{args.variant}")
    out = Path(args.out) if args.out else REPO / "experiments" / "results" / default_out
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    from fedcmd.config import load_config, to_toml

    plan = []  # every config is written and validated before the first run starts
    for seed in args.seeds:  # seed-major: a partial table has every method of the first seeds
        for method in args.methods:
            name = f"{method}-{args.tag}-seed{seed}" if args.tag else f"{method}-seed{seed}"
            path = configs / f"{name}.toml"
            path.write_text(to_toml(merged_config(args.variant, method, seed)))
            path.write_text(to_toml(load_config(path, args.set)))
            plan.append((name, path))
    for name, path in plan:
        run_dir = out / name
        if (run_dir / "summary.json").is_file() and not args.force:
            print(f"[table3] {name}: done already, skipped ({run_dir}/summary.json)", flush=True)
            continue
        lock = out / f"{name}.lock"  # two runners on one table (one per core) never take the same run
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            print(f"[table3] {name}: under way in another process, skipped (delete {lock} if none is)", flush=True)
            continue
        try:
            code = run_one(args, name, path, run_dir)
        finally:
            lock.unlink(missing_ok=True)
        if code != 0:
            return 1
    from fedcmd.compare import compare

    runs = [out / name for name, _ in plan]
    if args.tag or BASELINE not in args.methods:  # compare with the baseline runs already in `out`
        runs += [out / f"{BASELINE}-seed{seed}" for seed in args.seeds if (out / f"{BASELINE}-seed{seed}").is_dir()]
    if not any(run.name.startswith(f"{BASELINE}-seed") for run in runs):
        print("[table3] not compared yet: no fedavg baseline run in this folder", flush=True)
        return 0
    pending = [run.name for run in runs if not (run / "summary.json").is_file()]
    if pending:  # taken by another runner: the table waits for them
        print(f"[table3] not compared yet: {', '.join(pending)} still under way", flush=True)
        return 0
    print(compare(runs, baseline=BASELINE, out=out))
    print(f"[table3] table: {out / 'comparison.md'}; plots: {out}/*.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
