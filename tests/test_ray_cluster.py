"""A run attached to a two-node Ray cluster on 127.0.0.1 (`experiments/ray_cluster.py`, through
`fedcmd run --ray-address`): clients ran on both nodes, the run's outputs hold the same floats as
the in-process run of its config, and no process of the cluster is left. One cluster for the module:
8 minutes on 2 cores shared with other jobs at load 8-9 (a minute to start the nodes, most of the
rest for the two client actors to start: Ray runs its workers at niceness 15)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcmd.cli import main
from fedcmd.config import load_config
from fedcmd.deploy import free_port
from fedcmd.engine import RayClusterError, check_ray_address, run_inprocess

pytestmark = pytest.mark.slow  # real Ray cluster (minutes): `make test-fast` leaves it out

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "ray_cluster.py"


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-cluster")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=2400
    )
    report = json.loads((out / "ray-cluster.json").read_text())
    return out, done, report


def metrics(folder: Path) -> list[tuple[str, str, str]]:
    with open(folder / "metrics.csv") as fh:
        return [(row["accuracy"], row["loss"], row["train_loss"]) for row in csv.DictReader(fh)]


def test_clients_ran_on_both_nodes(cluster_run):
    out, done, report = cluster_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert report["error"] is None
    nodes = report["nodes"]
    assert set(nodes) == {"head", "worker"} and len({n["node_id"] for n in nodes.values()}) == 2
    for node in nodes.values():  # 1 CPU per node and per client: one client actor on each
        assert node["cpus"] == 1 and len(node["actors"]) == 1 and node["client_messages"] > 0
    # round 1: one discovery query per client; then one train message per client and round
    assert sum(node["client_messages"] for node in nodes.values()) == 4 + 4 * 2


def test_the_run_has_the_floats_of_the_in_process_run(cluster_run, tmp_path):
    out, _, report = cluster_run
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["replies_rejected"] == 0
    assert summary["final_accuracy"] == report["final_accuracy"] > 0.5
    in_process = run_inprocess(load_config(out / "config.toml"), tmp_path, progress=False)
    assert metrics(out / "run") == metrics(tmp_path)
    for key in ("final_accuracy", "floats_up", "floats_down"):
        assert summary[key] == in_process[key], key


def test_nothing_is_left_running(cluster_run):
    _, _, report = cluster_run
    assert report["left_running"] == {}
    temp_dir, marker = report["temp_dir"].encode(), report["marker"].encode()
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (
                temp_dir in (entry / "cmdline").read_bytes() or marker in (entry / "environ").read_bytes().split(b"\0")
            ):
                left.append(int(entry.name))
        except OSError:
            continue
    assert left == []
    assert not Path(report["temp_dir"]).exists()  # removed after a clean stop


def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path, capsys):
    """ray.init would wait for it indefinitely; the run is refused before anything is written."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RayClusterError, match=f"no Ray cluster answers at {address} "):
        check_ray_address(address)
    with pytest.raises(RayClusterError, match="expected HOST:PORT"):
        check_ray_address("ray://127.0.0.1:10001")
    args = ["run", "--set", 'dataset="synthetic"', "--set", 'model="mlp"', "--out", str(tmp_path / "run")]
    assert main([*args, "--ray-address", address]) == 2
    assert main([*args, "--ray-address", address, "--engine", "inprocess"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[:2] for line in errors] == [["fedcmd", " error"]] * 2
    assert "no Ray cluster answers" in errors[0] and "needs --engine ray" in errors[1]
    assert not (tmp_path / "run").exists()
