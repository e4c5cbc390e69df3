"""Test hooks for fault injection: kill the process, or hold it, at a named point of a stage.

APO_DIST_FAULT="<round>:<stage>:<point>[@rank]" SIGKILLs the process there (on rank K only with @K);
APO_DIST_HOLD="<round>:<stage>:<point>=FILE" creates FILE there and waits while it exists (once).
Points: "start" and "end" of every stage, "mid" after each committed oracle batch of the labels
stage, "stepN" after optimizer step N of training.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "APO_DIST_FAULT"
HOLD_ENV = "APO_DIST_HOLD"


def fault_point(round_: int | str, stage: str, point: str) -> None:
    where = f"{round_}:{stage}:{point}"
    fault, _, rank = os.environ.get(FAULT_ENV, "").partition("@")
    if fault == where and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    hold_at, _, hold = os.environ.get(HOLD_ENV, "").partition("=")
    if hold_at == where and not os.path.exists(hold + ".done"):
        Path(hold + ".done").touch()
        Path(hold).touch()
        while os.path.exists(hold):
            time.sleep(0.2)
