"""Per-round checkpoints of a run, so that `fedcmd run ... --resume` can continue it.

A checkpoint is data, never code: two files in the output folder, written after every round.
- `checkpoint.json`: the format version, the strategy's name, the run's config, the last completed
  round, the metrics rows so far, the run time spent, the RNG states of torch, numpy and `random`,
  and the strategy's state tree (`FedcmdStrategy.state_dict`: the global model, the volume
  accountant's rows, the round logs, the codec's broadcast and residual, and each strategy's own
  parts, such as CMD's online statistics, schedule and coefficient event log or APF's controller
  and masks) with every array replaced by a reference `{"$array": name}`. Figures not measured
  are NaN, as Python's json writes them.
- `checkpoint.round-<r>.npz`: those arrays (no object arrays: it is read with
  `np.load(allow_pickle=False)`), and the token of the json that names it.
Arrays are written first, the json last, each through a temporary file, fsync and a rename: the
json's rename is the commit, so a crash mid-write leaves the previous checkpoint (its json and the
arrays it names) intact. The shared token is checked on load, so a json never loads arrays it was
not written with.

Loading checks the format version, that the config differs only in `RESUMABLE_KEYS`, builds a
fresh strategy from the config (`fedcmd.server.make_strategy`) and loads the tree into it: every
component checks what it reads (shapes, dtypes, lengths against the model and the config,
versions) and a problem is a `CheckpointError` naming where it is in the tree. A checkpoint of an
older fedcmd (`checkpoint.pkl`, a pickle) is refused unread.
"""

from __future__ import annotations

import json
import os
import random
import re
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcmd.files import write_atomically

CHECKPOINT_NAME = "checkpoint.json"
LEGACY_NAME = "checkpoint.pkl"  # fedcmd's format 1, a pickle: refused, never opened
FORMAT = 2
ARRAY = "$array"  # {"$array": name}: the array `name` of the npz file
TOKEN = "checkpoint-token"
_ARRAYS_NAME = re.compile(r"checkpoint\.round-(\d+)\.npz")
# Keys a resumed run may change: extending a finished run, or waiting longer for replies.
RESUMABLE_KEYS = ("num-server-rounds", "round-timeout")


class CheckpointError(ValueError):
    """No usable checkpoint: missing, from another fedcmd format, damaged, or from a different config.

    `where` is the path in the checkpoint's tree of what is wrong (e.g. ("strategy", "online")).
    """

    def __init__(self, message: str, where: tuple[str, ...] = ()) -> None:
        self.message, self.where = message, tuple(where)
        super().__init__(f"{'.'.join(where)}: {message}" if where else message)


@dataclass
class Checkpoint:
    config: dict[str, Any]
    server_round: int  # last completed round
    strategy: Any  # a strategies.base.FedcmdStrategy
    metrics: list[dict[str, Any]]
    wall_seconds: float  # run time spent before this checkpoint


# ----- reading a state tree: what load_state_dict methods use ----------------------------------
_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    object: "anything",
}


def checked(value: Any, kind: type, where: tuple[str, ...] = ()) -> Any:
    """`value`, which must be of `kind` (int, float, bool, str, list, dict, or object for any value;
    an int is no bool, a float may be written as an int); CheckpointError at `where` otherwise."""
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool)
    )
    if not ok:
        raise CheckpointError(f"must be {_KINDS[kind]}, got {_shown(value)}", where)
    return float(value) if kind is float else value


def entry(state: Any, key: str, kind: type) -> Any:
    """state[key], `checked` to be of `kind`; CheckpointError naming `key` if it is not, or missing."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"must be a mapping, got {type(state).__name__}")
    if key not in state:
        raise CheckpointError("missing", (key,))
    return checked(state[key], kind, (key,))


def array_entry(state: Any, key: str, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    """state[key], which must be an array of exactly `dtype` (str: unicode of any width) and
    `shape` (None: any size there)."""
    value = entry(state, key, object)
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"must be an array, got {_shown(value)}", (key,))
    if (value.dtype.kind != "U") if dtype is str else (value.dtype != np.dtype(dtype)):
        raise CheckpointError(
            f"must be {'unicode' if dtype is str else np.dtype(dtype).name}, got {value.dtype}", (key,)
        )
    if len(value.shape) != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        sizes = ["any" if s is None else str(s) for s in shape]
        expected = f"({sizes[0]},)" if len(sizes) == 1 else f"({', '.join(sizes)})"
        raise CheckpointError(f"has shape {value.shape}, expected {expected}", (key,))
    return value


def by_round(state: Any, key: str, read: Callable[[Any], Any] | type) -> dict[int, Any]:
    """state[key], a list of [round, value] in increasing rounds, as {round: read(value)} (`read`
    a type: the value `checked` to be of it)."""
    if isinstance(read, type):
        kind = read

        def read(value: Any) -> Any:
            return checked(value, kind)

    rows, out, last = entry(state, key, list), {}, -1
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int and row[0] >= 0):
            raise CheckpointError(f"entry {i} must be [round, value], got {_shown(row)}", (key,))
        if row[0] <= last:
            raise CheckpointError(f"rounds must increase, got {row[0]} after {last}", (key,))
        last = row[0]
        with within(key, str(row[0])):
            out[row[0]] = read(row[1])
    return out


@contextmanager
def within(*where: str) -> Iterator[None]:
    """Name `where`, a path in the tree, in the CheckpointErrors raised inside. The math modules
    (fedcmd.cmd, fedcmd.apf) import nothing of fedcmd and raise ValueError: those become
    CheckpointErrors here."""
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(err.message, (*where, *err.where)) from err
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise CheckpointError(
            str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}", where
        ) from err


def load_part(state: Any, key: str, load: Callable[[Any], None]) -> None:
    """load(state[key]) (a mapping: a component's state_dict), naming `key` in what it raises."""
    value = entry(state, key, dict)
    with within(key):
        load(value)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


# ----- the tree on disk: JSON with array references, and an npz of the arrays ---------------------
def split_arrays(tree: Any, path: str = "") -> tuple[Any, dict[str, np.ndarray]]:
    """(the tree with every array replaced by {"$array": its path}, {path: array}).

    A tree holds dicts with string keys, lists, None, bool, int, float, str and numpy arrays of
    numbers, booleans or strings; anything else is a TypeError (a state_dict bug, not user data).
    """
    arrays: dict[str, np.ndarray] = {}

    def split(node: Any, where: str) -> Any:
        if isinstance(node, np.ndarray):
            if node.dtype.hasobject:
                raise TypeError(f"{where}: an object array cannot be checkpointed without pickle")
            arrays[where] = node
            return {ARRAY: where}
        if isinstance(node, dict):
            if any(not isinstance(k, str) for k in node) or ARRAY in node:
                raise TypeError(f"{where}: checkpointed mappings have string keys other than {ARRAY!r}")
            return {k: split(v, f"{where}/{k}" if where else k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [split(v, f"{where}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"{where}: a checkpoint holds JSON values and numpy arrays, not {type(node).__name__}")

    return split(tree, path), arrays


def join_arrays(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The inverse of `split_arrays`; CheckpointError for a reference to an array that is not there."""
    if isinstance(tree, dict):
        if ARRAY in tree:
            name = tree[ARRAY]
            if len(tree) != 1 or not isinstance(name, str) or name not in arrays:
                raise CheckpointError(f"refers to an array {_shown(name)} that the array file does not hold")
            return arrays[name]
        return {k: join_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_arrays(v, arrays) for v in tree]
    return tree


# ----- RNG states --------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The RNG states of torch, numpy's global generator and `random`, as a tree."""
    version, words, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state().numpy().copy(),
        "numpy": np.random.get_state(legacy=False),
        "python": {"version": version, "words": np.array(words, dtype=np.int64), "gauss": gauss},
    }


def restore_rng(state: Any) -> None:
    current = torch.get_rng_state()
    torch_state = array_entry(state, "torch", np.uint8, tuple(current.shape))
    python = entry(state, "python", dict)
    words = array_entry(python, "words", np.int64, (625,))
    gauss = python.get("gauss")
    if gauss is not None and not isinstance(gauss, float):
        raise CheckpointError(f"must be null or a number, got {_shown(gauss)}", ("python", "gauss"))
    try:
        np.random.set_state(entry(state, "numpy", dict))
        random.setstate((entry(python, "version", int), tuple(int(w) for w in words), gauss))
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"not a valid RNG state: {err}") from err
    torch.set_rng_state(torch.from_numpy(torch_state.copy()))


# ----- saving and loading ------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(out: str | Path) -> list[Path]:
    """Every checkpoint file in `out`: the json, array files (current, stale), temporaries, a legacy pickle."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(
        p
        for p in out.iterdir()
        if p.name in (CHECKPOINT_NAME, LEGACY_NAME, CHECKPOINT_NAME + ".tmp")
        or _ARRAYS_NAME.fullmatch(p.name.removesuffix(".tmp"))
    )


def save_checkpoint(out: str | Path, checkpoint: Checkpoint) -> tuple[Path, Path]:
    """Write `checkpoint` to `<out>/checkpoint.json` and its arrays file (see the module docstring);
    returns both paths."""
    out = Path(out)
    token = uuid.uuid4().hex
    arrays_path = out / f"checkpoint.round-{checkpoint.server_round}.npz"
    tree, arrays = split_arrays({"strategy": checkpoint.strategy.state_dict(), "rng": rng_state()})
    document = {
        "format": FORMAT,
        "token": token,
        "arrays": arrays_path.name,
        "fedcmd_strategy": checkpoint.strategy.name,
        "server_round": checkpoint.server_round,
        "wall_seconds": checkpoint.wall_seconds,
        "config": checkpoint.config,
        "metrics": checkpoint.metrics,
        **tree,
    }
    text = json.dumps(document, default=_json_scalar)
    write_atomically(arrays_path, lambda fh: np.savez(fh, allow_pickle=False, **arrays, **{TOKEN: np.array(token)}))
    write_atomically(out / CHECKPOINT_NAME, lambda fh: fh.write(text.encode()))
    _fsync_folder(out)
    for stale in checkpoint_files(out):
        if stale.name not in (CHECKPOINT_NAME, arrays_path.name):
            stale.unlink(missing_ok=True)
    return out / CHECKPOINT_NAME, arrays_path


def _json_scalar(value: Any) -> Any:
    """numpy integers and booleans in metrics rows, as the Python values they equal exactly."""
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    raise TypeError(f"a checkpoint holds JSON values and numpy arrays, not {type(value).__name__}")


def _read(out: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint's document, its arrays put back in; CheckpointError if there is none to read."""
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        if (out / LEGACY_NAME).is_file():
            raise CheckpointError(
                f"cannot resume: {out / LEGACY_NAME} is a checkpoint of an older fedcmd format (a pickle), which "
                "this fedcmd does not load (loading a pickle runs code named in it): start a new run "
                "(--overwrite, or another output folder)"
            )
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot resume: {path} is not a readable fedcmd checkpoint ({err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        got = document.get("format") if isinstance(document, dict) else None
        raise CheckpointError(
            f"cannot resume: {path} is not a fedcmd checkpoint of format {FORMAT} (its format is {_shown(got)})"
        )
    try:
        for key, kind in (
            ("token", str),
            ("arrays", str),
            ("fedcmd_strategy", str),
            ("server_round", int),
            ("wall_seconds", float),
            ("config", dict),
            ("metrics", list),
            ("strategy", dict),
            ("rng", dict),
        ):
            entry(document, key, kind)
        name = document["arrays"]
        if not _ARRAYS_NAME.fullmatch(name):
            raise CheckpointError(
                f"must name a file checkpoint.round-<r>.npz in the same folder, got {_shown(name)}", ("arrays",)
            )
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {path} is damaged: {err}") from err
    arrays_path = out / name
    try:
        with np.load(arrays_path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"cannot resume: {arrays_path}, the arrays of {path}, is not readable without pickle ({err})"
        ) from err
    token = arrays.pop(TOKEN, None)
    if token is None or token.shape != () or str(token) != document["token"]:
        raise CheckpointError(f"cannot resume: {arrays_path} was not written with {path} (their tokens differ)")
    try:
        for key in ("strategy", "rng"):
            document[key] = join_arrays(document[key], arrays)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {path} is damaged: {key}: {err}") from err
    return path, document


def load_checkpoint(out: str | Path, config: dict[str, Any]) -> Checkpoint:
    """The checkpoint in `out`, checked against `config`, with RNG states restored.

    The strategy is a new one built from `config`, holding the checkpoint's state and no node maps:
    node ids belong to the connections of the run that wrote it, and a resumed run is a new run
    whose nodes start with empty client state (a new Flower run gets fresh `context.state` on every
    node). So the checkpoint holds nothing per client (held model versions, acknowledged store or
    mask versions): every partition is a first contact, and stateful strategies (CMD, APF) resend
    what a client needs instead of a delta its client can no longer apply.
    """
    from fedcmd.server import make_strategy  # the server imports this module

    path, document = _read(Path(out))
    stored, server_round = document["config"], document["server_round"]
    differing = [key for key in config if key not in RESUMABLE_KEYS and stored.get(key) != config[key]]
    if differing:
        key = differing[0]
        raise CheckpointError(
            f"cannot resume: config key '{key}' is {config[key]!r} but the checkpoint's run used "
            f"{stored.get(key)!r} (only {', '.join(RESUMABLE_KEYS)} may change)"
        )
    if config["num-server-rounds"] < server_round:
        raise CheckpointError(
            f"cannot resume: the checkpoint is at round {server_round}, past "
            f"num-server-rounds = {config['num-server-rounds']}"
        )
    metrics = document["metrics"]
    if [m.get("round") if isinstance(m, dict) else None for m in metrics] != list(range(server_round + 1)):
        raise CheckpointError(f"cannot resume: {path} is damaged: metrics must hold rounds 0..{server_round}")
    strategy = make_strategy(config)
    if strategy.name != document["fedcmd_strategy"]:
        raise CheckpointError(
            f"cannot resume: {path} holds a {document['fedcmd_strategy']!r} strategy, the config "
            f"builds {strategy.name!r}"
        )
    try:
        load_part(document, "strategy", strategy.load_state_dict)
        if sorted(strategy.rounds) != list(range(1, server_round + 1)):
            raise CheckpointError(
                f"logs rounds {sorted(strategy.rounds)[:5]}..., expected 1..{server_round}", ("strategy", "rounds")
            )
        load_part(document, "rng", restore_rng)  # last: building the strategy drew from torch's generator
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {path} does not fit this run: {err}") from err
    return Checkpoint(config, server_round, strategy, metrics, document["wall_seconds"])
