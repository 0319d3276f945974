#!/usr/bin/env bash
# A local deployment of experiments/deploy/fmnist-4nodes.toml (Fashion-MNIST, FedAvg, 4 clients,
# 3 rounds): a SuperLink and 4 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication. Extra
# arguments go to `fedcmd.deploy run` (e.g. --set strategy=cmd). Everything started is stopped on
# exit, Ctrl-C and SIGTERM included; logs stay in runs/deploy/demo/deploy/.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m fedcmd.deploy run experiments/deploy/fmnist-4nodes.toml --out runs/deploy/demo --auth "$@"
