"""`flwr run .` on Flower's local simulation: the environment it needs, and the SuperLink it leaves.

    python -m fedcmd.local_superlink run [FLWR-RUN-OPTIONS ...]   # `flwr run . --stream ...`, then stop it
    python -m fedcmd.local_superlink stop                         # stop the local SuperLink of $FLWR_HOME

What Flower 1.41 does (flwr/cli/local_superlink.py): with the default `local` connection of
$FLWR_HOME/config.toml (`address = ":local:"`; the file is created on first use), `flwr run` starts
`flower-superlink --simulation` found on PATH, detached in a session of its own, on 127.0.0.1:39091
(control API 127.0.0.1:39093; FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT
change them), with `--log-file $FLWR_HOME/local-superlink/superlink.log`, unless something already
answers on that port, and leaves it running. Flower has no command that stops it and writes no PID
file. The SuperLink's own subprocesses (flower-superexec, flwr-simulation, Ray) exit when it does.

Decisions:
- Runtime dependency installation is off (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 in the
  environment the SuperLink inherits): the venv already holds every dependency, while an installing
  SuperLink runs `uv sync` into a fresh environment for every run (measured: 115 packages to
  download, torch and 18 CUDA packages among them).
- A SuperLink is found by its command line in /proc: `flower-superlink --simulation` whose log file
  is under the given FLWR_HOME. It is stopped with its process group and the groups of everything it
  started (SIGTERM, then SIGKILL): flwr-simulation may still be running for a moment after it.
- `run` stops this FLWR_HOME's SuperLink before the run (one started earlier by a plain `flwr run .`
  may install dependencies, and its working directory, where relative `out-dir`s land, may be
  another) and after it, so it leaves nothing running. It refuses to start when another FLWR_HOME's
  SuperLink holds the port: `flwr run` would submit the run there. Its exit status is the run's:
  0 only if the SuperLink records it `finished:completed` (`flwr run --stream` exits 0 either way).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedcmd.deploy import LOOPBACK, PROJECT, DeploymentError, descendants, flower_bin, run_record, stop_process_groups

DEFAULT_PORT = 39091  # Flower's LOCAL_SUPERLINK_HTTP_API_PORT
STARTED = re.compile(rb"Successfully started run (\d+)")


@dataclass(frozen=True)
class LocalSuperLink:
    pid: int
    home: Path  # the FLWR_HOME whose local simulation it serves
    port: int


def flower_home(env: dict[str, str] | None = None) -> Path:
    """The Flower home `flwr` uses with this environment: FLWR_HOME, else ~/.flwr."""
    value = (os.environ if env is None else env).get("FLWR_HOME")
    return Path(value).expanduser().resolve() if value else Path.home() / ".flwr"


def local_port(env: dict[str, str] | None = None) -> int:
    return int((os.environ if env is None else env).get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_PORT))


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def local_superlinks() -> list[LocalSuperLink]:
    """Every local-simulation SuperLink on this machine that `flwr run` started (or one like it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(Path(arg).name == "flower-superlink" for arg in argv[:2]) or "--simulation" not in argv:
                continue
            log_file = _option(argv, "--log-file")
            if log_file is None or (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            log_path = (entry / "cwd").resolve() / log_file  # Flower passes a relative FLWR_HOME as is
        except OSError:  # gone, or not ours to read
            continue
        if log_path.parent.name == "local-superlink":
            found.append(
                LocalSuperLink(
                    int(entry.name), log_path.parent.parent.resolve(), int(_option(argv, "--port") or DEFAULT_PORT)
                )
            )
    return found


def stop_local_superlinks(home: Path, *, grace: float = 10.0) -> list[LocalSuperLink]:
    """Stop the local SuperLink(s) of Flower home `home` with their process groups; returns them.

    `flwr` starts a SuperLink in a session of its own; one that does not lead its process group was
    started some other way and is left alone (error). The SuperLink starts flower-superexec in yet
    another session, and that one flwr-simulation: the groups of all its descendants are stopped, all
    at once, found before anything is signalled (an orphan is no longer anyone's child).
    """
    home = Path(home).expanduser().resolve()
    mine = [link for link in local_superlinks() if link.home == home]
    foreign = [link for link in mine if _pgid(link.pid) not in (link.pid, None)]
    if foreign:
        raise DeploymentError(
            f"the SuperLink with PID {foreign[0].pid} (FLWR_HOME {home}) does not lead its "
            f"process group, so `flwr run` did not start it: stop it where it was started"
        )
    groups = {link.pid for link in mine}
    for link in mine:
        groups |= {pgid for pgid in map(_pgid, descendants(link.pid)) if pgid is not None}
    stop_process_groups(sorted(groups), grace=grace)
    return mine


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def flwr_run_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with this interpreter's scripts first on PATH (`flwr` starts
    `flower-superlink` from PATH) and runtime dependency installation, telemetry and update checks off."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(flower_bin('flwr')).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return env


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


def flwr_run(options: list[str], *, project: Path = PROJECT, env: dict[str, str] | None = None) -> int:
    """`flwr run PROJECT --stream OPTIONS` on a fresh local SuperLink, stopped afterwards.

    Returns 0 if the run finished completed, else 1 with the run's status on stderr: `flwr run
    --stream` itself exits 0 when the run fails (e.g. the ServerApp raises; Flower logs "Exit Code: 700").
    """
    env = flwr_run_env(env)
    home, port = flower_home(env), local_port(env)
    if "FLWR_HOME" in env:
        env["FLWR_HOME"] = str(home)  # `flwr` runs in `project`: a relative one would mean another folder
    stop_local_superlinks(home)
    if _port_answers(port):
        others = [f"PID {link.pid} (FLWR_HOME {link.home})" for link in local_superlinks() if link.port == port]
        raise DeploymentError(
            f"{LOOPBACK}:{port} is taken by {', '.join(others) or 'another process'}: `flwr run` would submit "
            f"the run there. Stop it, or choose free ports with FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and "
            f"FLWR_LOCAL_CONTROL_API_PORT"
        )
    run_id = None
    try:
        proc = subprocess.Popen(
            [flower_bin("flwr"), "run", str(project), "--stream", *options],
            env=env,
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with proc:
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
                if run_id is None and (started := STARTED.search(line)):
                    run_id = started.group(1).decode()
        if run_id is None:
            raise DeploymentError(f"flwr run exited with code {proc.returncode} without starting a run")
        status = run_status(run_id, env=env, cwd=project)
    finally:
        stop_local_superlinks(home)
    if status != "finished:completed":
        print(
            f"fedcmd local_superlink: run {run_id} ended {status}; see the log above and "
            f"{home / 'local-superlink' / 'superlink.log'}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_status(run_id: str, *, env: dict[str, str], cwd: Path, wait: float = 30.0) -> str:
    """The SuperLink's status of a run, once it is `finished:...` (the stream may end a moment before)."""
    return run_record(run_id, env=env, cwd=cwd, wait=wait)["status"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    home = flower_home()
    try:
        if argv[:1] == ["run"]:
            return flwr_run(argv[1:])
        if argv == ["stop"]:
            stopped = stop_local_superlinks(home)
            for link in stopped:
                print(f"[fedcmd] stopped the local SuperLink of {link.home} (PID {link.pid}, port {link.port})")
            if not stopped:
                print(f"[fedcmd] no local SuperLink of {home} is running")
            return 0
    except DeploymentError as err:
        print(f"fedcmd local_superlink: error: {err}", file=sys.stderr)
        return 2
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
