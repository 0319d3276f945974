"""A deployed run against simulations of the same config: floats, bytes, SuperLink counters, accuracy.

    .venv/bin/python experiments/deploy/agreement.py [CONFIG.toml] [--set key=value ...] --out DIR [--auth] [--ray]

Runs CONFIG on a local deployment (fedcmd.deploy), then in process (LocalGrid) and, with --ray, on
Flower's simulation engine, and writes DIR/agreement.json with, per engine, the accountant's totals
and final accuracy, plus the SuperLink's own traffic counters for the deployed run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedcmd.config import load_config
from fedcmd.deploy import deploy
from fedcmd.engine import run_inprocess, run_ray

KEYS = ("floats_up", "floats_down", "bytes_up", "bytes_down", "final_accuracy", "replies_rejected", "wall_seconds")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--auth", action="store_true", help="TLS and SuperNode authentication on")
    parser.add_argument("--ray", action="store_true", help="also run on Flower's simulation engine")
    args = parser.parse_args()
    config = load_config(args.config, args.set or [])
    out = Path(args.out).resolve()
    runs = {
        "deployed": deploy(config, out / "deployed", tls=args.auth, auth=args.auth),
        "inprocess": run_inprocess(config, out / "inprocess", progress=False),
    }
    if args.ray:
        runs["ray"] = run_ray(config, out / "ray", progress=False)
    record = json.loads((out / "deployed" / "deploy" / "superlink-run.json").read_text())
    traffic = record["network-traffic"]
    deployed = runs["deployed"]
    report = {
        "config": {
            k: config[k] for k in ("strategy", "dataset", "model", "num-clients", "num-server-rounds", "fraction-train")
        },
        "auth": args.auth,
        "runs": {name: {k: summary[k] for k in KEYS} for name, summary in runs.items()},
        "superlink": {
            "inbound_bytes": traffic["inbound-bytes"],
            "outbound_bytes": traffic["outbound-bytes"],
            "inbound_over_bytes_up": traffic["inbound-bytes"] / deployed["bytes_up"],
            "outbound_over_bytes_down": traffic["outbound-bytes"] / deployed["bytes_down"],
        },
        "deployed_over_simulated": {
            name: {
                k: deployed[k] / summary[k] if summary[k] else None
                for k in ("floats_up", "floats_down", "bytes_up", "bytes_down")
            }
            for name, summary in runs.items()
            if name != "deployed"
        },
    }
    (out / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
