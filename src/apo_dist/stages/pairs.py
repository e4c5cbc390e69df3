"""Candidate pairs: two completions per kept prompt, then their log-probs under the policy and the
reference, the implicit rewards and the preference certainty of each pair."""
from __future__ import annotations

from ..context import RunContext
from ..scoring import pair_table


def samples(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """samples: two completions at the pair temperature for every prompt the entropy step kept."""
    prompts = ctx.rd.table("pool", r)
    kept = ctx.rd.table("entropy", r).query("selected")["prompt_id"]
    prompts = prompts[prompts["prompt_id"].isin(kept)].reset_index(drop=True)
    params = ctx.sampling(2, ctx.cfg.generation.pair_temperature, ctx.seed(r, "samples"))
    table = ctx.generate(ctx.policy_path(r), prompts, params)
    return {"samples": table}, {"samples": len(table)}


def scores(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """scores: one row per pair with policy and reference log-probs, rewards and certainty."""
    table = ctx.rd.table("samples", r)
    shards = ctx.rd.round_dir(r) / "shards"
    policy = ctx.policy_path(r)
    table["policy_logp"] = ctx.logprobs(policy, table, desc="score policy", shard_dir=shards / "policy")["logp"].values
    if policy == ctx.reference_path:
        table["ref_logp"] = table["policy_logp"]
    else:
        table["ref_logp"] = ctx.logprobs(ctx.reference_path, table, desc="score reference",
                                         shard_dir=shards / "reference")["logp"].values
    pairs = pair_table(table, ctx.cfg.training.beta)
    return {"scores": pairs}, {"pairs": len(pairs), "mean_certainty": float(pairs["certainty"].mean())}
