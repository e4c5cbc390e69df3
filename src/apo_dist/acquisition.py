"""Acquisition: choose which candidate pairs go to the oracle (Muldrew et al. 2024, section 4).

A round selects in two steps, both pure functions over pandas tables:

1. ``select_prompts`` on the pool's per-prompt entropies: entropy keeps the top M prompts,
   hybrid the top f_g * M; random, certainty and uncertainty keep every prompt.
2. ``select_pairs`` on the scored candidate pairs (one row per pair): random and entropy take M
   at random, certainty and hybrid the M with the highest certainty |r1 - r2|, uncertainty the
   M with the lowest.

The pool is over-sampled so that these steps have something to choose from (f_p =
``prompt_factor``, f_g = ``pair_factor``): random draws M prompts, entropy f_p * M,
certainty/uncertainty f_g * M, hybrid f_p * f_g * M. That sizing lives in
``counts.round_counts``. Ties (all of round 0, where policy == reference and
every certainty is 0) break at random with the caller's seeded generator, never by position.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import AcquisitionFunction
from .counts import ENTROPY_FUNCTIONS


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
                 exclude: set | None = None) -> pd.DataFrame:
    """Step 2: choose up to M pairs for the oracle.

    ``scores`` has one row per candidate pair (pair_id, prompt_id, reward_a, reward_b,
    certainty). Returns the chosen rows in rank order with an int column ``acquisition_rank``
    (0 first) and a fresh index. Pairs whose pair_id is in ``exclude`` are never chosen; the
    next best take their place. The ranking (tie-break included) is drawn over all candidates
    before exclusion, so excluding pairs from an earlier choice only replaces those pairs.

    For entropy the pool already holds one pair per selected prompt: when it holds exactly M all
    are taken (in random order), otherwise M at random. When fewer than M candidates remain,
    all of them are returned and the caller reports the shortfall.
    """
    _check_args(function, m)
    _require(scores, ["pair_id", "prompt_id", "reward_a", "reward_b", "certainty"])
    values = scores["certainty"].to_numpy(dtype=float)
    if function in ("random", "entropy"):
        order = rng.permutation(len(scores))
    else:
        if np.isnan(values).any():
            raise ValueError(f"{function} acquisition needs a certainty for every pair; "
                             f"{int(np.isnan(values).sum())} of {len(values)} are NaN")
        order = _ranked_order(values if function == "uncertainty" else -values, rng)
    ranked = scores.iloc[order]
    if exclude:
        ranked = ranked[~ranked["pair_id"].isin(exclude)]
    out = ranked.head(m).reset_index(drop=True)
    out["acquisition_rank"] = np.arange(len(out))
    return out


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
