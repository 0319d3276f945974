"""Shared by the performance benchmarks (cmd_server_overhead, scale, cost_growth): phase timers
installed by monkeypatching, the memory of the process tree, machine facts, result files.

Nothing here edits library code: `PhaseTimers.wrap` replaces an attribute (a method on a class, a
function in a module) by a timed wrapper, and `restore` puts the original back. A wrapper costs
about a microsecond per call, far below what it times.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import sys
import threading
import time
import types
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

_MISSING = object()


class PhaseTimers:
    """Inclusive wall seconds and call counts per (round, call path).

    A path is the chain of timed calls enclosing a call, e.g.
    "aggregate_train/aggregate/advance_cmd/online_observe"; `round` is set by the caller (or by a
    `before` hook on the call that opens each round).
    """

    def __init__(self) -> None:
        self.round = 0
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.calls: dict[tuple[int, str], int] = defaultdict(int)
        self._stack: list[str] = []
        self._originals: list[tuple[Any, str, Any]] = []

    def wrap(
        self,
        owner: Any,
        attr: str,
        label: str | None = None,
        *,
        before: Callable[[tuple, dict], None] | None = None,
        after: Callable[[Any, tuple, dict, float], None] | None = None,
    ) -> None:
        """Time every call of `owner.attr` under `label` (default: attr) until `restore`."""
        original = getattr(owner, attr)
        label = label or attr
        timers = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if before is not None:
                before(args, kwargs)
            timers._stack.append(label)
            path = "/".join(timers._stack)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                timers._stack.pop()
                timers.seconds[(timers.round, path)] += elapsed
                timers.calls[(timers.round, path)] += 1
            if after is not None:
                after(result, args, kwargs, elapsed)
            return result

        self._originals.append((owner, attr, vars(owner).get(attr, _MISSING)))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        """Put every wrapped attribute back (an inherited one is removed again)."""
        for owner, attr, original in reversed(self._originals):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._originals.clear()

    def reset(self) -> None:
        self.round = 0
        self.seconds.clear()
        self.calls.clear()

    def inclusive(self, server_round: int, label: str) -> float:
        """Seconds of every call labelled `label` in the round, wherever it was called from (outermost
        occurrences only, so a label nested in itself is not counted twice)."""
        total = 0.0
        for (r, path), seconds in self.seconds.items():
            parts = path.split("/")
            if r == server_round and parts[-1] == label and label not in parts[:-1]:
                total += seconds
        return total

    def self_seconds(self, server_round: int, roots: tuple[str, ...]) -> dict[str, float]:
        """Self time (inclusive minus timed callees) per label, over the paths under `roots`.

        The values add up to the inclusive time of the roots: a partition of, e.g., the strategy's
        time into its components. Time in untimed code is charged to the nearest timed caller.
        """
        paths = {path: s for (r, path), s in self.seconds.items() if r == server_round and path.split("/")[0] in roots}
        out: dict[str, float] = defaultdict(float)
        for path, seconds in paths.items():
            callees = sum(s for other, s in paths.items() if "/" in other and other.rsplit("/", 1)[0] == path)
            out[path.rsplit("/", 1)[-1]] += seconds - callees
        return dict(out)


# ------------------------------------------------------------------------------------------ memory


def held_arrays(root: Any, name: str = "strategy") -> list[dict[str, Any]]:
    """Every numpy array and bytes object reachable from `root` through attributes (`__dict__` and
    `__slots__`), dicts, lists, tuples and sets, recursively; each counted once, under the first
    path that reaches it ("strategy.online._a"). A view counts as the array that owns its data (the
    memory held), so views and repeated references add nothing. Largest first: path, dtype, shape,
    bytes."""
    seen: set[int] = set()
    found: list[dict[str, Any]] = []
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    scalars = (str, int, float, complex, bool, type(None), np.generic, np.dtype)

    def visit(obj: Any, path: str) -> None:
        if isinstance(obj, np.ndarray):
            while isinstance(obj.base, np.ndarray):
                obj = obj.base
            if isinstance(obj.base, (bytes, bytearray, memoryview)):
                obj = obj.base  # an array over a buffer (np.frombuffer): the buffer is what is held
        while isinstance(obj, memoryview) and obj.obj is not None:
            obj = obj.obj  # the buffer it shows (e.g. a Flower Array's bytes)
        if isinstance(obj, scalars + skip) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.append(dict(path=path, dtype=str(obj.dtype), shape=list(obj.shape), bytes=int(obj.nbytes)))
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            size = obj.nbytes if isinstance(obj, memoryview) else len(obj)
            found.append(dict(path=path, dtype=type(obj).__name__, shape=[size], bytes=int(size)))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                visit(value, f"{path}[{key!r}]")
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for i, value in enumerate(obj):
                visit(value, f"{path}[{i}]")
        else:
            for key, value in getattr(obj, "__dict__", {}).items():
                visit(value, f"{path}.{key}")
            for cls in type(obj).__mro__:
                slots = getattr(cls, "__slots__", ())
                for slot in (slots,) if isinstance(slots, str) else slots:
                    if slot != "__dict__" and hasattr(obj, slot):
                        visit(getattr(obj, slot), f"{path}.{slot}")

    visit(root, name)
    return sorted(found, key=lambda row: -row["bytes"])


def held_bytes(root: Any) -> int:
    """Total bytes of `held_arrays(root)`."""
    return sum(row["bytes"] for row in held_arrays(root))


def wrap_cmd_strategy(t: PhaseTimers) -> PhaseTimers:
    """Time the federated CMD server's parts (strategy methods, encoding, accountant, online CMD)."""
    import fedcmd.accountant
    import strategies.cmd
    from fedcmd.accountant import VolumeAccountant
    from fedcmd.aggregation import ExactMean
    from fedcmd.cmd import EmbeddingSchedule, OnlineCMD
    from strategies.cmd import CMD

    for name in ("configure_train", "aggregate_train", "train_content", "parse_reply", "aggregate", "accumulators"):
        t.wrap(CMD, name)
    t.wrap(ExactMean, "add", "mean_add")
    t.wrap(ExactMean, "mean_into", "mean_into")
    t.wrap(CMD, "_advance_cmd", "advance_cmd")
    t.wrap(CMD, "_refresh_layout", "refresh_layout")
    for name in ("encode_events", "vector_record"):
        t.wrap(strategies.cmd, name)
    t.wrap(CMD, "rebuild_embedded")
    t.wrap(VolumeAccountant, "record_message", "accountant")
    t.wrap(fedcmd.accountant, "message_bytes", "wire_size")  # what record_message measures with
    t.wrap(OnlineCMD, "observe", "online_observe")
    t.wrap(OnlineCMD, "_fit", "online_fit")
    t.wrap(EmbeddingSchedule, "step", "schedule_step")
    return t


def _read_kb(path: str, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # the command name may hold spaces or ")"
            parents[int(entry)] = int(fields[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return parents


def process_tree(root: int | None = None) -> list[int]:
    """`root` (default: this process) and all its descendants alive now."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in _parents().items():
        children[ppid].append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_memory_bytes(root: int | None = None) -> dict[str, int]:
    """Sum over the process tree of RSS (shared pages counted in every process that maps them), of
    PSS (shared pages split between their users: the better total for Ray's shared object store)
    and of anonymous RSS (RssAnon: heap and stacks, no file-backed pages such as the shared
    libraries other processes of the same venv map too, so the least noisy of the three here)."""
    pids = process_tree(root)
    rss = sum(_read_kb(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
    anon = sum(_read_kb(f"/proc/{pid}/status", "RssAnon:") for pid in pids)
    pss = sum(_read_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
    return {"rss": rss * 1024, "pss": pss * 1024, "rss_anon": anon * 1024, "processes": len(pids)}


def process_label(pid: int) -> str:
    """What a process of the tree is: "this process", a Ray worker's name ("ray::ClientAppActor"),
    the script a Python process runs, or the program's name."""
    if pid == os.getpid():
        return "this process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "?"
    if not args:
        return "?"
    if args[0].startswith("ray::"):  # "ray::ClientAppActor.run" while it runs a method: one process, one label
        return args[0].split()[0].split(".")[0]
    name = os.path.basename(args[0])
    if name.startswith("python") and len(args) > 1:
        script = next((a for a in args[1:] if not a.startswith("-")), "")
        return f"python {os.path.basename(script)}"
    return name


class TreeMemorySampler:
    """Peak of `tree_memory_bytes` sampled every `interval` seconds in a background thread; also
    the peak anonymous RSS of each kind of process (`process_label`; same-named ones summed) and
    the series of (seconds since start, anonymous RSS of the tree, of this process).

    Sampling misses peaks shorter than the interval; `rusage_peaks` gives the kernel's exact
    per-process peaks to compare with.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = {"rss": 0, "pss": 0, "rss_anon": 0, "processes": 0}
        self.peak_by_process: dict[str, int] = defaultdict(int)
        self.series: list[tuple[float, int, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory-sampler", daemon=True)

    def _run(self) -> None:
        start = self.started
        while not self._stop.is_set():
            now = tree_memory_bytes()
            self.samples += 1
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)
            by_label: dict[str, int] = defaultdict(int)
            for pid in process_tree():
                by_label[process_label(pid)] += _read_kb(f"/proc/{pid}/status", "RssAnon:") * 1024
            for label, value in by_label.items():
                self.peak_by_process[label] = max(self.peak_by_process[label], value)
            self.series.append((round(time.perf_counter() - start, 2), now["rss_anon"], by_label["this process"]))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self.started = time.perf_counter()  # the series' time origin
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def steady(self, start: float, end: float) -> dict[str, float]:
        """Median and maximum anonymous RSS (tree, this process) of the samples taken between two
        `time.perf_counter()` instants: memory held through a phase, without its short spikes."""
        window = [s for s in self.series if start - self.started <= s[0] <= end - self.started]
        if not window:
            return {}
        tree, own = np.array([s[1] for s in window]), np.array([s[2] for s in window])
        return {
            "samples": len(window),
            "tree_rss_anon_median": float(np.median(tree)),
            "tree_rss_anon_max": int(tree.max()),
            "self_rss_anon_median": float(np.median(own)),
        }


def rusage_peaks() -> dict[str, int]:
    """Peak RSS in bytes of this process, and the largest peak of any waited-for descendant (Linux
    reports ru_maxrss in KiB; for RUSAGE_CHILDREN it is a maximum over processes, not a sum)."""
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children_max": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


# ------------------------------------------------------------------------------------------ output


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "flwr": metadata.version("flwr"),
    }


def command_line() -> str:
    return ".venv/bin/python " + " ".join([sys.argv[0], *sys.argv[1:]])


def default_out(name: str, quick: bool) -> Path:
    """results/<name>.json beside the scripts; a smoke run never overwrites a real result."""
    return Path(__file__).parent / "results" / f"{name}{'_quick' if quick else ''}.json"


def write_outputs(out_json: Path, result: dict[str, Any], markdown: str) -> None:
    """`out_json`, and the Markdown report beside it (same name, .md)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=_plain) + "\n")
    out_json.with_suffix(".md").write_text(markdown)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"
