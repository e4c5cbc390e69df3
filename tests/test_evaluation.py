"""Evaluation as the paper did it: policy and reference sampled independently at T > 0, and pairs
the judge cannot judge counted by a seeded coin (their number reported), never dropped."""
from __future__ import annotations

import json
from pathlib import Path

from apo_dist.config import load_config
from apo_dist.loop import run
from apo_dist.rundir import RunDir

CONFIG = Path(__file__).parent.parent / "configs" / "test_tiny.yaml"


def one_round(tmp_path: Path, overrides: list[str], name: str = "run") -> RunDir:
    rd = RunDir(tmp_path / name)
    run(load_config(CONFIG, [*overrides, "loop.rounds=1"]), rd.root, progress=False, echo=lambda _: None)
    return rd


def every_third_unjudgeable(prompts, a, b):
    """A custom judge that cannot judge every third eval pair and prefers the longer text otherwise."""
    return [None if i % 3 == 0 else float(len(x) > len(y)) for i, (x, y) in enumerate(zip(a, b))]


def test_policy_and_reference_are_sampled_independently(tmp_path, tiny_overrides):
    # lr 1e-12: the policy is the SFT model to float precision, so only the seeds can make them differ
    rd = one_round(tmp_path, [*tiny_overrides, "eval.temperature=1.0", "training.lr=1e-12"])
    policy, reference = rd.table("eval_samples", 0), rd.table("eval_reference")
    assert list(policy["prompt_id"]) == list(reference["prompt_id"])
    same = (policy["completion"].values == reference["completion"].values).mean()
    assert same < 0.5, same  # with one seed for both models nearly every pair was identical


def test_unjudged_pairs_count_by_a_seeded_coin(tmp_path, tiny_overrides):
    judge = ["eval.oracle.kind=custom", "eval.oracle.function=tests.test_evaluation:every_third_unjudgeable"]
    first = one_round(tmp_path, [*tiny_overrides, *judge], "first")
    result = json.loads(first.path("eval", 0).read_text())
    n_eval = len(first.table("eval_reference"))
    assert result["n"] == n_eval and result["unjudged"] == len(range(0, n_eval, 3))  # counted, not dropped
    assert result["wins"] + result["losses"] + result["ties"] == n_eval
    again = json.loads(one_round(tmp_path, [*tiny_overrides, *judge], "again").path("eval", 0).read_text())
    assert again == result  # the coin is seeded
