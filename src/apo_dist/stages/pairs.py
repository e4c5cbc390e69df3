"""Candidate pairs: two completions per kept prompt, then their log-probs under the policy and the
reference, the implicit rewards and the preference certainty of each pair."""
from __future__ import annotations

import pandas as pd

from ..context import RunContext
from ..counts import uses_features
from ..rundir import RUN
from ..scoring import HISTORY_COLUMNS, pair_sequences, pair_table, rescored_pairs


def samples(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """samples: two completions at the pair temperature for every prompt the entropy step kept."""
    prompts = ctx.rd.table("pool", r)
    kept = ctx.rd.table("entropy", r).query("selected")["prompt_id"]
    prompts = prompts[prompts["prompt_id"].isin(kept)].reset_index(drop=True)
    params = ctx.sampling(2, ctx.cfg.generation.pair_temperature, ctx.seed(r, "samples"))
    table = ctx.generate(ctx.policy_path(r), prompts, params)
    return {"samples": table}, {"samples": len(table), **ctx.server_restarts()}


def scores(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """scores: one row per pair with policy and reference log-probs, rewards and certainty. For the
    feature functions the policy's pass also gives each completion's features, and scores the labelled
    pairs of rounds < r with them: history, those pairs' rewards and features under this policy."""
    table = ctx.rd.table("samples", r)
    shards = ctx.rd.round_dir(r) / "shards"
    policy = ctx.policy_path(r)
    k = ctx.cfg.acquisition.feature_dim if uses_features(ctx.cfg) else 0
    labelled = pd.concat([ctx.rd.table("labels", q).assign(round=q) for q in range(r)], ignore_index=True) \
        if k and r else None
    sequences = table if labelled is None else pd.concat([table[["prompt_ids", "token_ids"]],
                                                          pair_sequences(labelled)], ignore_index=True)
    scored = ctx.logprobs(policy, sequences, desc="score policy", shard_dir=shards / "policy",
                          feature_dim=k, feature_seed=ctx.seed(RUN, "feature_projection"))
    table["policy_logp"] = scored["logp"].values[:len(table)]
    if k:
        table["features"] = scored["features"].values[:len(table)]
    if policy == ctx.reference_path:
        table["ref_logp"] = table["policy_logp"]
    else:
        table["ref_logp"] = ctx.logprobs(ctx.reference_path, table, desc="score reference",
                                         shard_dir=shards / "reference")["logp"].values
    pairs = pair_table(table, ctx.cfg.training.beta)
    metrics = {"pairs": len(pairs), "mean_certainty": float(pairs["certainty"].mean())}
    if not k:
        return {"scores": pairs}, metrics
    history = rescored_pairs(labelled, scored.iloc[len(table):], ctx.cfg.training.beta) if r else \
        pd.DataFrame(columns=HISTORY_COLUMNS)
    return {"scores": pairs, "history": history}, {**metrics, "history_pairs": len(history)}
