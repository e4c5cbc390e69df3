"""Small helpers shared by the launchers, the server pool and the SLURM executor."""
from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port free on every interface of this host (other nodes may connect to it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" when it does not exist)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])
