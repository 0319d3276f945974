"""Files written so that a crash never leaves half of one: the server's checkpoints and the clients'
state files both use this (it imports nothing of either side)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file with `write(binary file)` through a temporary file, fsync and a rename: a crash
    leaves the previous file, never half a new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
