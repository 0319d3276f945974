"""The `fedcmd` command: `fedcmd run CONFIG.toml [--set key=value ...] [--out DIR] [--engine ray|inprocess]
[--ray-address HOST:PORT]`
`fedcmd compare RUN_DIR ... [--baseline fedavg] [--out DIR] [--target PERCENT]` and
`fedcmd deploy CONFIG.toml --out DIR [--set key=value ...] [--tls] [--auth]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedcmd.checkpoint import CheckpointError
from fedcmd.config import ConfigError, load_config
from fedcmd.data import DatasetNotFoundError


def default_out_dir(config_path: str | None, config: dict) -> Path:
    stem = Path(config_path).stem if config_path else "default"
    return Path("runs") / stem / f"{config['strategy']}-seed{config['seed']}"


def cmd_run(args: argparse.Namespace) -> int:
    if args.ray_address and args.engine != "ray":
        print(
            f"fedcmd: error: --ray-address runs on a Ray cluster: it needs --engine ray, not --engine {args.engine}",
            file=sys.stderr,
        )
        return 2
    config = load_config(args.config, args.set or [])
    out = Path(args.out) if args.out else default_out_dir(args.config, config)
    from fedcmd.server import check_out_dir

    check_out_dir(out, resume=args.resume, overwrite=args.overwrite)  # before Ray takes seconds to start
    if args.engine == "ray":
        from fedcmd.engine import RayClusterError, run_ray

        try:
            run_ray(config, out, resume=args.resume, overwrite=args.overwrite, ray_address=args.ray_address)
        except RayClusterError as err:  # raised before Ray starts: nothing was written
            print(f"fedcmd: error: {err}", file=sys.stderr)
            return 2
    else:
        from fedcmd.engine import run_inprocess

        run_inprocess(config, out, resume=args.resume, overwrite=args.overwrite)
    print(f"[fedcmd] outputs in {out}/ (summary.json, metrics.csv, volume.csv, partitions.csv, events.jsonl, run.png)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedcmd.compare import CompareError, compare

    try:
        target = None if args.target is None else args.target / 100.0
        print(compare(args.runs, baseline=args.baseline, out=args.out, target=target))
    except CompareError as err:
        print(f"fedcmd compare: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from fedcmd.deploy import DeploymentError, run_from_args

    try:
        return run_from_args(args)
    except DeploymentError as err:
        print(f"fedcmd deploy: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from fedcmd.deploy import add_run_arguments

    parser = argparse.ArgumentParser(prog="fedcmd", description="Communication-efficient federated learning with CMD")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("config", nargs="?", help="TOML config (flat kebab-case keys); defaults apply to missing keys")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", help="output folder (default runs/<config>/<strategy>-seed<k>)")
    run.add_argument(
        "--engine",
        choices=("ray", "inprocess"),
        default="ray",
        help="ray: Flower's simulation engine (default); inprocess: same code, no Ray",
    )
    run.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run on this running Ray cluster (the head's `ray start --head --port`) instead of "
        "a Ray instance started on this machine; the cluster is left running",
    )
    again = run.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run from the checkpoint in its output folder (same config; "
        "num-server-rounds and round-timeout may change)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the output folder holds (refused without this or --resume)",
    )
    run.set_defaults(func=cmd_run)
    compare = sub.add_parser("compare", help="table and plots comparing finished runs, by method over seeds")
    compare.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="a run folder (<method>-seed<k>/) or a folder holding run folders"
    )
    compare.add_argument("--baseline", default="fedavg", help="method the volume ratios refer to (default fedavg)")
    compare.add_argument("--out", help="where comparison.md and the plots go (default: the runs' common parent)")
    compare.add_argument(
        "--target",
        type=float,
        metavar="PERCENT",
        help="test accuracy (in %%) whose traffic-to-reach is reported "
        "(default: the baseline's mean final accuracy minus 0.5 point)",
    )
    compare.set_defaults(func=cmd_compare)
    deploy = sub.add_parser(
        "deploy",
        help="run one experiment on a local deployment: a SuperLink and one "
        "SuperNode per partition on 127.0.0.1, stopped afterwards",
    )
    add_run_arguments(deploy)
    deploy.set_defaults(func=cmd_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetNotFoundError, CheckpointError) as err:
        print(f"fedcmd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
