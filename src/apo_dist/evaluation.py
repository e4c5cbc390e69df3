"""Evaluation statistics: win-rate, oracle score and KL per round, with standard errors that treat
the eval prompt as the unit (several samples of one prompt are not independent draws)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

Z95 = 1.959964  # two-sided 95% normal quantile


def clustered_mean(values, clusters=None) -> tuple[float, float, int]:
    """(mean, standard error, number of clusters) of `values` (shape (n,)) grouped by `clusters`
    (shape (n,), e.g. the prompt id of each pair; None: every value its own cluster).

    The mean is the mean of the per-cluster means and the standard error their standard deviation
    (ddof 1) over sqrt(clusters): cluster-robust when every cluster has the same size, as the eval
    prompts' samples do. With one value per cluster it is the usual mean and standard error."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("clustered_mean needs at least one value")
    if clusters is not None:  # first-appearance order: with singletons, exactly the values as given
        x = pd.Series(x).groupby(np.asarray(clusters), sort=False).mean().to_numpy()
    stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), stderr, len(x)


def win_rate(outcomes, clusters=None) -> dict:
    """Win-rate of outcomes (shape (n,): 1 win, 0 loss, 0.5 tie, or a soft P(win)), the counts of
    hard wins, losses and ties, and the prompt-clustered standard error (see `clustered_mean`).
    n = n_pairs = outcomes; n_prompts = clusters."""
    x = np.asarray(outcomes, dtype=float)
    rate, stderr, n_prompts = clustered_mean(x, clusters)
    return {"win_rate": rate, "stderr": stderr, "n": len(x), "n_pairs": len(x), "n_prompts": n_prompts,
            "wins": int((x > 0.5).sum()), "losses": int((x < 0.5).sum()),
            "ties": int((x == 0.5).sum()), "tie_rate": float((x == 0.5).mean())}


def soft_outcomes(policy_scores, reference_scores, temperature: float) -> np.ndarray:
    """P(policy preferred) = sigmoid((s_policy - s_reference) / temperature) per pair (shape (n,)):
    the Bradley-Terry probability a score oracle's noisy answers are drawn from (oracles/base.py)."""
    margin = (np.asarray(policy_scores, dtype=float) - np.asarray(reference_scores, dtype=float)) / temperature
    return 1.0 / (1.0 + np.exp(-margin))


def score_summary(policy_scores, reference_scores, clusters) -> dict:
    """Mean oracle score of the policy's and the reference's completions (paired rows, shape (n,)),
    and of their per-pair difference, each with its prompt-clustered standard error."""
    p, r = np.asarray(policy_scores, dtype=float), np.asarray(reference_scores, dtype=float)
    out = {}
    for name, x in (("score", p), ("reference_score", r), ("score_diff", p - r)):
        out[name], out[f"{name}_stderr"], _ = clustered_mean(x, clusters)
    return out


def kl_estimate(policy_logp, sft_logp, clusters) -> dict:
    """Sequence-level KL(policy || SFT) from samples of the policy (shape (n,) each): the mean of
    log pi_policy(y|x) - log pi_sft(y|x), with its prompt-clustered standard error."""
    kl, stderr, _ = clustered_mean(np.asarray(policy_logp, dtype=float) - np.asarray(sft_logp, dtype=float), clusters)
    return {"kl": kl, "kl_stderr": stderr, "kl_samples": len(policy_logp)}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% by default)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def first_shown_rate(outcomes, policy_shown_first) -> dict:
    """How often an LLM judge chose the candidate it was shown first, over its decisive answers
    (outcome, P(policy preferred), neither 0.5 nor NaN), with a Wilson 95% interval. Both arrays have
    shape (n,); `policy_shown_first` is True where the policy's completion was shown as A.
    `position_bias` is True when the interval excludes 0.5. Empty dict when no answer was decisive."""
    x = np.asarray(outcomes, dtype=float)
    decisive = ~np.isnan(x) & (x != 0.5)
    n = int(decisive.sum())
    if n == 0:
        return {}
    first = np.where(np.asarray(policy_shown_first, dtype=bool), x > 0.5, x < 0.5)[decisive]
    k = int(first.sum())
    low, high = wilson_interval(k, n)
    return {"first_shown_rate": k / n, "first_shown_n": n, "first_shown_ci": [low, high],
            "position_bias": bool(low > 0.5 or high < 0.5)}
