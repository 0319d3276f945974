"""The `fedcmd` command: `fedcmd run CONFIG.toml [--set key=value ...] [--out DIR] [--engine ray|inprocess]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedcmd.config import ConfigError, load_config
from fedcmd.data import DatasetNotFoundError


def default_out_dir(config_path: str | None, config: dict) -> Path:
    stem = Path(config_path).stem if config_path else "default"
    return Path("runs") / stem / f"{config['strategy']}-seed{config['seed']}"


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set or [])
    out = Path(args.out) if args.out else default_out_dir(args.config, config)
    if args.engine == "ray":
        from fedcmd.engine import run_ray

        run_ray(config, out)
    else:
        from fedcmd.engine import run_inprocess

        run_inprocess(config, out)
    print(f"[fedcmd] outputs in {out}/ (summary.json, metrics.csv, volume.csv, partitions.csv, run.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcmd", description="Communication-efficient federated learning with CMD")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("config", nargs="?", help="TOML config (flat kebab-case keys); defaults apply to missing keys")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", help="output folder (default runs/<config>/<strategy>-seed<k>)")
    run.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                     help="ray: Flower's simulation engine (default); inprocess: same code, no Ray")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetNotFoundError) as err:
        print(f"fedcmd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
