"""The codec series (issue 11): FedAvg, CMD and APF with a wire codec on both directions.

    nice -n 5 python experiments/codecs.py                       # every row, seeds 0 1 2 (Table 3 setting)
    nice -n 5 python experiments/codecs.py --variant apf-regime  # the same rows in the short-round regime
    python experiments/codecs.py --rows cmd-int8 fedavg --seeds 0
    python experiments/codecs.py --compare-only                  # the table from the runs that finished

Each row is a method of `experiments/table3/<variant>/` with `codec-up` = `codec-down` = the row's
codec (topk with `topk-fraction` = TOPK_FRACTION, int8 with the default chunk of 1,024 values).
Baseline: FedAvg in float32 (`fedavg`, run alongside, same seeds). In the short-round regime
(`apf-regime`) the float32 rows, FedAvg and CMD, are the committed runs of
`experiments/results/apf-regime/` (same configs and seeds: this code reran their first 20 rounds
of FedAvg and 120 rounds of CMD, two embedding events included, float for float), so only the
codec rows run there (REUSED). Runs go seed by seed (a partial
series has every row of its first seeds) to `experiments/results/codecs/` (or
`codecs-<variant>/`), each as `<method>-<codec>-seed<k>/` with its config.toml; two processes may
share a series (a run is locked while under way). The table and plots are `fedcmd compare`'s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPK_FRACTION = 0.1
# row: (method, codec); "none" is the float32 baseline
ROWS = {
    "fedavg": ("fedavg", "none"),
    "cmd-int8": ("cmd", "int8"),
    "fedavg-int8": ("fedavg", "int8"),
    "cmd-fp16": ("cmd", "fp16"),
    "fedavg-fp16": ("fedavg", "fp16"),
    "cmd-topk": ("cmd", "topk"),
    "fedavg-topk": ("fedavg", "topk"),
    "apf-int8": ("apf", "int8"),
    "cmd": ("cmd", "none"),
}  # CMD in float32: what the codec adds to CMD's own effect


# variant -> (folder of committed float32 runs, the rows taken from it instead of run again)
REUSED = {"apf-regime": (HERE / "results" / "apf-regime", ("fedavg", "cmd"))}


def out_folder(variant: str) -> Path:
    return HERE / "results" / ("codecs" if variant == "fmnist" else f"codecs-{variant}")


def run_row(variant: str, row: str, seed: int) -> int:
    method, codec = ROWS[row]
    command = [
        sys.executable,
        str(HERE / "table3" / "run.py"),
        "--variant",
        variant,
        "--methods",
        method,
        "--seeds",
        str(seed),
        "--out",
        str(out_folder(variant)),
        "--quiet",
    ]
    if codec != "none":
        command += ["--tag", codec, "--set", f"codec-up={codec}", "--set", f"codec-down={codec}"]
        if codec == "topk":
            command += ["--set", f"topk-fraction={TOPK_FRACTION}"]
    print("[codecs] " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def compare(variant: str) -> None:
    from fedcmd.compare import compare as compare_runs

    out = out_folder(variant)
    finished = [p for p in sorted(out.iterdir()) if (p / "summary.json").is_file()]
    if variant in REUSED:
        folder, rows = REUSED[variant]
        finished += [p for row in rows for p in sorted(folder.glob(f"{row}-seed*")) if (p / "summary.json").is_file()]
    order = {name: i for i, name in enumerate(ROWS)}
    finished.sort(key=lambda p: (order.get(p.name.rsplit("-seed", 1)[0], len(order)), p.name))
    print(compare_runs(finished, baseline="fedavg", out=out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="fmnist", choices=("fmnist", "apf-regime"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: every row the variant runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--compare-only", action="store_true")
    args = parser.parse_args()
    reused = REUSED.get(args.variant, (None, ()))[1]
    args.rows = args.rows or [row for row in ROWS if row not in reused]
    if not args.compare_only:
        for seed in args.seeds:
            for row in args.rows:
                if run_row(args.variant, row, seed) != 0:
                    return 1
    compare(args.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
