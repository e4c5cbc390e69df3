"""The ways a run stops early, shared by the coordinator, the engine, the launchers and the CLI
(which maps each to an exit code)."""
from __future__ import annotations


class ResumeRefused(RuntimeError):
    """The run directory holds a run made with a config that differs in a result-changing way."""


class Preempted(RuntimeError):
    """A stop was requested (the SLURM warning signal); the run stopped at a safe point."""


class BudgetExhausted(RuntimeError):
    """A label or cost budget (oracle.max_labels / oracle.max_cost) stopped the run: before a round or stage
    that would pass it, or inside an oracle stage before the call that would (answers so far stored)."""


class StageFailed(RuntimeError):
    """A launched stage exited non-zero."""


class RunBusy(RuntimeError):
    """Another coordinator holds the run directory's lock (rundir.RunDir.lock); nothing was written."""


class NotARunDir(RuntimeError):
    """--run-dir names something that is not an apo-dist run directory (nothing was written there)."""
