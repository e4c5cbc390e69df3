"""One place decides a round's counts (counts.py): the tables of real tiny runs match it, and so
does the plan that `--dry-run` prints, for every acquisition function and both training.init modes."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apo_dist import plan
from apo_dist.config import AcquisitionFunction, TrainingInit, load_config
from apo_dist.counts import FEATURE_FUNCTIONS, round_counts
from apo_dist.loop import run
from apo_dist.rundir import RunDir

CONFIG = Path(__file__).parent.parent / "configs" / "test_tiny.yaml"


@pytest.mark.parametrize("init", list(TrainingInit))
@pytest.mark.parametrize("function", list(AcquisitionFunction))
def test_tables_have_the_planned_counts(tmp_path, tiny_overrides, function, init):
    cfg = load_config(CONFIG, [*tiny_overrides, f"acquisition.function={function}", f"training.init={init}",
                               "acquisition.diversity_factor=2"])  # diverse_certainty: f_d <= f_g = 2
    rd = RunDir(tmp_path / "run")
    run(cfg, rd.root, progress=False, echo=lambda _: None)
    steps = {m["round"]: m["steps"] for m in rd.read_metrics() if m["stage"] == "train"}
    trained = {m["round"]: m["pairs"] for m in rd.read_metrics() if m["stage"] == "train"}
    for r in range(cfg.loop.rounds):
        c, p = round_counts(cfg, r), plan.round_counts(cfg, r)
        assert (p["pool_prompts"], p["entropy_samples"], p["candidate_pairs"], p["labels"], p["train_pairs"]) == (
            c.pool_prompts, c.entropy_samples, c.pair_prompts, c.labels, c.train_pairs)
        assert len(rd.table("pool", r)) == c.pool_prompts
        if c.entropy_samples:
            assert len(rd.table("entropy_samples", r)) == c.entropy_samples
        else:
            assert not rd.path("entropy_samples", r).exists()
        assert int(rd.table("entropy", r)["selected"].sum()) == c.pair_prompts
        assert len(rd.table("samples", r)) == p["pair_completions"]
        assert len(rd.table("scores", r)) == c.pair_prompts
        if function in FEATURE_FUNCTIONS:  # features of every completion; earlier labels rescored
            assert {len(f) for f in rd.table("scores", r)["features_a"]} == {cfg.acquisition.feature_dim}
            history = rd.table("history", r)
            assert len(history) == c.history_pairs == r * c.labels
            if r:
                labelled = pd.concat([rd.table("labels", q) for q in range(r)]).merge(
                    history, on="pair_id", suffixes=("", "_now"))
                assert len(labelled) == len(history)
                assert (labelled["label"] == labelled["label_now"]).all()
                assert (labelled["ref_logp_a"] == labelled["ref_logp_a_now"]).all()  # the reference is fixed
                assert (labelled["policy_logp_a"] != labelled["policy_logp_a_now"]).any()  # this round's policy
        else:
            assert c.history_pairs == 0 and not rd.path("history", r).exists()
            assert "features_a" not in rd.table("scores", r)
        assert len(rd.table("acquired", r)) == len(rd.table("labels", r)) == c.labels
        assert trained[r] == c.train_pairs  # every label so far, in both init modes
        assert steps[r] == p["train_steps"] == len(rd.path("train_log", r).read_text().splitlines())
        assert json.loads(rd.path("eval", r).read_text())["n"] == len(rd.table("eval_samples", r)) == p["eval_completions"]
