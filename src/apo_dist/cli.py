"""`apo-dist` command line: run, status, report, assets."""
from __future__ import annotations

import argparse
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

    sweep = sub.add_parser("sweep", help="run acquisition functions x seeds (random always included), then aggregate")
    sweep.add_argument("config")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    sweep.add_argument("--acquisition", default="random,certainty", help="comma-separated functions")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    sweep.add_argument("--root", help="sweep folder (default: runs/<config name>_sweep)")
    sweep.add_argument("--no-progress", action="store_true")

    aggregate = sub.add_parser("aggregate", help="results.md/csv and winrate.png for a sweep folder")
    aggregate.add_argument("root")

    status = sub.add_parser("status", help="show where a run stands")
    status.add_argument("run_dir")

    report = sub.add_parser("report", help="write report.md and winrate.png for a run")
    report.add_argument("run_dir")

    export = sub.add_parser("export-labels", help="write every answer of a label store to a parquet file")
    export.add_argument("store", help="a labels.sqlite (a run's, or a shared oracle.store)")
    export.add_argument("out", help="output .parquet (load with datasets.load_dataset('parquet', data_files=OUT))")

    assets = sub.add_parser("assets", help="fetch and convert the offline model and prompt pool")
    assets.add_argument("--cache-dir", default="", help="default: $APO_DIST_CACHE or ~/.cache/apo-dist")

    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("run", "sweep") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides given after an option, e.g. `run CONFIG --run-dir D key=value`
        args.overrides += extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError

    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report, "assets": cmd_assets,
                "export-labels": cmd_export_labels, "sweep": cmd_sweep, "aggregate": cmd_aggregate}[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    from .config import load_config
    from .generation import choose_backend
    from .launcher import StageFailed
    from .loop import BudgetExhausted, Coordinator, ResumeRefused
    from .oracle import OracleError

    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or os.path.join("runs", cfg.name)
    backend, why = choose_backend(cfg)
    print(f"run {cfg.name}: {cfg.acquisition.function} acquisition, {cfg.loop.rounds} rounds x "
          f"{cfg.acquisition.labels_per_round} labels, generation backend {backend} ({why}), "
          f"run directory {run_dir}", flush=True)
    # Each way a run can end early: (exception, exit code, message format).
    endings = [(ResumeRefused, 3, "refusing to resume: {}"),
               (NotImplementedError, 4, "not available: {}"),
               (StageFailed, 5, "stage failed: {}"),
               (BudgetExhausted, 6, "stopped: {}; everything so far is saved (raise the budget and run again to continue)"),
               (OracleError, 7, "oracle failed: {}; answers received so far are saved")]
    try:
        Coordinator(cfg, run_dir, progress=not args.no_progress).run()
    except tuple(kind for kind, _, _ in endings) as e:
        code, message = next((c, m) for kind, c, m in endings if isinstance(e, kind))
        print(message.format(e), file=sys.stderr)
        return code
    return 0


def cmd_sweep(args) -> int:
    """Every function x seed with the same config otherwise, sharing one label store, one after
    another in this process; then the aggregate table and plot."""
    from .aggregate import write_outputs
    from .config import load_config
    from .loop import Coordinator

    functions = list(dict.fromkeys(["random", *filter(None, args.acquisition.split(","))]))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    name = load_config(args.config, args.overrides).name
    root = Path(args.root or os.path.join("runs", f"{name}_sweep"))
    for function in functions:
        for seed in seeds:
            arm = f"{function}_seed{seed}"
            cfg = load_config(args.config, [*args.overrides, f"acquisition.function={function}", f"seed={seed}",
                                            f"name={name}_{arm}", f"oracle.store={root.resolve() / 'labels.sqlite'}"])
            print(f"sweep {root}: {arm}", flush=True)
            Coordinator(cfg, root / arm, progress=not args.no_progress).run()
    print(write_outputs(root))
    return 0


def cmd_aggregate(args) -> int:
    from .aggregate import write_outputs

    print(write_outputs(args.root))
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
        t, mine = store.totals(), store.totals(run=str(rd.root.resolve()))
        print(f"label store: {t['answers']} answers, {t['requests']} oracle requests, {t['unlabelable']} unlabelable; "
              f"this run paid for {mine['answers']} ({mine['input_tokens']} + {mine['output_tokens']} tokens, "
              f"${mine['cost']:.4f})")
        store.close()
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_export_labels(args) -> int:
    from .oracle import LabelStore
    from .rundir import write_table

    if not Path(args.store).is_file():
        print(f"{args.store}: no label store here", file=sys.stderr)
        return 1
    store = LabelStore(args.store)
    table = store.export()
    store.close()
    write_table(Path(args.out), table)
    print(f"{len(table)} answers -> {args.out}")
    return 0


def cmd_assets(args) -> int:
    from .assets import cache_dir, ensure_all

    ensure_all(cache_dir(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
