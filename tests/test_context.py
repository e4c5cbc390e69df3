"""What every oracle call of a run goes through (RunContext.ask): identical completions are ties
that cost nothing, and the cost budget cuts a batch to what the rest of it pays for."""
from __future__ import annotations

import pytest

from apo_dist.config import load_config
from apo_dist.context import RunContext
from apo_dist.errors import BudgetExhausted
from apo_dist.oracles.custom import CustomOracle

from .test_loop import CONFIG

ASKED: list[tuple[str, str]] = []


def priced_labeller(prompts, a, b):
    """Prefers the longer completion, $0.01 an answer; records what it was asked."""
    ASKED.extend(zip(a, b))
    return [{"label": float(len(x) >= len(y)), "cost": 0.01} for x, y in zip(a, b)]


@pytest.fixture
def ctx(tmp_path, tiny_overrides):
    def make(*overrides: str) -> RunContext:
        cfg = load_config(CONFIG, [*tiny_overrides, "oracle.kind=custom",
                                   "oracle.function=tests.test_context:priced_labeller", *overrides])
        return RunContext(cfg, tmp_path / "run", progress=False)
    ASKED.clear()
    return make


def test_identical_completions_are_ties_without_a_call(ctx):
    c = ctx()
    oracle = CustomOracle("tests.test_context:priced_labeller")
    labels, new = c.ask(oracle, ["p1", "p2", "p3", "p4"], [" same", " long one", " x", " twin"],
                        [" same", " short", " longer", " twin"], batch_size=8, desc="label")
    assert labels == [0.5, 1.0, 0.0, 0.5] and new == 2
    assert ASKED == [(" long one", " short"), (" x", " longer")]
    assert c.store.totals()["requests"] == 2


def test_the_cost_budget_cuts_a_batch_to_what_it_pays_for(ctx):
    c = ctx("oracle.max_cost=0.055")
    oracle = CustomOracle("tests.test_context:priced_labeller")
    prompts = [f"p{i}" for i in range(10)]
    with pytest.raises(BudgetExhausted, match=r"\$0.0500 spent.*about \$0.0100 each would pass oracle.max_cost=0.055"):
        c.ask(oracle, prompts, [" a" * (i + 1) for i in range(10)], [" b"] * 10, batch_size=8, desc="label")
    # 1 call to learn the price, then the 4 that $0.045 pays for: no batch of 8 went out
    assert len(ASKED) == 5 and c.store.totals()["answers"] == 5
