"""The stage engine: runs a stage when its outputs are missing or stale, and records it.

A stage is a body (a function of (RunContext, round) returning its outputs by name and its
metrics), the outputs it declares (names in rundir.RUN_FILES / ROUND_FILES) and the upstream
stages whose results it uses. `Engine.ensure` checks the stage's manifest against those upstream
manifests; when anything is missing, truncated, edited or was computed from different inputs, it
clears the old outputs, runs the body (in this process, or as an `accelerate launch` job when the
stage asks for ranks), writes what the body returned, then the manifest, one metrics line and
state.json. Budgets are checked and stop requests honoured before each stage runs.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from . import devices
from .cluster.local import launch_stage
from .context import RunContext
from .counts import round_counts
from .errors import BudgetExhausted, StageFailed
from .faults import fault_point
from .rundir import atomic_write_json, atomic_write_text, write_table
from .training import TrainingStopped

log = logging.getLogger("apo_dist.engine")

Round = int | str  # a round number, or RUN for the run-level stages


@dataclass(frozen=True)
class Stage:
    name: str
    body: Callable[[RunContext, Round], tuple[dict, dict]]  # -> (outputs by name, metrics)
    outputs: tuple[str, ...]
    inputs: dict[str, tuple[Round, str]] = field(default_factory=dict)  # label -> (round, stage) used
    processes: int = 0  # > 0: run as an `accelerate launch` job of this many ranks


def run_stage(ctx: RunContext, stage: Stage, round_: Round) -> dict:
    """Run the body and write its outputs (rank 0 writes when every rank of a launch runs it).
    The metrics gain "device": where the models the body used sat (devices.note), if it used any."""
    devices.take_noted()  # forget models noted outside this stage
    outputs, metrics = stage.body(ctx, round_)
    used = devices.take_noted()
    if used is not None:
        metrics = {**(metrics or {}), "device": used}
    if set(outputs) - set(stage.outputs):
        raise ValueError(f"stage {stage.name} returned undeclared outputs {sorted(set(outputs) - set(stage.outputs))}")
    if ctx.is_main:
        for name in stage.outputs:
            write_output(ctx.rd.path(name, round_), outputs.get(name))
    return metrics


def write_output(path: Path, value) -> None:
    """Write one stage output atomically, by the kind its file name says; None: the body wrote it."""
    if value is None:
        return
    if path.suffix == ".parquet":
        write_table(path, value)
    elif path.suffix == ".json":
        atomic_write_json(path, value)
    elif path.suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in value))
    else:
        raise ValueError(f"no writer for {path.name}: folders are written by the stage itself")


class Engine:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.rd = ctx.rd

    def ensure(self, stage: Stage, round_: Round) -> None:
        """Make `stage` of `round_` current: skip it if its manifest holds, else (re)do it."""
        scope = self.rd.scope(round_)
        files = [self.rd.path(name, round_).name for name in stage.outputs]
        inputs = {label: self.rd.manifest_digest(self.rd.scope(q), name) for label, (q, name) in stage.inputs.items()}
        why = self.rd.check_manifest(scope, stage.name, inputs)
        if why is None:
            return
        self.ctx.check_stop(f"before round {round_} {stage.name}")
        if why != "not done":
            log.warning("redoing %s/%s: %s", scope.name, stage.name, why)
        self.check_budget(round_, stage.name)
        self.rd.clear_stage(scope, stage.name, files)
        self.rd.update_state(round=round_, stage=stage.name, stage_status="running")
        fault_point(round_, stage.name, "start")
        t0 = time.time()
        try:
            if stage.processes:
                metrics = launch_stage(self.ctx.cfg.launcher, self.rd, stage.name, round_, stage.processes)
            else:
                metrics = run_stage(self.ctx, stage, round_)
        except (TrainingStopped, StageFailed):
            self.ctx.check_stop(f"in round {round_} {stage.name} (checkpointed)")  # a launched stage's ranks stopped
            raise
        fault_point(round_, stage.name, "end")
        if metrics.get("device"):
            log.info("round %s %s: model on %s", round_, stage.name, metrics["device"])
        self.rd.write_manifest(scope, stage.name, files, inputs)
        self.rd.log_metrics({"round": round_, "stage": stage.name, "seconds": round(time.time() - t0, 3), **metrics})
        self.rd.update_state(round=round_, stage=stage.name, stage_status="done")

    def check_budget(self, round_: Round, stage: str) -> None:
        """Raise BudgetExhausted before a stage that would spend past oracle.max_labels / max_cost.

        Cost is checked before each round and each oracle stage (labels, eval), and inside those
        before every oracle batch (RunContext.affordable); labels before each round, which must
        fit whole: a run never holds more than max_labels labels.
        """
        o = self.ctx.cfg.oracle
        if o.max_cost and stage in ("pool", "labels", "eval"):
            spent = self.ctx.store.totals(run=self.ctx.run_id)["cost"]
            if spent >= o.max_cost:
                raise BudgetExhausted(f"cost budget reached: ${spent:.4f} spent on oracle answers, "
                                      f"oracle.max_cost={o.max_cost}")
        if o.max_labels and stage == "pool":
            have = sum(len(self.rd.table("labels", q)) for q in range(int(round_)))
            adds = round_counts(self.ctx.cfg, int(round_)).labels
            if have + adds > o.max_labels:
                raise BudgetExhausted(f"label budget reached: {have} labels so far, round {round_} would add "
                                      f"{adds}, oracle.max_labels={o.max_labels}")
