"""The stages of a run, declared in the order they run. Each body is a function of
(RunContext, round) returning (outputs by name, metrics); the engine writes the outputs.

Run-level (once):   prompts -> eval_reference
Per round r:        pool -> [entropy_samples] -> entropy -> samples -> scores [+ history]
                    -> acquired -> labels -> train -> eval
([entropy_samples]: entropy and hybrid only; [history]: the feature functions, whose scores stage
also rescores the labels of rounds < r.)

`inputs` name the stages (round, stage) whose results a stage used: when one of them is redone,
so is every stage downstream of it.
"""
from __future__ import annotations

from ..counts import uses_entropy, uses_features
from ..engine import Stage
from ..rundir import RUN
from .acquire import acquired, labels
from .entropy import entropy, entropy_samples
from .evaluate import eval_reference, evaluate
from .pairs import samples, scores
from .prompts import pool, prompts
from .train import train


def run_stages(cfg) -> list[Stage]:
    return [Stage("prompts", prompts, ("prompts",)),
            Stage("eval_reference", eval_reference, ("eval_reference",), {"prompts": (RUN, "prompts")})]


def round_stages(cfg, r: int) -> list[Stage]:
    scoring, training = (launched(cfg.launcher, k) for k in (cfg.launcher.scoring_processes,
                                                             cfg.launcher.training_processes))
    policy = {"policy": (r - 1, "train")} if r > 0 else {}
    earlier = {f"{stage}_{q}": (q, stage) for q in range(r) for stage in ("acquired", "labels")}
    entropy_input = "entropy_samples" if uses_entropy(cfg) else "pool"
    stages = [Stage("pool", pool, ("pool",), {"prompts": (RUN, "prompts"), **earlier})]
    if uses_entropy(cfg):
        stages.append(Stage("entropy_samples", entropy_samples, ("entropy_samples",), {"pool": (r, "pool"), **policy}))
    return stages + [
        Stage("entropy", entropy, ("entropy",), {entropy_input: (r, entropy_input), **policy},
              processes=scoring if uses_entropy(cfg) else 0),
        Stage("samples", samples, ("samples",), {"entropy": (r, "entropy"), **policy}),
        Stage("scores", scores, ("scores", "history") if uses_features(cfg) else ("scores",),
              {"samples": (r, "samples"), **policy,
               **({f"labels_{q}": (q, "labels") for q in range(r)} if uses_features(cfg) else {})},
              processes=scoring),
        Stage("acquired", acquired, ("acquired",), {"scores": (r, "scores")}),
        Stage("labels", labels, ("labels",), {"acquired": (r, "acquired")}),
        Stage("train", train, ("policy", "train_log"),
              {**{f"labels_{q}": (q, "labels") for q in range(r + 1)},
               **(policy if cfg.training.init == "previous" else {})}, processes=training),
        Stage("eval", evaluate, ("eval", "eval_samples"), {"policy": (r, "train"), "reference": (RUN, "eval_reference")}),
    ]


def launched(launcher, processes: int) -> int:
    """Ranks for a stage under `accelerate launch`, or 0 to run it in the coordinator's process."""
    return processes if processes > 1 or launcher.accelerate_config else 0


def find_stage(cfg, name: str, round_) -> Stage:
    """The declared stage `name` of `round_` (what a launched rank runs)."""
    stages = run_stages(cfg) if round_ == RUN else round_stages(cfg, int(round_))
    return next(s for s in stages if s.name == name)
