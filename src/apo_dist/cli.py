"""`apo-dist` command line: run, status, report, assets."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apo-dist", description="Active preference learning with DPO.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume an experiment")
    run.add_argument("config", help="YAML config file (see configs/)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.beta=0.2")
    run.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    status = sub.add_parser("status", help="show where a run stands")
    status.add_argument("run_dir")

    report = sub.add_parser("report", help="write report.md and winrate.png for a run")
    report.add_argument("run_dir")

    assets = sub.add_parser("assets", help="fetch and convert the offline model and prompt pool")
    assets.add_argument("--cache-dir", default="", help="default: $APO_DIST_CACHE or ~/.cache/apo-dist")

    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides given after an option, e.g. `run CONFIG --run-dir D key=value`
        args.overrides += extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError

    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report, "assets": cmd_assets}[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    from .config import load_config
    from .loop import Coordinator, ResumeRefused

    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or os.path.join("runs", cfg.name)
    print(f"run {cfg.name}: {cfg.acquisition.function} acquisition, {cfg.loop.rounds} rounds x "
          f"{cfg.acquisition.labels_per_round} labels, generation backend {cfg.generation.backend}, "
          f"run directory {run_dir}", flush=True)
    try:
        Coordinator(cfg, run_dir, progress=not args.no_progress).run()
    except ResumeRefused as e:
        print(f"refusing to resume: {e}", file=sys.stderr)
        return 3
    except NotImplementedError as e:
        print(f"not available: {e}", file=sys.stderr)
        return 4
    return 0


def cmd_status(args) -> int:
    from .report import eval_results
    from .rundir import RunDir

    rd = RunDir(args.run_dir)
    if not rd.state_path.exists():
        print(f"{args.run_dir}: no run here (no state.json)", file=sys.stderr)
        return 1
    state = rd.read_state()
    print(f"run directory: {rd.root}")
    print(f"status: {state.get('status', '?')}{' (' + state['reason'] + ')' if state.get('reason') else ''}")
    print(f"last stage: round {state.get('round')} {state.get('stage')} ({state.get('stage_status')})")
    for e in eval_results(rd.root):
        print(f"round {e['round']}: labels {e['labels']} win-rate {e['win_rate']:.3f} ± {e['stderr']:.3f}")
    if rd.labels_db.exists():
        from .oracle import LabelStore

        store = LabelStore(rd.labels_db)
        counts = store.request_counts()
        print(f"label store: {len(store.export())} answers, {int(counts['n'].sum()) if len(counts) else 0} oracle requests")
        store.close()
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_assets(args) -> int:
    from .assets import cache_dir, ensure_all

    ensure_all(cache_dir(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
