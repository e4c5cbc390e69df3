"""Small helpers shared by the launchers, the server pool and the SLURM executor."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Looked up once here, not in a forked child (preexec_fn), where dlopen's locks may be held.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def free_port() -> int:
    """A TCP port free on every interface of this host (other nodes may connect to it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" when it does not exist)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def die_with_parent(signum: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Get `signum` when the process (strictly: the thread) that started us dies, even by SIGKILL.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. Call it in a child before exec
    (subprocess's preexec_fn: the plain function for SIGTERM, or
    `functools.partial(die_with_parent, signal.SIGKILL, os.getpid())`), or first thing in a child's
    own code. It covers the direct child only, and only from the moment it is set: with `parent`
    (the pid that started us) it also sends `signum` at once if that parent is already gone.
    """
    if _prctl is None:
        return
    _prctl(PR_SET_PDEATHSIG, int(signum))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)


def parent_pid_of(pid: int) -> int | None:
    """The parent of process `pid` as /proc says (None when it is gone or /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid, ...


def stop_group(proc, grace: float) -> None:
    """SIGTERM the process group led by `proc` (started with start_new_session=True), SIGKILL it after
    `grace` seconds; once the leader is gone, SIGKILL whatever of its group is left."""
    import subprocess

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
