"""`flwr run .` end to end, as the README tells a user to run it, from a clean copy of the repository:
Flower's default local simulation (2 SuperNodes), 2 rounds on synthetic data, outputs in the default
folder under runs/ (twice: each run gets a folder of its own); then `python -m fedcmd.local_superlink stop`, after which no process the run
started is left. And `make flwr-run`'s command on a run that fails: exit status 1, nothing left
running. Each on free ports with a Flower home of its own. About 70 s + 35 s."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedcmd.deploy import free_port, stop_process_groups

pytestmark = pytest.mark.slow  # real Ray / deployment / flwr run: `make test-fast` leaves it out

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = "num-server-rounds=2 num-clients=2 dataset='synthetic' model='mlp'"
TAG = "FEDCMD_TEST_FLWR_RUN"


def clean_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone of this working tree would have them (no venv, no runs)."""
    listed = (
        subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def tagged_processes(value: str) -> dict[int, tuple[int, str]]:
    """Live processes whose environment holds TAG=value (what this test started, and their children):
    pid -> (process group, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{TAG}={value}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[2]), cmdline)
    return found


def names(processes: dict[int, tuple[int, str]]) -> set[str]:
    return {Path(word).name for _, cmd in processes.values() for word in cmd.split()[:2]}


def flower_env(repo: Path, tag: str) -> dict[str, str]:
    """This environment with a Flower home in `repo`, free local-SuperLink ports and the tag."""
    http_port = free_port()
    control_port = next(p for p in iter(free_port, None) if p != http_port)
    return dict(
        os.environ,
        FLWR_HOME=str(repo / ".flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        **{TAG: tag},
    )


def stop_tagged(tag: str) -> None:
    """Stop what a failed test left running (its commands run in sessions of their own, never in ours)."""
    stop_process_groups(sorted({pgid for pgid, _ in tagged_processes(tag).values()} - {os.getpgrp()}), grace=5.0)


def run_command(args: list[str], repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)


def test_flwr_run_from_a_clean_copy_writes_the_outputs_and_leaves_nothing_running(tmp_path):
    repo = clean_copy(tmp_path / "fedcmd")
    tag = uuid.uuid4().hex
    env = flower_env(repo, tag)
    # The README's set-up for a plain `flwr run .`: the venv's scripts on PATH, no runtime dependency installation.
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    try:
        run = run_command(["flwr", "run", ".", "--stream", "--run-config", RUN_CONFIG], repo, env)
        # The same command again (a user repeating it): a folder of its own, not a refused overwrite.
        again = run_command(["flwr", "run", ".", "--stream", "--run-config", RUN_CONFIG], repo, env)
        left_by_flwr = tagged_processes(tag)
        stop = run_command([sys.executable, "-m", "fedcmd.local_superlink", "stop"], repo, env)
        after_stop = tagged_processes(tag)
    finally:
        stop_tagged(tag)

    log = run.stdout + run.stderr
    assert "Successfully started run" in log, log
    assert "Installing application dependencies" not in log
    run_ids = [re.search(r"Successfully started run (\d+)", r.stdout + r.stderr) for r in (run, again)]
    assert all(run_ids), again.stdout + again.stderr
    outs = [repo / "runs" / "flwr" / f"fedavg-seed0-run{m[1]}" for m in run_ids]  # the ServerApp's default out-dir
    assert outs[0] != outs[1] and (outs[1] / "summary.json").is_file(), again.stdout[-3000:] + again.stderr[-3000:]
    out = outs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rounds"], summary["num_clients"], summary["dataset"], summary["model"]) == (
        2,
        2,
        "synthetic",
        "mlp",
    )
    assert summary["replies_rejected"] == 0 and summary["volume_ratio"] == 1.0
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2] and [int(r["accepted"]) for r in rows[1:]] == [2, 2]
    for name in ("config.toml", "volume.csv", "partitions.csv", "rejections.csv", "run.png"):
        assert (out / name).stat().st_size > 0, name
    # Flower leaves its SuperLink running; the stop command ends it and everything it spawned.
    assert "flower-superlink" in names(left_by_flwr), left_by_flwr
    assert stop.returncode == 0 and "stopped the local SuperLink" in stop.stdout, stop.stdout + stop.stderr
    assert after_stop == {}, after_stop


def test_make_flwr_run_fails_on_a_failed_run_and_stops_its_superlink(tmp_path):
    repo = clean_copy(tmp_path / "fedcmd")
    tag = uuid.uuid4().hex
    env = flower_env(repo, tag)
    # Nothing else, and no venv on PATH: the command puts it there and turns installation off itself.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d != venv_bin)
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    try:
        run = run_command(
            [sys.executable, "-m", "fedcmd.local_superlink", "run", "--run-config", "num-clients=0"], repo, env
        )
        after = tagged_processes(tag)
    finally:
        stop_tagged(tag)
    assert "Successfully started run" in run.stdout, run.stdout + run.stderr
    assert "config key 'num-clients': 0 is not a positive integer" in run.stdout
    assert "Installing application dependencies" not in run.stdout
    assert run.returncode == 1 and "ended finished:failed" in run.stderr, run.stderr
    assert after == {}, after
