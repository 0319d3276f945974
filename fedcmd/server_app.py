"""The fedcmd ServerApp for `flwr run .` and deployments: the run config is the experiment config.

Keys come from `[tool.flwr.app.config]` and `--run-config`; `out-dir` (not an experiment key)
says where outputs go (default runs/flwr/<strategy>-seed<k>).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcmd.config import resolve
from fedcmd.server import run_server_app

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    values = dict(context.run_config)
    out_dir = values.pop("out-dir", None)
    config = resolve(values)
    run_server_app(grid, config, out_dir or f"runs/flwr/{config['strategy']}-seed{config['seed']}",
                   flower_run_id=context.run_id)
