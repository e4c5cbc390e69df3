"""Entry point for one stage of one round on every rank, as `accelerate launch` runs it:

    accelerate launch [--config_file F] --num_processes K -m apo_dist.cluster.worker STAGE --run-dir D --round R

It reads the run directory's config.yaml and runs the same declared stage the coordinator would
run in-process (every rank computes, rank 0 writes the stage's outputs), and rank 0 leaves the
stage's metrics in <round>/logs/STAGE.metrics.json for the coordinator, which then writes the manifest.

A rank never outlives its launcher: it asks the kernel for SIGKILL when the launcher dies, and
exits at once when the launcher, or (local launches) the coordinator above it, is already gone.
Ranks never take the run directory's lock: the coordinator that launched them holds it. A rank
that has done its part leaves through distributed.exit_rank (no interpreter teardown).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

from ..util import die_with_parent, parent_pid_of


def stay_with_launcher() -> None:
    """SIGKILL this rank when its parent (the launcher) dies; exit now if it, or the coordinator
    that started it (COORDINATOR_ENV), already has: Python started before the prctl could be set."""
    launcher = os.getppid()
    die_with_parent(signal.SIGKILL)
    from .local import COORDINATOR_ENV

    coordinator = os.environ.get(COORDINATOR_ENV)
    if os.getppid() != launcher or (coordinator and parent_pid_of(launcher) != int(coordinator)):
        sys.exit(f"apo_dist.cluster.worker: the launcher (pid {launcher}) or its coordinator is gone; exiting")


def main(argv: list[str] | None = None) -> None:
    stay_with_launcher()
    parser = argparse.ArgumentParser(prog="apo_dist.cluster.worker")
    parser.add_argument("stage", choices=["entropy", "scores", "train"])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--round", type=int, required=True)
    args = parser.parse_args(argv)

    from ..config import from_yaml_text
    from ..context import RunContext
    from ..distributed import init_distributed
    from ..engine import run_stage
    from ..stages import find_stage

    run_dir = Path(args.run_dir)
    cfg = from_yaml_text((run_dir / "config.yaml").read_text())
    state = init_distributed(cfg.launcher.collective_timeout_s)
    ctx = RunContext(cfg, run_dir, progress=state.is_main_process, worker=True)
    metrics = run_stage(ctx, find_stage(cfg, args.stage, args.round), args.round)
    state.wait_for_everyone()
    if state.is_main_process:
        (ctx.rd.round_dir(args.round) / "logs" / f"{args.stage}.metrics.json").write_text(json.dumps(metrics or {}))


if __name__ == "__main__":
    faulthandler.enable()  # a rank killed by a signal leaves its threads' Python stacks in the stage log
    main()
    from ..distributed import exit_rank

    exit_rank()
