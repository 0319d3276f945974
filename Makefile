# Set-up is idempotent: every target brings the machine to the state it needs and no further.
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO = 0
export MPLBACKEND = Agg

.PHONY: setup data demo test test-fast lint flwr-run flwr-stop clean-runs

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
		rm -rf $(VENV) && python3 -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist where apt can be used; otherwise say how.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put the four IDX" \
		     "files (train-images-idx3-ubyte.gz, ...) in a folder and pass --set data-dir=FOLDER"; \
	fi

# FedAvg / CMD / APF / A-APF in short rounds on Fashion-MNIST (under 3 minutes on 2 cores): table and plots.
demo: setup
	$(PY) experiments/table3/run.py --variant demo --seeds 0 --out runs/demo --quiet --force

test: setup
	$(PY) -m pytest -q

# The pure math and in-process protocol tests only (no Ray, no deployment, no flwr run): ~3x faster.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# ruff: lint and format check (configured in pyproject.toml); CI runs it before the tests.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# `flwr run .` on Flower's local simulation, without runtime dependency installation, on a fresh local
# SuperLink that is stopped afterwards (README, "flwr run ."). RUN_CONFIG / FEDERATION_CONFIG are passed
# as --run-config / --federation-config.
flwr-run: setup
	$(PY) -m fedcmd.local_superlink run $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)") \
		$(if $(FEDERATION_CONFIG),--federation-config "$(FEDERATION_CONFIG)")

# Stop the local SuperLink that a plain `flwr run .` left running (the one of FLWR_HOME).
flwr-stop:
	$(PY) -m fedcmd.local_superlink stop

clean-runs:
	rm -rf runs
