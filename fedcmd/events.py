"""A run's progress as events: JSON lines in `events.jsonl` in the run's folder.

The server (`fedcmd.server.run_experiment`) writes an event as soon as what it tells has happened,
one JSON object a line, each line flushed when written; whoever follows the run reads the file:
the CLI's progress lines are made from the events (`progress_line`), `fedcmd deploy` follows the
file to report progress and to learn that a deployed run finished or failed (`EventFollower`).
A new run starts the file afresh, a resumed run (`--resume`) appends to it. A run refused before
it writes anything (a config or set-up error) writes no event either.

Every event has `event`, its name (the constants below), and `time` (seconds since the epoch).
A figure not measured (NaN: accuracy in a round without evaluation) is null, so every line is
strict JSON.

run_started
    strategy, dataset (a description of the data), parameters (model weights), rounds
    (num-server-rounds), first_round (the first round this run trains), resumed (true when it
    continues a checkpoint, after round first_round - 1), accuracy (round 0's; when resumed, the
    last evaluated round's), config_digest (sha256 hex digest of the resolved config as written to
    config.toml: `sha256sum config.toml` gives it), flower_run_id (the Flower run executing the
    ServerApp, null in process).
round_finished
    Written after the round's checkpoint and table rows, so the events never run ahead of them.
    round, rounds, evaluated (whether the global model was evaluated after it), accuracy, loss,
    train_loss, sampled (clients in the cohort), replies (replies accepted), rejected (replies
    rejected), refused (nodes whose partition claim was refused), bytes_up, bytes_down, floats_up,
    floats_down (the round's traffic, discovery included), mb_cumulative (serialised MB, both
    directions, since round 1), round_seconds, metrics (the round's metrics.csv row, strategy
    figures included).
run_finished
    summary_path (absolute path of summary.json), summary (its content).
run_failed
    error ("ExceptionType: message"), round (the last round finished, 0 if none). Written for
    anything that stops a started run, Ctrl-C included; a killed process writes nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

EVENTS_NAME = "events.jsonl"

RUN_STARTED = "run_started"
ROUND_FINISHED = "round_finished"
RUN_FINISHED = "run_finished"
RUN_FAILED = "run_failed"
ENDS = (RUN_FINISHED, RUN_FAILED)  # the events after which a run writes no other

Event = dict[str, Any]


def _strict(value: Any) -> Any:
    """`value` with every NaN (and infinity) as None, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    """Writes a run's events to `path`, each line flushed at once, and hands each event to `listeners`.

    `append=False` starts the file afresh (a new run), `append=True` continues it (a resumed run).
    """

    def __init__(self, path: str | Path, *, append: bool, listeners: Iterable[Callable[[Event], None]] = ()) -> None:
        self.path = Path(path)
        self.listeners = list(listeners)
        if not append:
            self.path.write_text("")

    def emit(self, name: str, **fields: Any) -> Event:
        event = _strict({"event": name, "time": time.time(), **fields})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event, allow_nan=False) + "\n")
        for listener in self.listeners:
            listener(event)
        return event


class EventFollower:
    """Reads the events a run appends to `path`, as they come: `poll()` returns those written since
    the last call. A line still being written is left for the next call; a file not yet there has
    no events; a file started afresh (shorter than what was read) is read again from its start."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0

    def poll(self) -> list[Event]:
        try:
            with open(self.path, "rb") as fh:
                if fh.seek(0, 2) < self.offset:
                    self.offset = 0
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def read_events(path: str | Path) -> list[Event]:
    """Every complete event in the file (none if there is no file)."""
    return EventFollower(path).poll()


def progress_line(event: Event) -> str | None:
    """The line the CLI prints for an event (None: nothing to print; a failure is reported by
    whoever raises it). Rounds without evaluation print nothing."""
    name = event["event"]
    if name == RUN_STARTED and event["resumed"]:
        return (
            f"[fedcmd] {event['strategy']} on {event['dataset']}: resuming after round "
            f"{event['first_round'] - 1} (last accuracy {_figure(event['accuracy'])})"
        )
    if name == RUN_STARTED:
        return (
            f"[fedcmd] {event['strategy']} on {event['dataset']}, {event['parameters']} parameters; "
            f"round 0: accuracy {_figure(event['accuracy'])}"
        )
    if name == ROUND_FINISHED and event["evaluated"]:
        return (
            f"[fedcmd] round {event['round']}/{event['rounds']}: accuracy {_figure(event['accuracy'])}, "
            f"{event['replies']}/{event['sampled']} replies, {event['mb_cumulative']:.2f} MB so far, "
            f"{event['round_seconds']:.1f} s"
        )
    if name == RUN_FINISHED:
        return json.dumps(event["summary"], indent=2)
    return None


def print_progress(event: Event) -> None:
    line = progress_line(event)
    if line is not None:
        print(line, flush=True)


def _figure(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"
