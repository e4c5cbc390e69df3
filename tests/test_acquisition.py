"""Acquisition on hand-made tables whose answers can be worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from apo_dist.acquisition import (bt_probability, certainty, implicit_reward, select_pairs,
                                  select_prompts)


def rng(seed=0):
    return np.random.default_rng(seed)


def prompts(entropies):
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(entropies))],
                         "entropy": entropies})


def pairs(certainties, prompt_ids=None):
    c = np.asarray(certainties, dtype=float)
    n = len(c)
    return pd.DataFrame({"pair_id": [f"q{i}" for i in range(n)],
                         "prompt_id": prompt_ids or [f"p{i}" for i in range(n)],
                         "reward_a": c / 2, "reward_b": -c / 2, "certainty": c})


ENTROPIES = [0.5, 2.0, 1.0, 3.0, 0.1, 1.5]  # ranks: p3, p1, p5, p2, p0, p4
CERTAINTIES = [0.3, 0.9, 0.1, 0.5, 0.7]


def chosen(table, column="pair_id"):
    return list(table[column])


# ---- small functions ----

def test_implicit_reward_certainty_bt_by_hand():
    assert implicit_reward(-10.0, -12.0, 0.2) == pytest.approx(0.4)
    np.testing.assert_allclose(implicit_reward([-1.0, -3.0], [-2.0, -1.0], 0.5), [0.5, -1.0])
    np.testing.assert_allclose(certainty([1.0, 0.5], [-2.0, 0.5]), [3.0, 0.0])
    assert bt_probability(1.0, 0.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert bt_probability(0.0, 1.0) == pytest.approx(1 - 1 / (1 + math.exp(-1)))
    assert bt_probability(0.3, 0.3) == 0.5
    with np.errstate(over="raise"):  # no overflow at extreme differences
        np.testing.assert_allclose(bt_probability([1000.0, -1000.0], [0.0, 0.0]), [1.0, 0.0])


def test_certainty_ranking_equals_bt_distance_from_half():
    r = rng(1)
    table = pd.DataFrame({"pair_id": range(200), "prompt_id": range(200),
                          "reward_a": r.normal(size=200), "reward_b": r.normal(size=200)})
    table["certainty"] = certainty(table.reward_a, table.reward_b)
    got = chosen(select_pairs(table, "certainty", 50, rng()))
    bt = np.abs(bt_probability(table.reward_a, table.reward_b) - 0.5)
    assert got == list(table.pair_id[np.argsort(-bt, kind="stable")[:50]])


# ---- step 1: prompts ----

def test_entropy_selects_top_m_and_ranks_all():
    out = select_prompts(prompts(ENTROPIES), "entropy", 2, rng())
    assert chosen(out[out.selected], "prompt_id") == ["p1", "p3"]
    assert list(out.entropy_rank) == [4, 1, 3, 0, 5, 2]
    assert out.selected.dtype == bool and out.entropy_rank.dtype.kind == "i"
    assert list(out.prompt_id) == list(prompts(ENTROPIES).prompt_id)  # same rows, same order


def test_hybrid_selects_top_pair_factor_times_m():
    out = select_prompts(prompts(ENTROPIES), "hybrid", 3, rng())  # keep = f_g * M = 3 * 1
    assert set(out.prompt_id[out.selected]) == {"p3", "p1", "p5"}


@pytest.mark.parametrize("function", ["random", "certainty", "uncertainty"])
def test_other_functions_keep_every_prompt(function):
    out = select_prompts(prompts([float("nan")] * 4), function, 4, rng())
    assert out.selected.all() and (out.entropy_rank == -1).all()


def test_prompt_errors():
    with pytest.raises(ValueError, match="keeps 7 prompts for pair generation, got 6"):
        select_prompts(prompts(ENTROPIES), "entropy", 7, rng())
    with pytest.raises(ValueError, match="keeps 9 prompts"):
        select_prompts(prompts(ENTROPIES), "hybrid", 9, rng())
    with pytest.raises(ValueError, match="keeps 8 prompts"):
        select_prompts(prompts(ENTROPIES), "random", 8, rng())
    with pytest.raises(ValueError, match="1 of 6 are NaN"):
        select_prompts(prompts(ENTROPIES[:5] + [float("nan")]), "hybrid", 2, rng())
    with pytest.raises(ValueError, match="unknown acquisition function"):
        select_prompts(prompts(ENTROPIES), "bald", 1, rng())


def test_entropy_ties_break_at_random_reproducibly():
    table = prompts([1.0] * 6 + [0.0] * 2)
    picks = [tuple(chosen(select_prompts(table, "entropy", 2, rng(s)).query("selected"),
                          "prompt_id")) for s in range(200)]
    assert picks[:20] == [tuple(chosen(select_prompts(table, "entropy", 2, rng(s))
                                       .query("selected"), "prompt_id")) for s in range(20)]
    assert len(set(picks[:20])) > 5
    assert {p for pick in picks for p in pick} == {f"p{i}" for i in range(6)}  # never p6, p7


# ---- step 2: pairs ----

def test_certainty_and_uncertainty_by_hand():
    out = select_pairs(pairs(CERTAINTIES), "certainty", 2, rng())
    assert chosen(out) == ["q1", "q4"] and list(out.acquisition_rank) == [0, 1]
    assert chosen(select_pairs(pairs(CERTAINTIES), "uncertainty", 2, rng())) == ["q2", "q0"]
    assert chosen(select_pairs(pairs(CERTAINTIES), "hybrid", 3, rng())) == ["q1", "q4", "q3"]


def test_random_takes_m_distinct_pairs_reproducibly():
    table = pairs(CERTAINTIES)
    out = select_pairs(table, "random", 3, rng(5))
    assert len(out) == 3 and out.pair_id.is_unique and set(out.pair_id) <= set(table.pair_id)
    assert chosen(out) == chosen(select_pairs(table, "random", 3, rng(5)))
    assert len({tuple(chosen(select_pairs(table, "random", 3, rng(s)))) for s in range(20)}) > 5


def test_entropy_pairs_all_when_exactly_m_else_random_m():
    table = pairs(CERTAINTIES)
    assert set(select_pairs(table, "entropy", 5, rng()).pair_id) == set(table.pair_id)
    assert len({tuple(chosen(select_pairs(table, "entropy", 2, rng(s)))) for s in range(20)}) > 5


def test_hybrid_composes_entropy_then_certainty():
    # One candidate pair per prompt. Entropy keeps pair_factor * m = 4 of 6 prompts
    # (p3, p1, p5, p2); among their pairs the top 2 by certainty are p1's (1.2) and p5's (0.6).
    # p4's pair has the highest certainty overall but p4 has the lowest entropy.
    step1 = select_prompts(prompts(ENTROPIES), "hybrid", 4, rng())
    assert set(step1.prompt_id[step1.selected]) == {"p3", "p1", "p5", "p2"}
    candidates = pairs([0.4, 1.2, 0.2, 0.1, 5.0, 0.6])
    candidates = candidates[candidates.prompt_id.isin(step1.prompt_id[step1.selected])]
    out = select_pairs(candidates, "hybrid", 2, rng())
    assert chosen(out, "prompt_id") == ["p1", "p5"]
    assert chosen(select_pairs(pairs([0.4, 1.2, 0.2, 0.1, 5.0, 0.6]), "certainty", 2, rng()),
                  "prompt_id") == ["p4", "p1"]


def test_exclude_takes_next_best():
    out = select_pairs(pairs(CERTAINTIES), "certainty", 2, rng(), exclude={"q1"})
    assert chosen(out) == ["q4", "q3"] and list(out.acquisition_rank) == [0, 1]
    out = select_pairs(pairs(CERTAINTIES), "uncertainty", 2, rng(), exclude={"q2", "q0"})
    assert chosen(out) == ["q3", "q4"]


def test_exclude_under_ties_only_replaces_the_excluded():
    table = pairs([0.0] * 10)
    first = chosen(select_pairs(table, "certainty", 3, rng(7)))
    again = chosen(select_pairs(table, "certainty", 3, rng(7), exclude={first[1]}))
    assert again[:2] == [first[0], first[2]] and again[2] not in first


def test_shortfall_returns_all_remaining():
    out = select_pairs(pairs(CERTAINTIES), "certainty", 10, rng(), exclude={"q0"})
    assert chosen(out) == ["q1", "q4", "q3", "q2"]


@pytest.mark.parametrize("function", ["certainty", "uncertainty", "hybrid"])
def test_certainty_ties_break_at_random_reproducibly(function):
    table = pairs([0.0] * 10)  # round 0: policy == reference
    picks = [tuple(chosen(select_pairs(table, function, 3, rng(s)))) for s in range(300)]
    assert picks[:20] == [tuple(chosen(select_pairs(table, function, 3, rng(s))))
                          for s in range(20)]
    assert len(set(picks[:20])) >= 15
    assert {p for pick in picks for p in pick} == set(table.pair_id)  # not positional


def test_pair_errors():
    with pytest.raises(ValueError, match="1 of 5 are NaN"):
        select_pairs(pairs(CERTAINTIES[:4] + [float("nan")]), "certainty", 2, rng())
    with pytest.raises(ValueError, match="lacks column"):
        select_pairs(pairs(CERTAINTIES).drop(columns="certainty"), "random", 2, rng())
    with pytest.raises(ValueError, match="must be >= 1"):
        select_pairs(pairs(CERTAINTIES), "random", 0, rng())
