"""One real deployment on loopback (SuperLink + 2 SuperNodes, TLS and SuperNode authentication on,
short rounds of local Adam steps), compared with the same config run in process; a node with an
unregistered key is refused; every process started is stopped. About a minute."""

import csv
import json
import os

import pytest

from fedcmd.config import resolve
from fedcmd.deploy import Deployment, live_group_members, make_node_key
from fedcmd.engine import run_inprocess

NODES = 2


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    config = resolve({"dataset": "synthetic", "synthetic-train-size": 400, "synthetic-test-size": 200,
                      "num-clients": NODES, "num-server-rounds": 2, "batch-size": 16, "local-steps": 4,
                      "optimizer": "adam", "lr": 0.002, "optimizer-state": "keep", "round-timeout": 120.0})
    result = {"root": root, "config": config}
    with Deployment(root / "deployed" / "deploy", NODES, auth=True) as deployment:
        result["deployment"] = deployment
        deployment.start()
        # A stranger tries to join while the run goes on.
        stranger = deployment.start_foreign_node(make_node_key(deployment.folder / "stranger-key"))
        result["summary"] = deployment.run(config, root / "deployed", timeout=240)
        try:
            result["stranger_exit"] = stranger.wait(30)
        except Exception:  # still running: it was let in (the test below fails on None)
            result["stranger_exit"] = None
        result["nodes_after"] = deployment.node_list()
        result["processes"] = [deployment.superlink, *deployment.nodes.values(), stranger]
    result["simulated"] = run_inprocess(config, root / "simulated", progress=False)
    return result


def test_deployed_run_matches_the_simulation(deployment):
    deployed, simulated = deployment["summary"], deployment["simulated"]
    root = deployment["root"]
    assert deployed["rounds"] == 2 and deployed["replies_rejected"] == 0
    for key in ("floats_up", "floats_down", "raw_bytes_up", "raw_bytes_down"):
        assert deployed[key] == simulated[key], key
    for key in ("bytes_up", "bytes_down"):
        assert deployed[key] == pytest.approx(simulated[key], rel=0.01), key
    # Same computation: same cohorts, same local training (each SuperNode continues its batch stream
    # and keeps its Adam state across rounds, as the in-process nodes do), same global models.
    accuracy = lambda run: [row["accuracy"] for row in read_csv(root / run / "metrics.csv")]
    assert accuracy("deployed") == accuracy("simulated")
    # The SuperLink's own counters of the run's fleet traffic agree with the accountant.
    record = json.loads((root / "deployed" / "deploy" / "superlink-run.json").read_text())
    assert record["status"] == "finished:completed"
    assert record["network-traffic"]["inbound-bytes"] == pytest.approx(deployed["bytes_up"], rel=0.01)
    assert record["network-traffic"]["outbound-bytes"] == pytest.approx(deployed["bytes_down"], rel=0.01)


def test_tls_and_node_authentication_were_on(deployment):
    folder = deployment["deployment"].folder
    superlink_log = (folder / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink_log
    assert "--enable-supernode-auth" in " ".join(deployment["processes"][0].args)
    for k in range(NODES):
        args = " ".join(deployment["processes"][1 + k].args)
        assert "--root-certificates" in args and "--auth-supernode-private-key" in args and "--insecure" not in args
        assert (folder / "credentials" / f"node-{k}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_a_node_with_an_unregistered_key_is_refused(deployment):
    assert deployment["stranger_exit"] not in (None, 0)
    folder = deployment["deployment"].folder
    assert "Failed to activate SuperNode" in (folder / "supernode-foreign.log").read_text()
    assert "No SuperNode found with the given public key" in (folder / "superlink.log").read_text()
    online = [n for n in deployment["nodes_after"] if n["status"] == "online"]
    assert len(online) == NODES


def test_every_started_process_is_stopped(deployment):
    for proc in deployment["processes"]:
        assert proc.poll() is not None
        assert live_group_members(proc.pid) == [], proc.args[0]
    logs = {p.name for p in deployment["deployment"].folder.iterdir() if p.suffix == ".log"}
    assert {"superlink.log", "flwr-run.log", "supernode-0.log", "supernode-1.log"} <= logs
    assert os.environ.get("FLWR_HOME") != str(deployment["deployment"].home)


def test_stop_process_groups_ends_whole_groups_and_kills_what_ignores_sigterm():
    import subprocess
    import time

    from fedcmd.deploy import stop_process_groups

    # One group whose leader exits at once, leaving a child that ignores SIGTERM; one plain group.
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & exit 0"], start_new_session=True)
    plain = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    try:
        stubborn.wait(10)
        deadline = time.monotonic() + 10
        while len(live_group_members(plain.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_group_members(stubborn.pid) and len(live_group_members(plain.pid)) >= 2
        started = time.monotonic()
        stop_process_groups([stubborn.pid, plain.pid], grace=1.0)
        assert live_group_members(stubborn.pid) == [] and live_group_members(plain.pid) == []
        assert time.monotonic() - started < 5
    finally:
        stop_process_groups([stubborn.pid, plain.pid], grace=0.0, sig=9)
        plain.wait(5)
