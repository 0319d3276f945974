"""The fedcmd ServerApp for `flwr run .` and deployments: the run config is the experiment config.

Keys come from `[tool.flwr.app.config]` and `--run-config`; `out-dir` (not an experiment key)
says where outputs go. By default each run has a folder of its own, named by Flower's run id
(the one `flwr run` prints): runs/flwr/<strategy>-seed<k>-run<run id>, so a second `flwr run .`
of the same config never meets the first one's outputs (fedcmd refuses to write a new run over a
finished one).
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
    run_server_app(
        grid,
        config,
        out_dir or f"runs/flwr/{config['strategy']}-seed{config['seed']}-run{context.run_id}",
        flower_run_id=context.run_id,
    )
