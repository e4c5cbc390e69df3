"""`apo-dist` command line: run, submit, sweep, aggregate, status, report, export-labels, migrate-labels, assets."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apo-dist", description="Active preference learning with DPO.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume an experiment")
    run.add_argument("config", help="YAML config file (see configs/)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.beta=0.2")
    run.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help="validate the config and print the plan (counts, tokens, FLOPs, GPUs, time, judge cost); "
                          "start nothing")
    run.add_argument("--stand-in", metavar="DIR", help="with --rehearse: this model folder instead of the tiny "
                     "random model (on a GPU the configured precision is kept)")
    run.add_argument("--rehearse", action="store_true",
                     help="run every count as configured on stand-ins (a tiny random model, the offline oracle, "
                          "synthetic prompts where the data is out of reach, short completions, 1 epoch), then "
                          "print the plan beside what was measured (default dir: runs/<config name>_rehearsal)")

    submit = sub.add_parser("submit", help="render the SLURM job for a run (slurm/) and sbatch it")
    submit.add_argument("config", help="YAML config file; its slurm section sizes the job (slurm/README.md)")
    submit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. slurm.partition=gpu")
    submit.add_argument("--run-dir", help="run directory on the shared filesystem (default: runs/<config name>)")

    sweep = sub.add_parser("sweep", help="run acquisition functions x seeds (random always included), then aggregate")
    sweep.add_argument("config")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    sweep.add_argument("--acquisition", default="random,certainty", help="comma-separated functions")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    sweep.add_argument("--root", help="sweep folder (default: runs/<config name>_sweep)")
    sweep.add_argument("--slurm", action="store_true", help="submit the grid as a SLURM job array (+ an aggregation job)")
    sweep.add_argument("--task", type=int, help="run only the K-th arm (what each array task does)")
    sweep.add_argument("--no-progress", action="store_true")

    aggregate = sub.add_parser("aggregate", help="results.md/csv and winrate.png for a sweep folder")
    aggregate.add_argument("root")

    status = sub.add_parser("status", help="show where a run (or each run of a sweep) stands, and its SLURM jobs")
    status.add_argument("run_dir", help="a run directory or a sweep folder")

    report = sub.add_parser("report", help="write report.md and winrate.png for a run")
    report.add_argument("run_dir")

    export = sub.add_parser("export-labels", help="write a label store's answers to a parquet or JSON lines file: "
                            "as stored, or as preference pairs (prompt, chosen, rejected) for DPO trainers")
    export.add_argument("store", help="a labels.sqlite (a run's, or a shared oracle.store) or a postgresql:// URL")
    export.add_argument("out", help="output .parquet or .jsonl (load with datasets.load_dataset('parquet' or "
                        "'json', data_files=OUT))")
    export.add_argument("--format", default="raw", help="raw (default): every row as stored; preference: prompt, "
                        "chosen, rejected, p_chosen, oracle, key per answered comparison (ties and unlabelable "
                        "ones left out)")
    export.add_argument("--keep-ties", action="store_true", help="with --format preference: keep ties "
                        "(p_chosen 0.5, chosen and rejected in the store's order)")

    migrate = sub.add_parser("migrate-labels", help="copy every row of a SQLite label store into a PostgreSQL one "
                             "(rows already there are skipped: running it again copies nothing twice)")
    migrate.add_argument("source", help="a labels.sqlite")
    migrate.add_argument("destination", help="postgresql://USER@HOST:PORT/DATABASE (the tables are created if missing)")

    assets = sub.add_parser("assets", help="fetch and convert the offline model and prompt pool")
    assets.add_argument("--cache-dir", default="", help="default: $APO_DIST_CACHE or ~/.cache/apo-dist")

    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("run", "submit", "sweep") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides given after an option, e.g. `run CONFIG --run-dir D key=value`
        args.overrides += extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .cluster.slurm import SlurmError

    try:
        return {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "report": cmd_report, "assets": cmd_assets,
                "export-labels": cmd_export_labels, "migrate-labels": cmd_migrate_labels, "sweep": cmd_sweep,
                "aggregate": cmd_aggregate}[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except SlurmError as e:  # sbatch or scontrol refused
        print(e, file=sys.stderr)
        return 9


def cmd_run(args) -> int:
    from .config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    rehearse = getattr(args, "rehearse", False)
    run_dir = args.run_dir or os.path.join("runs", cfg.name + ("_rehearsal" if rehearse else ""))
    if args.dry_run:  # before the heavy imports: choose_backend may import vllm
        from .plan import describe

        if rehearse:
            raise ConfigError("--dry-run and --rehearse: choose one (a rehearsal prints the plan when it ends)")
        print(describe(cfg, run_dir))
        return 0
    if rehearse:  # the same run on stand-ins (rehearsal.py); pools that cannot fit fail as in a dry run
        from .plan import check_prompt_supply
        from .rehearsal import rehearsal_config

        print(check_prompt_supply(cfg), flush=True)
        cfg, notes = rehearsal_config(cfg, run_dir, args.stand_in)
        print("rehearsal: every count as configured; stand-ins:\n" + "\n".join(f"  {n}" for n in notes), flush=True)
    from .cluster.slurm import in_job, requeue
    from .data import DataError
    from .errors import BudgetExhausted, NotARunDir, Preempted, ResumeRefused, RunBusy, StageFailed
    from .generation.backends import choose_backend
    from .oracles.base import OracleError
    from .oracles.store import StoreError, open_store
    from .rundir import RunDir

    if cfg.oracle.store:  # a shared store that cannot be used stops the run now, not at its first labelling
        try:
            open_store(cfg.oracle.store).close()
        except StoreError as e:
            print(f"label store: {e}", file=sys.stderr)
            return 2
    backend, why = choose_backend(cfg.generation)
    print(f"run {cfg.name}: {cfg.acquisition.function} acquisition, {cfg.loop.rounds} rounds x "
          f"{cfg.acquisition.labels_per_round} labels, generation backend {backend} ({why}), "
          f"run directory {run_dir}", flush=True)
    # The SLURM warning signal (sbatch --signal=B:USR1@...), or `kill -USR1`: stop at the next safe point.
    signal.signal(signal.SIGUSR1, lambda signum, frame: RunDir(run_dir).request_stop(
        f"{signal.Signals(signum).name} received"))
    # Each way a run can end early: (exception, exit code, message format).
    endings = [(ResumeRefused, 3, "refusing to resume: {}"),
               (NotImplementedError, 4, "not available: {}"),
               (StageFailed, 5, "stage failed: {}"),
               (BudgetExhausted, 6, "stopped: {}; everything so far is saved (raise the budget and run again to continue)"),
               (OracleError, 7, "oracle failed: {}; answers received so far are saved"),
               (Preempted, 8, "preempted: {}; everything so far is saved (run again to continue)"),
               (RunBusy, 10, "run busy: {}"),
               (DataError, 2, "data error: {}"),
               (NotARunDir, 2, "run directory: {}"),
               (StoreError, 2, "label store: {}")]
    started = time.time()
    try:
        run_coordinator(cfg, run_dir, progress=not args.no_progress)
    except tuple(kind for kind, _, _ in endings) as e:
        code, message = next((c, m) for kind, c, m in endings if isinstance(e, kind))
        print(message.format(e), file=sys.stderr, flush=True)
        if isinstance(e, Preempted) and in_job():
            print(f"requeueing SLURM job {os.environ['SLURM_JOB_ID']}; it resumes from {run_dir}", file=sys.stderr,
                  flush=True)
            requeue()
        return code
    if rehearse:
        from .rehearsal import report

        text, as_planned = report(cfg, run_dir, time.time() - started)
        print(text, flush=True)
        return 0 if as_planned else 1
    return 0


def run_coordinator(cfg, run_dir: str, progress: bool) -> None:
    """The coordinator, with vLLM servers on the generation nodes when this is a heterogeneous SLURM job."""
    from contextlib import nullcontext

    from .assets import cache_dir, resolve_model_path
    from .cluster.slurm import generation_servers, is_hetjob, use_slurm
    from .loop import run

    servers = nullcontext()
    if cfg.slurm.generation_nodes and use_slurm(cfg.launcher) and is_hetjob():
        sft = resolve_model_path(cfg.model.policy, cache_dir(cfg.assets_dir))
        servers = generation_servers(cfg.generation, cfg.model.dtype, cfg.slurm.servers_per_node, Path(run_dir), sft,
                                     cfg.training.lora.rank)
    with servers as urls:
        if urls:
            from omegaconf import read_write

            with read_write(cfg):
                cfg.generation.servers.urls = urls
        run(cfg, run_dir, progress=progress)


def cmd_submit(args) -> int:
    from .config import load_config
    from .cluster.slurm import submit

    cfg = load_config(args.config, args.overrides)
    refuse_sqlite_on_nodes(cfg.oracle.store, "submit: the runs that set this oracle.store can",
                           "leave oracle.store empty: the run's own <run>/labels.sqlite is opened by its coordinator "
                           "only")
    run_dir = Path(args.run_dir or os.path.join("runs", cfg.name))
    job, script = submit(cfg, run_dir)
    print(f"submitted job {job}: {script} (log {script.parent}/{cfg.name}-{job}.out); "
          f"`apo-dist status {run_dir}` shows where it stands")
    return 0


def refuse_sqlite_on_nodes(store: str, who: str, instead: str) -> None:
    """ConfigError for a SQLite label store that processes on different nodes would open at once:
    WAL keeps its index in memory shared on one host (https://www.sqlite.org/wal.html)."""
    from .config import ConfigError
    from .oracles.store import is_postgres

    if store and not is_postgres(store):
        raise ConfigError(f"{who} share the SQLite label store {store} from different nodes at once, which SQLite's "
                          "WAL mode does not support (https://www.sqlite.org/wal.html); set oracle.store=postgresql://"
                          "USER@HOST:PORT/DATABASE (`apo-dist migrate-labels` copies the answers stored so far "
                          f"there), or {instead}")


def sweep_arms(args) -> list[tuple[str, int]]:
    """The grid, in a fixed order (array task K runs arm K): random first, then each function x seed."""
    functions = list(dict.fromkeys(["random", *filter(None, args.acquisition.split(","))]))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    return [(function, seed) for function in functions for seed in seeds]


def cmd_sweep(args) -> int:
    """Every function x seed with the same config otherwise, sharing one label store (oracle.store, or
    <root>/labels.sqlite): one after another in this process (then the aggregate table and plot), one
    arm (--task), or as a SLURM job array (--slurm; it needs a PostgreSQL store)."""
    from .aggregate import write_outputs
    from .config import load_config
    from .cluster.slurm import submit_sweep

    base = load_config(args.config, args.overrides)
    root = Path(args.root or os.path.join("runs", f"{base.name}_sweep"))
    arms = sweep_arms(args)
    store = [] if base.oracle.store else [f"oracle.store={root.resolve() / 'labels.sqlite'}"]
    if args.slurm:
        refuse_sqlite_on_nodes(base.oracle.store or str(root.resolve() / "labels.sqlite"),
                               "sweep --slurm: the arms of the job array would", "run the sweep without --slurm")
        grid = ["--acquisition", ",".join(dict.fromkeys(f for f, _ in arms)), "--seeds",
                ",".join(dict.fromkeys(str(s) for _, s in arms))]
        array, aggregate, script = submit_sweep(base, root, len(arms), grid)
        print(f"submitted array job {array} ({len(arms)} tasks: {script}) and aggregation job {aggregate} "
              f"(runs when all succeed); `apo-dist status {root}` shows where they stand")
        return 0
    if args.task is not None and not 0 <= args.task < len(arms):
        print(f"--task {args.task}: the sweep has arms 0-{len(arms) - 1}", file=sys.stderr)
        return 2

    def arm(function: str, seed: int) -> tuple[str, list[str]]:
        name = f"{function}_seed{seed}"
        return name, [*args.overrides, f"acquisition.function={function}", f"seed={seed}",
                      f"name={base.name}_{name}", *store]

    if args.task is not None:  # one array task: preemption and requeue as for `apo-dist run`
        name, overrides = arm(*arms[args.task])
        print(f"sweep {root}: {name}", flush=True)
        return cmd_run(argparse.Namespace(config=args.config, overrides=overrides, run_dir=str(root / name),
                                          no_progress=args.no_progress, dry_run=False))
    for function, seed in arms:
        name, overrides = arm(function, seed)
        print(f"sweep {root}: {name}", flush=True)
        run_coordinator(load_config(args.config, overrides), str(root / name), progress=not args.no_progress)
    print(write_outputs(root))
    return 0


def cmd_aggregate(args) -> int:
    from .aggregate import write_outputs

    print(write_outputs(args.root))
    return 0


def cmd_status(args) -> int:
    from .cluster.slurm import jobs

    root = Path(args.run_dir)
    runs = [root] if (root / "state.json").exists() else sorted(p.parent for p in root.glob("*/state.json"))
    submitted = jobs(root)
    if not runs and not submitted:
        print(f"{args.run_dir}: no run here (no state.json) and no run or job below it", file=sys.stderr)
        return 1
    for job in submitted:
        tasks = "; ".join(f"{t[0]} {t[1]}{' ' + t[2] if t[2] else ''}" for t in job["tasks"])
        print(f"SLURM {job['kind']} job {job['job']}: {tasks}")
    return max((print_run_status(run, brief=runs != [root]) for run in runs), default=0)


def print_run_status(run_dir: Path, brief: bool) -> int:
    from .report import eval_results
    from .rundir import RunDir

    rd = RunDir(run_dir)
    state = rd.read_state()
    status = f"{state.get('status', '?')}{' (' + state['reason'] + ')' if state.get('reason') else ''}"
    last = f"round {state.get('round')} {state.get('stage')} ({state.get('stage_status')})"
    evals = eval_results(rd.root)
    if brief:  # one line per run of a sweep
        win = f", win-rate {evals[-1]['win_rate']:.3f} at {evals[-1]['labels']} labels" if evals else ""
        print(f"{rd.root.name}: {status}, last stage {last}{win}")
        return 0
    print(f"run directory: {rd.root}")
    print(f"status: {status}")
    print(f"last stage: {last}")
    for e in evals:
        print(f"round {e['round']}: labels {e['labels']} win-rate {e['win_rate']:.3f} ± {e['stderr']:.3f}")
    return print_store_status(rd)


def print_store_status(rd) -> int:
    """The run's label store line (its own labels.sqlite or its oracle.store): 0, or 2 when it cannot be read."""
    from omegaconf import OmegaConf

    from .oracles.store import StoreError, is_postgres, open_store

    try:
        shared = OmegaConf.select(OmegaConf.load(rd.config_path), "oracle.store", default="") or ""
    except Exception:  # no or an unreadable config.yaml (`run` says what is wrong): the run's own store
        shared = ""
    location = shared or rd.labels_db
    if not is_postgres(location) and not Path(location).exists():
        return 0  # nothing labelled yet
    try:
        store = open_store(location, readonly=True)
    except StoreError as e:  # e.g. a store from an older or newer apo-dist, an unreachable server
        print(f"label store: {e}", file=sys.stderr)
        return 2
    t, mine = store.totals(), store.totals(run=str(rd.root.resolve()))
    print(f"label store: {t['answers']} answers, {t['requests']} oracle requests, {t['unlabelable']} unlabelable; "
          f"this run paid for {mine['answers']} ({mine['input_tokens']} + {mine['output_tokens']} tokens, "
          f"${mine['cost']:.4f}){'; shared store ' + store.where if shared else ''}")
    store.close()
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_export_labels(args) -> int:
    """The store's labels as stored (raw) or as preference pairs (export.py); 2 with one line on bad input."""
    from .export import FORMATS, ExportError, check_out, preference_rows, write_rows
    from .oracles.store import StoreError, open_store

    out = Path(args.out)
    try:
        if args.format not in FORMATS:
            raise ExportError(f"--format {args.format}: one of {', '.join(FORMATS)}")
        if args.keep_ties and args.format != "preference":
            raise ExportError("--keep-ties goes with --format preference")
        check_out(out)
        store = open_store(args.store, readonly=True)
        try:
            table = store.export()
        finally:
            store.close()
        if args.format == "preference":
            table, left_out = preference_rows(table, args.keep_ties)
        write_rows(out, table)
    except (ExportError, StoreError) as e:  # StoreError: no store, not a store, a newer store, no server
        print(e, file=sys.stderr)
        return 2
    if args.format == "raw":
        print(f"{len(table)} answers -> {args.out}")
    else:
        ties = "" if args.keep_ties else f", {left_out['ties']} ties"
        print(f"{len(table)} preference pairs -> {args.out} (left out: {left_out['unlabelable']} unlabelable{ties})")
    return 0


def cmd_migrate_labels(args) -> int:
    """Copy a SQLite store into a PostgreSQL one, all in one transaction; rows already there are skipped."""
    from .oracles.store import StoreError, is_postgres, open_store

    if is_postgres(args.source) or not is_postgres(args.destination):
        print("migrate-labels SOURCE DESTINATION: SOURCE is a SQLite label store (a file), DESTINATION a "
              "postgresql:// URL", file=sys.stderr)
        return 2
    stores = []
    try:
        stores.append(open_store(args.source, readonly=True))
        stores.append(open_store(args.destination))
        counts = stores[1].copy_from(stores[0])
    except StoreError as e:
        print(e, file=sys.stderr)
        return 2
    finally:
        for store in stores:
            store.close()
    print(f"{stores[0].where} -> {stores[1].where}: " + "; ".join(
        f"{table} {copied} copied, {there} already there" for table, (copied, there) in counts.items()))
    return 0


def cmd_assets(args) -> int:
    from .assets import cache_dir, ensure_all

    ensure_all(cache_dir(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
