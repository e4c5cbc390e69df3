"""Entry point for one stage of one round on every rank, as `accelerate launch` runs it:

    accelerate launch [--config_file F] --num_processes K -m apo_dist.cluster.worker STAGE --run-dir D --round R

It reads the run directory's config.yaml, runs the same stage function the coordinator runs
in-process (every rank computes, rank 0 writes the stage's tables), and rank 0 leaves the stage's
metrics in <round>/logs/STAGE.metrics.json for the coordinator, which then writes the manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apo_dist.cluster.worker")
    parser.add_argument("stage", choices=["entropy", "scores", "train"])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--round", type=int, required=True)
    args = parser.parse_args(argv)

    from .config import from_yaml_text
    from .distributed import init_distributed
    from .loop import Coordinator

    run_dir = Path(args.run_dir)
    cfg = from_yaml_text((run_dir / "config.yaml").read_text())
    state = init_distributed(cfg.launcher.collective_timeout_s)
    coordinator = Coordinator(cfg, run_dir, progress=state.is_main_process, worker=True)
    coordinator.prepare()
    metrics = coordinator.stage_function(args.stage, args.round)()
    state.wait_for_everyone()
    if state.is_main_process:
        logs = run_dir / f"round_{args.round:04d}" / "logs"
        (logs / f"{args.stage}.metrics.json").write_text(json.dumps(metrics or {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
