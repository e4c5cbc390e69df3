"""Acquisition on hand-made tables whose answers can be worked out by hand."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apo_dist.acquisition import (bald, bt_probability, certainty, implicit_reward, laplace_posterior,
                                  select_pairs, select_prompts)
from apo_dist.config import AcquisitionFunction, ConfigError, load_config
from apo_dist.counts import FEATURE_FUNCTIONS


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
                         "tokens_a": [[7, i] for i in range(n)], "tokens_b": [[8, i] for i in range(n)],
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
    table = pd.DataFrame({"pair_id": range(200), "prompt_id": range(200), "tokens_a": [[1]] * 200,
                          "tokens_b": [[2]] * 200, "reward_a": r.normal(size=200), "reward_b": r.normal(size=200)})
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


# ---- identical completions ----

@pytest.mark.parametrize("function", list(AcquisitionFunction))
def test_identical_completions_are_never_chosen(function):
    # q0-q2 have the same tokens on both sides, yet the largest certainties and feature gaps.
    table = feature_pairs([[5.0, 0.0], [0.0, 5.0], [4.0, 4.0], [0.1, 0.0], [0.0, 0.2], [0.3, 0.1]],
                          offsets=[9.0, 8.0, 7.0, 0.1, 0.2, 0.3])
    table["tokens_b"] = [np.array([7, 0]), np.array([7, 1]), np.array([7, 2]), np.array([7, 3, 1]),
                         np.array([8, 4]), np.array([8, 5])]  # as parquet gives them back
    for seed in range(5):
        assert chosen(select_pairs(table, function, 1, rng(seed), diversity_factor=2))[0] in {"q3", "q4", "q5"}
    out = select_pairs(table, function, 6, rng(), diversity_factor=2)  # only 3 can be chosen
    assert sorted(chosen(out)) == ["q3", "q4", "q5"] and list(out.acquisition_rank) == [0, 1, 2]


# ---- feature functions: hand-made features, labels and posteriors ----

def feature_pairs(z, offsets=None, certainties=None):
    """Candidates with pair features z = features_a - features_b (features_b = 0) and offsets r_a - r_b."""
    z = np.asarray(z, dtype=np.float32)
    n = len(z)
    o = np.zeros(n) if offsets is None else np.asarray(offsets, dtype=float)
    return pd.DataFrame({"pair_id": [f"q{i}" for i in range(n)], "prompt_id": [f"p{i}" for i in range(n)],
                         "tokens_a": [[7, i] for i in range(n)], "tokens_b": [[8, i] for i in range(n)],
                         "reward_a": o / 2, "reward_b": -o / 2,
                         "certainty": np.abs(o) if certainties is None else np.asarray(certainties, dtype=float),
                         "features_a": list(z), "features_b": list(np.zeros_like(z))})


def history(z, labels, offsets=None):
    """Labelled pairs of earlier rounds as the scores stage rescores them."""
    table = feature_pairs(z, offsets)
    return table.assign(label=np.asarray(labels, dtype=float))[["reward_a", "reward_b", "label", "features_a",
                                                                "features_b"]]


def mi_by_integration(a, v):
    """I(y; s) for y ~ Bernoulli(sigmoid(s)), s ~ N(a, v), on a fine grid."""
    s = np.linspace(a - 12 * math.sqrt(v), a + 12 * math.sqrt(v), 400001)
    density = np.exp(-(s - a) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
    p = 1 / (1 + np.exp(-s))
    entropy = p * np.log1p(np.exp(-s)) + (1 - p) * np.log1p(np.exp(s))  # H[sigmoid(s)] without log(0)
    q = np.trapezoid(p * density, s)
    return -(q * math.log(q) + (1 - q) * math.log(1 - q)) - np.trapezoid(entropy * density, s)


def test_laplace_posterior_without_labels_is_the_prior():
    mean, cov = laplace_posterior(np.zeros((0, 3)), np.zeros(0), np.zeros(0), 2.5)
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_allclose(cov, 2.5 * np.eye(3))


def test_laplace_posterior_of_a_2d_head_on_3_labelled_pairs_by_hand():
    # Labels 1 on z and -z and a tie on (1, 2), offsets 0: at w = 0 the gradient of the log likelihood
    # is (1 - 1/2)(1, 0) + (1 - 1/2)(-1, 0) + (1/2 - 1/2)(1, 2) = 0, so the MAP is 0, every p = 1/2 and
    # the precision is I / s^2 + 1/4 sum z z^T = [[1/2 + 3/4, 1/2], [1/2, 1/2 + 1]] for s^2 = 2.
    z = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 2.0]])
    mean, cov = laplace_posterior(z, np.zeros(3), np.array([1.0, 1.0, 0.5]), 2.0)
    np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-12)
    det = 1.25 * 1.5 - 0.5 * 0.5
    np.testing.assert_allclose(cov, np.array([[1.5, -0.5], [-0.5, 1.25]]) / det)


def test_laplace_map_solves_the_stationarity_equation():
    # One pair, z = 1, offset 0.5, label 1, s^2 = 1: the MAP solves 1 - sigmoid(0.5 + w) = w
    # (a contraction: iterate it by hand), and the variance is 1 / (1 + p (1 - p)) there.
    w = 0.0
    for _ in range(200):
        w = 1 - 1 / (1 + math.exp(-(0.5 + w)))
    mean, cov = laplace_posterior(np.array([[1.0]]), np.array([0.5]), np.array([1.0]), 1.0)
    p = 1 / (1 + math.exp(-(0.5 + w)))
    assert mean[0] == pytest.approx(w, abs=1e-10) and 0.2 < w < 0.5
    assert cov[0, 0] == pytest.approx(1 / (1 + p * (1 - p)))
    # a soft label pulls the other way by its weight: 0.3 (1 - p) = 0.7 p + w
    mean, _ = laplace_posterior(np.array([[1.0]]), np.array([0.5]), np.array([0.3]), 1.0)
    p = 1 / (1 + math.exp(-(0.5 + mean[0])))
    assert 0.3 * (1 - p) - 0.7 * p == pytest.approx(mean[0], abs=1e-10)


def test_bald_matches_direct_integration():
    np.testing.assert_array_equal(bald([0.0, 2.0], [0.0, 0.0]), [0.0, 0.0])  # a known logit: no information
    for a, v in [(0.0, 1.0), (1.5, 2.0), (-3.0, 0.25), (0.0, 4.0), (-4.0, 9.0)]:
        assert bald([a], [v])[0] == pytest.approx(mi_by_integration(a, v), abs=1e-6)


def test_epistemic_ranks_by_mutual_information():
    # No labels yet: the posterior is the prior (s^2 = 1), so a pair's logit is N(o, |z|^2).
    z, o = [[1.0, 0.0], [0.0, 0.5], [1.0, 0.0], [1.0, 1.0]], [0.0, 0.0, 3.0, 0.0]
    expected = sorted(range(4), key=lambda i: -mi_by_integration(o[i], float(np.sum(np.square(z[i])))))
    assert expected[:2] == [3, 0]  # offset 0 and variance 2, then variance 1
    out = select_pairs(feature_pairs(z, o), "epistemic", 4, rng())
    assert chosen(out) == [f"q{i}" for i in expected]
    assert chosen(select_pairs(feature_pairs(z, o), "certainty", 1, rng())) == ["q2"]
    # a larger prior variance scales every logit variance: the order is the same here
    assert chosen(select_pairs(feature_pairs(z, o), "epistemic", 2, rng(), prior_variance=4.0)) == ["q3", "q0"]


def test_epistemic_posterior_shrinks_the_labelled_direction():
    # Labels 1 on (2, 0) and (-2, 0) at offset 0: MAP 0, precision I + 1/4 (4 + 4) e1 e1^T = diag(3, 1),
    # so z = (1, 0) has logit variance 1/3 and z = (0, 1) variance 1: (0, 1) is the more informative.
    table = feature_pairs([[1.0, 0.0], [0.0, 1.0]])
    labelled = history([[2.0, 0.0], [-2.0, 0.0]], [1.0, 1.0])
    assert chosen(select_pairs(table, "epistemic", 1, rng(), history=labelled)) == ["q1"]
    # without labels both have variance 1: a tie, broken at random
    assert {chosen(select_pairs(table, "epistemic", 1, rng(s)))[0] for s in range(20)} == {"q0", "q1"}


@pytest.mark.parametrize("prior_variance", [1.0, 4.0])
def test_thompson_picks_with_the_posterior_probability(prior_variance):
    # A 1-d head, no labels: w ~ N(0, s^2). Two pairs with z = 1 (the same variance) and offsets 0 and 1:
    # the sampled Fisher information p (1 - p) is larger for q0 iff |w| < |w + 1| iff w > -1/2, so
    # q0 is the first pick with probability Phi(1 / (2 s)).
    table = feature_pairs([[1.0], [1.0]], offsets=[0.0, 1.0])
    n = 1000
    first = [chosen(select_pairs(table, "thompson", 1, rng(seed), prior_variance=prior_variance))[0]
             for seed in range(n)]
    phi = 0.5 * (1 + math.erf(1 / (2 * math.sqrt(prior_variance)) / math.sqrt(2)))  # 0.691, 0.599
    assert first.count("q0") / n == pytest.approx(phi, abs=0.05)  # 3.4 standard errors


def test_thompson_ignores_pairs_without_posterior_variance():
    # q0's completions differ but their features do not: no draw of w changes its preference.
    table = feature_pairs([[0.0, 0.0], [0.1, 0.0]], offsets=[0.0, 5.0])
    assert {chosen(select_pairs(table, "thompson", 1, rng(s)))[0] for s in range(50)} == {"q1"}


def test_diverse_is_greedy_d_optimal_by_hand_log_determinants():
    # A = I (s^2 = 1, no labels); det(I + z z^T) = 1 + |z|^2: 5 for (2, 0), 2 for (0, 1), 4.62 for
    # (1.9, 0.1): (2, 0) first. Then A = diag(5, 1): det(A + z z^T) = 5 * 2 = 10 for (0, 1) and
    # (5 + 3.61)(1 + 0.01) - 0.19^2 = 8.66 for (1.9, 0.1): (0, 1) second, though (1.9, 0.1) is longer.
    z = [[2.0, 0.0], [0.0, 1.0], [1.9, 0.1]]
    a0 = np.eye(2)
    assert [np.linalg.det(a0 + np.outer(x, x)) for x in np.array(z)] == pytest.approx([5.0, 2.0, 4.62])
    a1 = np.diag([5.0, 1.0])
    assert [np.linalg.det(a1 + np.outer(x, x)) for x in np.array(z)[1:]] == pytest.approx([10.0, 8.66])
    assert chosen(select_pairs(feature_pairs(z), "diverse", 3, rng())) == ["q0", "q1", "q2"]
    # A labelled (3, 0) is already in the design: A = diag(10, 1), gains 1 + 4/10, 1 + 1, 1 + 0.361 + 0.01.
    labelled = history([[3.0, 0.0]], [1.0])
    assert chosen(select_pairs(feature_pairs(z), "diverse", 3, rng(), history=labelled)) == ["q1", "q0", "q2"]


def test_diverse_certainty_designs_among_the_most_certain():
    # Certainties 3, 2, 1 with z = (1, 0), (0, 2), (0, 5); M = 1, f_d = 2: the design pool is q0 and q1,
    # gains log(1 + 1) and log(1 + 4): q1. Diverse alone takes q2 (1 + 25), certainty q0.
    table = feature_pairs([[1.0, 0.0], [0.0, 2.0], [0.0, 5.0]], certainties=[3.0, 2.0, 1.0])
    assert chosen(select_pairs(table, "diverse_certainty", 1, rng(), diversity_factor=2)) == ["q1"]
    assert chosen(select_pairs(table, "diverse", 1, rng())) == ["q2"]
    assert chosen(select_pairs(table, "certainty", 1, rng())) == ["q0"]
    # the order goes on: the design (q1, q0), then the rest by certainty (q2)
    assert chosen(select_pairs(table, "diverse_certainty", 1, rng(), diversity_factor=2, exclude={"q1"})) == ["q0"]
    assert chosen(select_pairs(table, "diverse_certainty", 1, rng(), diversity_factor=2,
                               exclude={"q0", "q1"})) == ["q2"]


def random_feature_problem(seed=3):
    r = rng(seed)
    table = feature_pairs(r.normal(size=(12, 3)), offsets=r.normal(size=12))
    return table, history(r.normal(size=(5, 3)), r.random(5).round(1), offsets=r.normal(size=5))


@pytest.mark.parametrize("function", FEATURE_FUNCTIONS)
def test_feature_functions_are_reproducible_and_exclusion_only_replaces(function):
    table, labelled = random_feature_problem()
    first = chosen(select_pairs(table, function, 4, rng(7), history=labelled, diversity_factor=2))
    assert len(set(first)) == 4
    assert first == chosen(select_pairs(table, function, 4, rng(7), history=labelled, diversity_factor=2))
    again = chosen(select_pairs(table, function, 4, rng(7), history=labelled, diversity_factor=2,
                                exclude={first[1]}))
    assert again[:3] == [first[0], first[2], first[3]] and again[3] not in first


@pytest.mark.parametrize("function", FEATURE_FUNCTIONS)
def test_feature_function_ties_break_at_random(function):
    table = feature_pairs([[1.0, 0.5]] * 10)  # every candidate the same: all ties
    picks = [tuple(chosen(select_pairs(table, function, 3, rng(s)))) for s in range(100)]
    assert picks[:10] == [tuple(chosen(select_pairs(table, function, 3, rng(s)))) for s in range(10)]
    assert len(set(picks)) > 20
    assert {p for pick in picks for p in pick} == set(table.pair_id)  # not positional


def test_feature_functions_need_features():
    with pytest.raises(ValueError, match="lacks column"):
        select_pairs(pairs(CERTAINTIES), "epistemic", 2, rng())


def test_feature_config_keys_are_checked():
    base, small = Path(__file__).parent.parent / "configs" / "paper_tldr.yaml", "acquisition.pair_factor=2"
    with pytest.raises(ConfigError, match="acquisition.diversity_factor"):  # f_d = 4 > f_g = 2
        load_config(base, [small, "acquisition.function=diverse_certainty"])
    load_config(base, [small, "acquisition.function=diverse"])  # f_d unused there
    for key in ("feature_dim=0", "prior_variance=0", "diversity_factor=0"):
        with pytest.raises(ConfigError, match=f"acquisition.{key.split('=')[0]}"):
            load_config(base, [f"acquisition.{key}"])


# ---- features from the scoring pass ----

def test_scoring_pass_returns_projected_mean_hidden_states(tiny_model_dir):
    import torch

    from apo_dist.models import load_model
    from apo_dist.scoring import feature_projection, sequence_logprobs

    model = load_model(str(tiny_model_dir), device="cpu")
    prompts, completions = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[20, 21], [22, 23, 24, 25], [26]]
    plain = sequence_logprobs(model, prompts, completions, 1, batch_size=2, progress=False)
    two = sequence_logprobs(model, prompts, completions, 1, batch_size=2, progress=False, feature_dim=4,
                            feature_seed=3)
    one = sequence_logprobs(model, prompts, completions, 1, batch_size=1, progress=False, feature_dim=4,
                            feature_seed=3)
    np.testing.assert_array_equal(two["logp"], plain["logp"])  # the same forward pass
    projection = feature_projection(128, 4, 3)
    assert projection.shape == (128, 4) and np.array_equal(projection, feature_projection(128, 4, 3))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            h = model.model(torch.tensor([p + c])).last_hidden_state[0, len(p):].mean(0).numpy()
        expected = h / np.linalg.norm(h) @ projection
        assert two["features"][i].dtype == np.float32
        np.testing.assert_allclose(two["features"][i], expected, atol=1e-5)
        np.testing.assert_allclose(one["features"][i], expected, atol=1e-5)


def test_acquired_stage_takes_fewer_pairs_when_completions_are_identical(tmp_path, tiny_overrides, caplog):
    from apo_dist.context import RunContext
    from apo_dist.rundir import write_table
    from apo_dist.stages.acquire import acquired

    cfg = load_config(Path(__file__).parent.parent / "configs" / "test_tiny.yaml",
                      [*tiny_overrides, "acquisition.function=random"])  # M = 8 prompts, one pair each
    ctx = RunContext(cfg, tmp_path, progress=False)
    table = pairs([0.0] * 8)
    table.loc[[2, 5], "tokens_b"] = pd.Series([[7, 2], [7, 5]], index=[2, 5])
    write_table(ctx.rd.path("scores", 0), table)
    outputs, metrics = acquired(ctx, 0)
    assert sorted(outputs["acquired"]["pair_id"]) == ["q0", "q1", "q3", "q4", "q6", "q7"]
    assert (metrics["pairs"], metrics["identical_pairs"]) == (6, 2)
    assert "6 pairs acquired instead of 8: 2 of 8 candidate pairs have identical completions" in caplog.text
