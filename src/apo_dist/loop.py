"""The coordinator: a small state machine over the run directory.

On every start it checks the config against the one the run began with, then walks the stages
(stages/__init__.py) in order through the engine, which skips the ones whose manifests still hold
and redoes the rest. Oracle answers live in the label store and are never requested twice, even
when a stage is redone. A run ends done, stopped (a budget), preempted (a stop request) or failed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from . import config as config_mod
from .context import RunContext
from .engine import Engine
from .errors import BudgetExhausted, NotARunDir, Preempted, ResumeRefused
from .oracles.registry import make_oracle
from .report import write_report
from .rundir import RUN, RunDir, atomic_write_text
from .stages import round_stages, run_stages


def run(cfg, run_dir: str | Path, progress: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) the experiment `cfg` in `run_dir`; returns each round's eval result.
    Holds the run directory's lock throughout (RunBusy, before anything is written, when another
    coordinator has it)."""
    rd = RunDir(run_dir)
    rd.check_is_run()
    read_run_config(rd)  # a broken one is refused before the lock file is made
    with rd.lock():
        return _run_locked(cfg, rd, progress, echo)


def _run_locked(cfg, rd: RunDir, progress: bool, echo: Callable[[str], None]) -> list[dict]:
    check_and_write_config(cfg, rd)
    ctx = RunContext(cfg, rd.root, progress)
    engine = Engine(ctx)
    rd.stop_path.unlink(missing_ok=True)  # a request made to an earlier process of this run
    try:
        rd.update_state(status="running", reason="")
        for stage in run_stages(cfg):
            engine.ensure(stage, RUN)
        results = []
        for r in range(cfg.loop.rounds):
            t0 = time.time()
            for stage in round_stages(cfg, r):
                engine.ensure(stage, r)
            results.append(round_summary(rd, r, time.time() - t0, echo))
        rd.update_state(status="done", round=cfg.loop.rounds - 1, stage="eval")
        write_report(rd.root)
        echo(f"report: {rd.root / 'report.md'}")
        return results
    except BudgetExhausted as e:
        rd.update_state(status="stopped", reason=str(e))
        raise
    except Preempted as e:
        rd.update_state(status="preempted", reason=str(e))
        raise
    finally:
        ctx.close()


def read_run_config(rd: RunDir):
    """The config the run began with (None for a new run); NotARunDir when it cannot be read."""
    if not rd.config_path.exists():
        return None
    try:
        return config_mod.from_yaml_text(rd.config_path.read_text())
    except Exception as e:  # not YAML, not text, or not a config of this apo-dist
        raise NotARunDir(f"{rd.config_path} is not a readable apo-dist config "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "restore it, or use a new --run-dir") from None


def check_and_write_config(cfg, rd: RunDir) -> None:
    """Write config.yaml for a new run; refuse a resumed run whose config changes results."""
    rd.root.mkdir(parents=True, exist_ok=True)
    old = read_run_config(rd)
    if old is not None:
        diffs = config_mod.changed_keys(old, cfg)
        if diffs:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
            raise ResumeRefused(f"{rd.root} was started with a different config; resuming would mix results.\n"
                                f"{lines}\nUse a new --run-dir, or revert these keys.")
    atomic_write_text(rd.config_path, config_mod.to_yaml(cfg))
    for section in (cfg.oracle, cfg.eval.oracle):  # an unavailable oracle fails now
        if section is not None:
            make_oracle(section, cfg.seed)


def round_summary(rd: RunDir, r: int, seconds: float, echo: Callable[[str], None]) -> dict:
    result = json.loads(rd.path("eval", r).read_text())
    echo(f"round {r}: labels {result['labels']:4d} | win-rate {result['win_rate']:.3f} "
         f"± {result['stderr']:.3f} (n={result['n']}, ties {result['tie_rate']:.2f}"
         f"{', unjudged %d' % result['unjudged'] if result.get('unjudged') else ''})"
         f"{' | score %.3f' % result['score'] if 'score' in result else ''}"
         f"{' | KL %.3f' % result['kl'] if 'kl' in result else ''} | {seconds:.0f} s")
    return result
