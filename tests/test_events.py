"""A run's events (events.jsonl, `fedcmd.events`): written in order as an in-process run goes, strict
JSON, appended by a resumed run; the CLI's progress lines are made from them; deploy follows them
(`fedcmd.deploy.follow_events`) to learn that a run finished or failed. A few seconds."""

import hashlib
import json
import math
import threading
import time

import pytest

import fedcmd.server as server
from fedcmd.cli import main
from fedcmd.deploy import DeploymentError, follow_events, run_summary
from fedcmd.engine import run_inprocess
from fedcmd.events import (
    EVENTS_NAME,
    ROUND_FINISHED,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_STARTED,
    EventFollower,
    EventLog,
    progress_line,
    read_events,
)
from fedcmd.report import read_rows

SMALL = {
    "dataset": "synthetic",
    "synthetic-train-size": 200,
    "synthetic-test-size": 50,
    "model": "mlp",
    "num-clients": 3,
    "num-server-rounds": 3,
    "batch-size": 16,
    "eval-every": 2,
}


@pytest.fixture
def config(small_config):
    return dict(small_config, **SMALL)


def strict_lines(path):
    """Every line of the file parsed as strict JSON (no NaN or Infinity)."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def interrupt_at(monkeypatch, server_round):
    """The server stops as a user's Ctrl-C would, when round `server_round` begins."""
    discover = server.discover_nodes

    def interrupted(grid, strategy, rnd, *args):
        if rnd == server_round:
            raise KeyboardInterrupt
        return discover(grid, strategy, rnd, *args)

    monkeypatch.setattr(server, "discover_nodes", interrupted)


def test_an_in_process_run_writes_its_events_in_order(config, tmp_path):
    summary = run_inprocess(config, tmp_path, progress=False)
    events = strict_lines(tmp_path / EVENTS_NAME)
    assert events == read_events(tmp_path / EVENTS_NAME)
    assert [e["event"] for e in events] == [RUN_STARTED, ROUND_FINISHED, ROUND_FINISHED, ROUND_FINISHED, RUN_FINISHED]
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    started, rounds, finished = events[0], events[1:4], events[4]
    assert (started["strategy"], started["rounds"], started["first_round"], started["resumed"]) == (
        "fedavg",
        3,
        1,
        False,
    )
    assert started["config_digest"] == hashlib.sha256((tmp_path / "config.toml").read_bytes()).hexdigest()
    assert started["parameters"] == summary["num_parameters"] and started["flower_run_id"] is None
    table = read_rows(tmp_path / "metrics.csv")
    assert started["accuracy"] == table[0]["accuracy"]
    for event, row in zip(rounds, table[1:]):
        assert (event["round"], event["rounds"]) == (row["round"], 3)
        assert (event["sampled"], event["replies"], event["rejected"], event["refused"]) == (3, 3, 0, 0)
        assert event["replies"] == row["accepted"] and event["mb_cumulative"] == pytest.approx(row["mb_cumulative"])
        assert event["metrics"]["round"] == event["round"]
        if event["evaluated"]:
            assert event["accuracy"] == row["accuracy"]
        else:  # round 1 with eval-every 2: not measured, null in the event, an empty cell in the table
            assert event["accuracy"] is None and math.isnan(row["accuracy"]) and event["metrics"]["accuracy"] is None
    assert [e["evaluated"] for e in rounds] == [False, True, True]
    for key in ("bytes_up", "bytes_down", "floats_up", "floats_down"):
        assert sum(e[key] for e in rounds) == pytest.approx(summary[key]), key
    assert finished["summary_path"] == str((tmp_path / "summary.json").resolve())
    assert finished["summary"] == json.loads((tmp_path / "summary.json").read_text())


def test_a_failed_run_says_why_and_a_resumed_run_appends(config, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(config, tmp_path, progress=False)
    monkeypatch.undo()
    first = read_events(tmp_path / EVENTS_NAME)
    assert [e["event"] for e in first] == [RUN_STARTED, ROUND_FINISHED, RUN_FAILED]
    assert (first[-1]["round"], first[-1]["error"]) == (1, "KeyboardInterrupt: ")
    run_inprocess(config, tmp_path, progress=False, resume=True)
    events = read_events(tmp_path / EVENTS_NAME)
    assert events[:3] == first
    assert [e["event"] for e in events[3:]] == [RUN_STARTED, ROUND_FINISHED, ROUND_FINISHED, RUN_FINISHED]
    assert (events[3]["resumed"], events[3]["first_round"]) == (True, 2)
    assert events[3]["config_digest"] == first[0]["config_digest"]
    assert [e["round"] for e in events if e["event"] == ROUND_FINISHED] == [1, 2, 3]
    # A new run in the folder starts the file afresh.
    run_inprocess(config, tmp_path, progress=False, overwrite=True)
    assert [e["event"] for e in read_events(tmp_path / EVENTS_NAME)] == [RUN_STARTED] + [ROUND_FINISHED] * 3 + [
        RUN_FINISHED
    ]


def test_a_run_refused_before_it_starts_writes_no_event(config, tmp_path):
    with pytest.raises(Exception, match="num_partitions"):
        run_inprocess(dict(config, **{"num-clients": 500}), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_cli_prints_its_progress_from_the_events(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--engine", "inprocess", "--out", str(out)]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in map(progress_line, read_events(out / EVENTS_NAME)) if line is not None]
    assert (
        printed == "\n".join(lines) + "\n" + f"[fedcmd] outputs in {out}/ (summary.json, metrics.csv, volume.csv, "
        f"partitions.csv, events.jsonl, run.png)\n"
    )
    assert (
        lines[0].startswith("[fedcmd] fedavg on synthetic: 200 train / 50 test images")
        and "parameters; round 0: accuracy 0." in lines[0]
    )
    assert lines[1].startswith("[fedcmd] round 2/3: accuracy 0.") and ", 3/3 replies, " in lines[1]  # round 1: no eval
    assert lines[2].startswith("[fedcmd] round 3/3: ") and json.loads(lines[3])["rounds"] == 3


def test_progress_lines():
    started = dict(
        event=RUN_STARTED,
        strategy="cmd",
        dataset="d",
        parameters=7,
        rounds=5,
        first_round=3,
        resumed=True,
        accuracy=0.5,
    )
    assert progress_line(started) == "[fedcmd] cmd on d: resuming after round 2 (last accuracy 0.5000)"
    assert progress_line(dict(started, resumed=False)) == "[fedcmd] cmd on d, 7 parameters; round 0: accuracy 0.5000"
    done = dict(
        event=ROUND_FINISHED,
        round=4,
        rounds=5,
        evaluated=True,
        accuracy=0.61234,
        replies=2,
        sampled=3,
        mb_cumulative=1.234,
        round_seconds=2.26,
    )
    assert progress_line(done) == "[fedcmd] round 4/5: accuracy 0.6123, 2/3 replies, 1.23 MB so far, 2.3 s"
    assert progress_line(dict(done, evaluated=False, accuracy=None)) is None
    assert progress_line(dict(event=RUN_FAILED, error="ValueError: x", round=4)) is None


def test_the_follower_reads_whole_lines_as_they_come(tmp_path):
    path = tmp_path / EVENTS_NAME
    follower = EventFollower(path)
    assert follower.poll() == []  # no file yet
    log = EventLog(path, append=False)
    log.emit(RUN_STARTED, accuracy=float("nan"))
    with open(path, "a") as fh:
        fh.write('{"event": "round_finished", "rou')  # a line being written
    [started] = follower.poll()
    assert started["event"] == RUN_STARTED and started["accuracy"] is None
    assert follower.poll() == []
    with open(path, "a") as fh:
        fh.write('nd": 1}\n')
    assert follower.poll() == [{"event": ROUND_FINISHED, "round": 1}]
    EventLog(path, append=False).emit(RUN_STARTED)  # a new run starts the file afresh: read from its start
    assert [e["event"] for e in follower.poll()] == [RUN_STARTED]


def write_run(path, names, pause=0.05):
    """Another process's run, in a thread: events written one by one."""

    def run():
        log = EventLog(path, append=False)
        for name in names:
            time.sleep(pause)
            log.emit(name, round=1, error="RuntimeError: out of disk", summary_path=str(path.parent / "summary.json"))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_deploy_follows_a_run_to_its_end(tmp_path):
    path = tmp_path / EVENTS_NAME
    (tmp_path / "summary.json").write_text('{"rounds": 1}')
    seen = []
    writer = write_run(path, [RUN_STARTED, ROUND_FINISHED, RUN_FINISHED])
    end = follow_events(EventFollower(path), ended=lambda: None, timeout=30, on_event=seen.append, every=0.01)
    writer.join()
    assert [e["event"] for e in seen] == [RUN_STARTED, ROUND_FINISHED, RUN_FINISHED] and end is seen[-1]
    assert run_summary(end, tmp_path / "flwr-run.log") == {"rounds": 1}


def test_deploy_reports_a_failed_run_with_its_error(tmp_path):
    path = tmp_path / EVENTS_NAME
    writer = write_run(path, [RUN_STARTED, ROUND_FINISHED, RUN_FAILED])
    end = follow_events(EventFollower(path), ended=lambda: None, timeout=30, every=0.01)
    writer.join()
    with pytest.raises(
        DeploymentError, match=r"the run failed after round 1: RuntimeError: out of disk; see .*flwr-run"
    ):
        run_summary(end, tmp_path / "flwr-run.log")


def test_deploy_fails_a_run_that_ends_without_an_end_event(tmp_path):
    path = tmp_path / EVENTS_NAME
    EventLog(path, append=False).emit(RUN_STARTED)
    seen, calls = [], []

    def ended():  # e.g. the SuperLink exited, or records the run finished:failed
        calls.append(1)
        return "run 7 ended finished:failed (ServerApp failed with exception: boom)" if len(calls) > 2 else None

    with pytest.raises(DeploymentError, match="ServerApp failed with exception: boom"):
        follow_events(EventFollower(path), ended=ended, timeout=30, on_event=seen.append, every=0.01)
    assert [e["event"] for e in seen] == [RUN_STARTED]
    # An end event written before the process went is read, not taken for a lost run.
    EventLog(path, append=True).emit(RUN_FINISHED, summary_path="x")
    assert follow_events(EventFollower(path), ended=lambda: "gone", timeout=30, every=0.01)["event"] == RUN_FINISHED
    with pytest.raises(DeploymentError, match="did not end within 0.05 s"):
        follow_events(EventFollower(tmp_path / "none.jsonl"), ended=lambda: None, timeout=0.05, every=0.01)
