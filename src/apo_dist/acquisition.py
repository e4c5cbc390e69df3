"""Acquisition: choose which candidate pairs go to the oracle (Muldrew et al. 2024, section 4).

A round selects in two steps, both pure functions over pandas tables:

1. ``select_prompts`` on the pool's per-prompt entropies: entropy keeps the top M prompts,
   hybrid the top f_g * M; every other function keeps every prompt.
2. ``select_pairs`` on the scored candidate pairs (one row per pair): random and entropy take M
   at random, certainty and hybrid the M with the highest certainty |r1 - r2|, uncertainty the
   M with the lowest; the feature functions below choose with a Bayesian linear head. A pair
   whose two completions are the same tokens is never chosen, whatever the function.

The pool is over-sampled so that these steps have something to choose from (f_p =
``prompt_factor``, f_g = ``pair_factor``): random draws M prompts, entropy f_p * M,
certainty/uncertainty and the feature functions f_g * M, hybrid f_p * f_g * M. That sizing lives
in ``counts.round_counts``. Ties (all of round 0, where policy == reference and every certainty is
0) break at random with the caller's seeded generator, never by position.

Feature functions. Each completion has features phi(x, y) [k] (scoring.sequence_logprobs: the
policy's final hidden state mean-pooled over the completion, L2-normalised, randomly projected to
k = ``feature_dim``); a pair has z = phi_a - phi_b and offset o = r_a - r_b. The head is

    P(a preferred) = sigmoid(o + w . z),   w ~ N(0, s^2 I)  (s^2 = ``prior_variance``),

fitted by a Laplace approximation N(mean, cov) on the labelled pairs of earlier rounds, rescored
by the round's policy (the ``history`` table; none in round 0: the posterior is the prior). Under
it a pair's logit o + w . z is N(a, v), a = o + mean . z, v = z^T cov z.

- epistemic: the M pairs with the largest BALD mutual information between the label and w,
  I = H[E p] - E H[p], p = sigmoid(s), s ~ N(a, v) (64-node Gauss-Hermite quadrature, nats).
- thompson: M picks; pick j draws w_j from the posterior and takes the remaining pair with the
  largest Fisher information about w under that draw, p_j (1 - p_j) v, p_j = sigmoid(o + w_j . z).
  (The pool holds one pair per prompt, so a draw chooses among prompts, not completions.)
- diverse: greedy D-optimal design on z: each pick maximises log det(A + z z^T) - log det A =
  log(1 + z^T A^-1 z), A = I / s^2 + the z z^T of every labelled pair so far and of this round's
  picks (labels and rewards unused).
- diverse_certainty: the same greedy design among the f_d * M pairs (f_d = ``diversity_factor``)
  with the highest certainty.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .config import AcquisitionFunction
from .counts import ENTROPY_FUNCTIONS, FEATURE_FUNCTIONS


def implicit_reward(logp_policy, logp_ref, beta: float) -> np.ndarray:
    """DPO implicit reward beta * (log pi_theta(y|x) - log pi_ref(y|x))."""
    return beta * (np.asarray(logp_policy, dtype=float) - np.asarray(logp_ref, dtype=float))


def certainty(reward_a, reward_b) -> np.ndarray:
    """Preference certainty |r_a - r_b| of each pair."""
    return np.abs(np.asarray(reward_a, dtype=float) - np.asarray(reward_b, dtype=float))


def bt_probability(reward_a, reward_b) -> np.ndarray:
    """Bradley-Terry probability that a is preferred: sigmoid(r_a - r_b), overflow-safe."""
    d = np.asarray(reward_a, dtype=float) - np.asarray(reward_b, dtype=float)
    e = np.exp(-np.abs(d))
    return np.where(d >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def select_prompts(entropy: pd.DataFrame, function: str, keep: int,
                   rng: np.random.Generator) -> pd.DataFrame:
    """Step 1: mark the prompts whose pairs go on to step 2.

    ``keep`` is the round's ``counts.round_counts(...).pair_prompts``: M for entropy, f_g * M for
    hybrid, the whole pool for the functions that ignore entropy. Returns a copy of ``entropy``
    (columns prompt_id, entropy) with a bool column ``selected`` and an int column
    ``entropy_rank`` (0 = highest entropy; every row is ranked for entropy and hybrid, -1
    everywhere for the other functions). Raises ValueError when fewer than ``keep`` prompts are
    given or an entropy that is needed is NaN.
    """
    _check_args(function, keep)
    _require(entropy, ["prompt_id", "entropy"])
    if len(entropy) < keep:
        raise ValueError(f"{function} acquisition keeps {keep} prompts for pair generation, got {len(entropy)}")
    out = entropy.copy()
    if function not in ENTROPY_FUNCTIONS:
        out["selected"] = True
        out["entropy_rank"] = -1
        return out
    values = out["entropy"].to_numpy(dtype=float)
    if np.isnan(values).any():
        raise ValueError(f"{function} acquisition needs an entropy for every prompt; "
                         f"{int(np.isnan(values).sum())} of {len(values)} are NaN")
    rank = np.empty(len(values), dtype=int)
    rank[_ranked_order(-values, rng)] = np.arange(len(values))
    out["entropy_rank"] = rank
    out["selected"] = rank < keep
    return out


def select_pairs(scores: pd.DataFrame, function: str, m: int, rng: np.random.Generator,
                 exclude: set | None = None, history: pd.DataFrame | None = None,
                 prior_variance: float = 1.0, diversity_factor: int = 4) -> pd.DataFrame:
    """Step 2: choose up to M pairs for the oracle.

    ``scores`` has one row per candidate pair (pair_id, prompt_id, tokens_a, tokens_b, reward_a,
    reward_b, certainty; the feature functions also features_a, features_b [k]). Returns the chosen
    rows in rank order with an int column ``acquisition_rank`` (0 first) and a fresh index. Pairs
    of identical completions (tokens_a == tokens_b) are never chosen. Pairs whose pair_id is in
    ``exclude`` are never chosen either; the next best take their place: the ranking (tie-break and
    draws included) is made over all candidates before exclusion, so excluding pairs from an earlier
    choice only replaces those pairs. ``history`` (feature functions: the labelled pairs of earlier
    rounds with reward_a, reward_b, label, features_a, features_b under the round's policy; None or
    empty in round 0), ``prior_variance`` (s^2) and ``diversity_factor`` (f_d) as in the module doc.

    For entropy the pool already holds one pair per selected prompt: when it holds exactly M all
    are taken (in random order), otherwise M at random. When fewer than M candidates remain,
    all of them are returned and the caller reports the shortfall.
    """
    _check_args(function, m)
    _require(scores, ["pair_id", "prompt_id", "tokens_a", "tokens_b", "reward_a", "reward_b", "certainty"])
    candidates = scores[~identical_pairs(scores)]
    exclude = set(exclude or ())
    values = candidates["certainty"].to_numpy(dtype=float)
    if function in ("random", "entropy"):
        order = rng.permutation(len(candidates))
    else:
        if np.isnan(values).any():
            raise ValueError(f"{function} acquisition needs a certainty for every pair; "
                             f"{int(np.isnan(values).sum())} of {len(values)} are NaN")
        if function in FEATURE_FUNCTIONS:
            picks = m + int(candidates["pair_id"].isin(exclude).sum())  # enough left after exclusion
            order = _feature_order(candidates, function, picks, rng, history, prior_variance,
                                   diversity_factor * m)
        else:
            order = _ranked_order(values if function == "uncertainty" else -values, rng)
    ranked = candidates.iloc[order]
    ranked = ranked[~ranked["pair_id"].isin(exclude)]
    out = ranked.head(m).reset_index(drop=True)
    out["acquisition_rank"] = np.arange(len(out))
    return out


def identical_pairs(scores: pd.DataFrame) -> np.ndarray:
    """[n] bool: the pair's two completions are the same token ids."""
    return np.array([len(a) == len(b) and bool(np.all(np.asarray(a) == np.asarray(b)))
                     for a, b in zip(scores["tokens_a"], scores["tokens_b"])], dtype=bool)


def pair_features(table: pd.DataFrame, k: int) -> np.ndarray:
    """[n, k] float64: z = features_a - features_b of each row (n may be 0)."""
    if not len(table):
        return np.zeros((0, k))
    return (np.stack(table["features_a"].to_numpy()).astype(float)
            - np.stack(table["features_b"].to_numpy()).astype(float))


def laplace_posterior(z: np.ndarray, offset: np.ndarray, label: np.ndarray,
                      prior_variance: float) -> tuple[np.ndarray, np.ndarray]:
    """Laplace approximation N(mean [k], cov [k, k]) to the posterior of w in
    P(a preferred) = sigmoid(offset + w . z), w ~ N(0, prior_variance I), given soft labels in [0, 1].

    z [n, k], offset [n], label [n]. The mean is the MAP (damped Newton on the convex negative log
    posterior); cov = (I / s^2 + sum_i p_i (1 - p_i) z_i z_i^T)^-1 at the MAP. n = 0: the prior.
    """
    k = z.shape[1]
    precision0 = np.eye(k) / prior_variance

    def objective(w):  # negative log posterior, up to a constant
        s = offset + z @ w
        return float(np.sum(label * np.logaddexp(0, -s) + (1 - label) * np.logaddexp(0, s))
                     + w @ w / (2 * prior_variance))

    def hessian(p):
        return precision0 + (z * (p * (1 - p))[:, None]).T @ z

    w = np.zeros(k)
    for _ in range(100):
        p = sigmoid(offset + z @ w)
        step = np.linalg.solve(hessian(p), z.T @ (p - label) + w / prior_variance)
        t, f0 = 1.0, objective(w)
        while objective(w - t * step) > f0 and t > 1e-10:
            t /= 2
        w = w - t * step
        if np.max(np.abs(t * step), initial=0.0) < 1e-12:
            break
    return w, np.linalg.inv(hessian(sigmoid(offset + z @ w)))


def logit_moments(z: np.ndarray, offset: np.ndarray, mean: np.ndarray,
                  cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean a [n] and variance v [n] of each pair's logit offset + w . z under w ~ N(mean, cov)."""
    return offset + _rowdot(z, mean), np.einsum("ij,jk,ik->i", z, cov, z)


def _rowdot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x [n, k] @ y [k], row by row in the same order: equal rows give equal results (BLAS's matrix-vector
    product may not, which would break ties by position)."""
    return np.einsum("ij,j->i", x, y)


# Gauss-Hermite rule for expectations over t ~ N(0, 1). Its error on the mutual information is below
# 1e-6 nats for logit variances v up to 9 (features are unit vectors, so v <= 4 s^2: prior variances
# up to 2), about 1e-4 nats at v = 25 and 1e-2 at v = 100.
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(64)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)


def bald(mean_logit: np.ndarray, var_logit: np.ndarray) -> np.ndarray:
    """[n] mutual information (nats) between the label y ~ Bernoulli(sigmoid(s)) and s ~ N(a, v):
    H[E sigmoid(s)] - E H[sigmoid(s)], by Gauss-Hermite quadrature; exactly 0 where v = 0. a, v: [n]."""
    v = np.asarray(var_logit, float)
    s = np.asarray(mean_logit, float)[:, None] + np.sqrt(v)[:, None] * _NODES
    p = sigmoid(s)
    entropy_each = p * np.logaddexp(0, -s) + (1 - p) * np.logaddexp(0, s)  # H[sigmoid(s)], stable in s
    mi = _binary_entropy(_rowdot(p, _WEIGHTS)) - _rowdot(entropy_each, _WEIGHTS)
    return np.where(v > 0, np.maximum(mi, 0.0), 0.0)


def sigmoid(x) -> np.ndarray:
    return bt_probability(x, 0.0)


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = [np.where(q > 0, -q * np.log(q), 0.0) for q in (p, 1 - p)]
    return terms[0] + terms[1]


def thompson_order(z: np.ndarray, offset: np.ndarray, mean: np.ndarray, cov: np.ndarray, picks: int,
                   rng: np.random.Generator) -> np.ndarray:
    """[min(picks, n)] positions: pick j draws w_j ~ N(mean, cov) and takes the remaining pair with
    the largest p (1 - p) z^T cov z, p = sigmoid(offset + w_j . z). z [n, k], offset [n]."""
    perm = rng.permutation(len(z))  # ties at random
    z, offset = z[perm], offset[perm]
    info = logit_moments(z, offset, mean, cov)[1]
    chol = np.linalg.cholesky(cov)
    free = np.ones(len(z), dtype=bool)
    out = []
    for _ in range(min(picks, len(z))):
        p = sigmoid(offset + _rowdot(z, mean + chol @ rng.standard_normal(len(mean))))
        j = int(np.argmax(np.where(free, p * (1 - p) * info, -np.inf)))
        free[j] = False
        out.append(j)
    return perm[np.array(out, dtype=int)]


def d_optimal_order(z: np.ndarray, precision: np.ndarray, picks: int, rng: np.random.Generator) -> np.ndarray:
    """[min(picks, n)] positions of a greedy D-optimal design: each pick maximises
    log det(A + z z^T) - log det A = log(1 + z^T A^-1 z), A = precision [k, k] + the picks so far."""
    perm = rng.permutation(len(z))  # ties at random
    z = z[perm]
    cov = np.linalg.inv(precision)
    gain = np.einsum("ij,jk,ik->i", z, cov, z)  # z^T A^-1 z, kept current by Sherman-Morrison
    free = np.ones(len(z), dtype=bool)
    out = []
    for _ in range(min(picks, len(z))):
        j = int(np.argmax(np.where(free, gain, -np.inf)))
        free[j] = False
        out.append(j)
        g = cov @ z[j]
        c = 1.0 + z[j] @ g
        cov = cov - np.outer(g, g) / c
        gain = gain - _rowdot(z, g) ** 2 / c
    return perm[np.array(out, dtype=int)]


def _feature_order(candidates: pd.DataFrame, function: str, picks: int, rng: np.random.Generator,
                   history: pd.DataFrame | None, prior_variance: float, design_pool: int) -> np.ndarray:
    """Positions of `candidates` in rank order (at least `picks` of them) for a feature function."""
    _require(candidates, ["features_a", "features_b"])
    k = len(candidates["features_a"].iloc[0]) if len(candidates) else 1
    z, offset = pair_features(candidates, k), _offset(candidates)
    if history is None or not len(history):
        zh, offset_h, label_h = np.zeros((0, k)), np.zeros(0), np.zeros(0)
    else:
        _require(history, ["reward_a", "reward_b", "label", "features_a", "features_b"])
        zh, offset_h, label_h = pair_features(history, k), _offset(history), history["label"].to_numpy(float)
    if function in ("epistemic", "thompson"):
        mean, cov = laplace_posterior(zh, offset_h, label_h, prior_variance)
        if function == "thompson":
            return thompson_order(z, offset, mean, cov, picks, rng)
        return _ranked_order(-bald(*logit_moments(z, offset, mean, cov)), rng)
    precision = np.eye(k) / prior_variance + zh.T @ zh
    if function == "diverse":
        return d_optimal_order(z, precision, picks, rng)
    by_certainty = _ranked_order(-candidates["certainty"].to_numpy(float), rng)  # diverse_certainty
    top = by_certainty[:design_pool]
    chosen = top[d_optimal_order(z[top], precision, picks, rng)]
    return np.concatenate([chosen, by_certainty[~np.isin(by_certainty, chosen)]])


def _offset(table: pd.DataFrame) -> np.ndarray:
    """[n] r_a - r_b of each row."""
    return table["reward_a"].to_numpy(float) - table["reward_b"].to_numpy(float)


def _ranked_order(key: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions sorted by ascending key, ties in random (seeded) order."""
    perm = rng.permutation(len(key))
    return perm[np.argsort(key[perm], kind="stable")]


def _check_args(function: str, m: int) -> None:  # m: a count that must be positive
    if function not in set(AcquisitionFunction):
        raise ValueError(f"unknown acquisition function {function!r}; "
                         f"choose one of {', '.join(AcquisitionFunction)}")
    if m < 1:
        raise ValueError(f"m (labels per round) must be >= 1, got {m}")


def _require(table: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}; has {list(table.columns)}")
