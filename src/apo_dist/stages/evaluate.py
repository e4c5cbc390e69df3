"""Evaluation: the eval prompts' reference completions (once), and each round's win-rate of the
policy's completions against them, judged by the eval oracle; for score oracles also the mean
oracle score, and the KL divergence of the policy from the SFT model."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..context import RunContext
from ..evaluation import clustered_mean, first_shown_rate, kl_estimate, score_summary, soft_outcomes, win_rate
from ..oracles.registry import make_oracle
from .prompts import split


def eval_completions(ctx: RunContext, model_path: str, seed: int) -> pd.DataFrame:
    """eval.samples_per_prompt completions per eval prompt at the eval temperature. Each model gets
    its own seed: at T > 0 the policy's and the reference's samples are drawn independently, as in
    the paper."""
    e = ctx.cfg.eval
    return ctx.generate(model_path, split(ctx, "eval"), ctx.sampling(e.samples_per_prompt, e.temperature, seed))


def completion_scores(oracle_cfg, oracle, prompts: list[str], completions: list[str]) -> np.ndarray | None:
    """The oracle's score of each prompt + completion (shape (n,)), for oracles that score one
    completion at a time: those with `scores(texts)` (sentiment, readability, reward_model), and a
    custom labeller with a `scores(prompts, completions)` attribute (e.g. a callable object with a
    `scores` method). None for the others (an LLM judge)."""
    texts = [p + c for p, c in zip(prompts, completions)]
    if oracle_cfg.kind != "custom":
        scores = getattr(oracle, "scores", None)
        return None if scores is None else np.array(scores(texts), dtype=float)
    scores = getattr(getattr(oracle, "fn", None), "scores", None)
    if scores is None:
        return None
    out = np.asarray(list(scores(prompts, completions)), dtype=float)
    if out.shape != (len(texts),):
        raise ValueError(f"{oracle.identity}: scores() returned {out.shape} for {len(texts)} completions")
    return out


def paired_reference(policy: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """The reference row each policy row is judged against: the same prompt's reference sample with
    the same index, or its only one (eval.reference=dataset). Rows in the policy's order."""
    sample = policy["sample"] if reference["sample"].max() > 0 else 0
    keys = pd.DataFrame({"prompt_id": policy["prompt_id"].values, "sample": sample})
    paired = keys.merge(reference[["prompt_id", "sample", "completion"]], on=["prompt_id", "sample"], how="left")
    if paired["completion"].isna().any():
        raise RuntimeError("eval_reference lacks a reference completion for some eval samples")
    return paired


def kl_to_sft(ctx: RunContext, r: int, oracle_cfg, oracle) -> dict:
    """KL(policy || SFT) from eval.kl_samples samples of the policy per eval prompt at T = 1 from its
    own distribution (no top-p/top-k; under generation.fixed_length, with EOS suppressed, as every
    completion is drawn), both log-probs by the scorer; with a score oracle, the samples' mean score
    (`kl_score`: the reward of the reward-KL frontier)."""
    path = str(ctx.rd.path("policy", r))
    samples = ctx.generate(path, split(ctx, "eval"),
                           ctx.sampling(ctx.cfg.eval.kl_samples, 1.0, ctx.seed(r, "eval_kl"), truncate=False))
    policy_logp = ctx.logprobs(path, samples, desc="score policy (KL)")["logp"].to_numpy()
    sft_logp = ctx.logprobs(ctx.sft_path, samples, desc="score SFT (KL)")["logp"].to_numpy()
    clusters = samples["prompt_id"].to_numpy()
    out = kl_estimate(policy_logp, sft_logp, clusters)
    scores = completion_scores(oracle_cfg, oracle, list(samples["prompt"]), list(samples["completion"]))
    if scores is not None:
        out["kl_score"], out["kl_score_stderr"], _ = clustered_mean(scores, clusters)
    return out


def eval_reference(ctx: RunContext, _) -> tuple[dict, dict]:
    """eval_reference: the SFT model's completions, or the data's own references (eval.reference=dataset)."""
    if ctx.cfg.eval.reference == "dataset":
        prompts = split(ctx, "eval")
        token_ids = [ctx.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts["reference"]]
        table = prompts[["prompt_id", "prompt", "prompt_ids"]].assign(
            sample=0, token_ids=token_ids, token_logprobs=None, completion=prompts["reference"],
            finish_reason="reference")
        return {"eval_reference": table}, {"completions": len(table), "what": "eval_reference", "reference": "dataset"}
    table = eval_completions(ctx, ctx.sft_path, ctx.seed(0, "eval_reference"))
    return {"eval_reference": table}, {"completions": len(table), "what": "eval_reference", **ctx.server_restarts()}


def evaluate(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """eval_samples (the policy's completions; with a score oracle, each one's score and its
    reference's) and eval: win-rate with its standard error clustered by prompt, counts, and where
    the oracle gives them, mean scores, the soft win-rate, KL to the SFT model, and an LLM judge's
    rate of choosing the candidate shown first.

    A pair the judge could not judge counts as a win or a loss by a seeded coin (the paper broke
    them at random); dropping them would bias the rate when the judge fails more often on bad
    outputs. Their number is reported as `unjudged`."""
    cfg, rd = ctx.cfg, ctx.rd
    policy = eval_completions(ctx, str(rd.path("policy", r)), ctx.seed(r, "eval"))
    reference = paired_reference(policy, rd.table("eval_reference"))
    judge_cfg = cfg.eval.oracle or cfg.oracle
    oracle = make_oracle(judge_cfg, cfg.seed, deterministic=True)
    prompts, a, b = list(policy["prompt"]), list(policy["completion"]), list(reference["completion"])
    outcomes, asked = ctx.ask(oracle, prompts, a, b, judge_cfg.batch_size, "judge")
    unjudged = np.isnan(outcomes)
    if unjudged.all():
        raise RuntimeError(f"round {r}: the eval judge could not judge any of {len(outcomes)} eval pairs")
    coins = np.random.default_rng(ctx.seed(r, "eval_unjudged")).integers(0, 2, len(outcomes)).astype(float)
    clusters = policy["prompt_id"].to_numpy()
    result = win_rate(np.where(unjudged, coins, outcomes), clusters)
    result["unjudged"] = int(unjudged.sum())
    result["identical"] = sum(x == y for x, y in zip(a, b))  # ties that were never sent to the judge
    scores = completion_scores(judge_cfg, oracle, prompts + prompts, a + b)
    if scores is not None:
        policy_scores, reference_scores = scores[:len(a)], scores[len(a):]
        policy = policy.assign(score=policy_scores, reference_score=reference_scores)
        result.update(score_summary(policy_scores, reference_scores, clusters))
        soft = win_rate(soft_outcomes(policy_scores, reference_scores, judge_cfg.noise_temperature), clusters)
        result.update(soft_win_rate=soft["win_rate"], soft_stderr=soft["stderr"])
        if cfg.eval.outcome == "soft":
            result.update(hard_win_rate=result["win_rate"], hard_stderr=result["stderr"],
                          win_rate=soft["win_rate"], stderr=soft["stderr"])
    elif cfg.eval.outcome == "soft":
        raise RuntimeError(f"eval.outcome=soft needs per-completion scores, and the eval judge ({judge_cfg.kind}: "
                           f"{oracle.identity}) gives none (a custom labeller needs a `scores` attribute)")
    result["outcome"] = str(cfg.eval.outcome)
    if judge_cfg.kind == "llm_judge" and not judge_cfg.both_orders:
        policy_first = [oracle.shown_order(p, x, y) == "ab" for p, x, y in zip(prompts, a, b)]
        result.update(first_shown_rate(outcomes, policy_first))
    if cfg.eval.kl_samples:
        result.update(kl_to_sft(ctx, r, judge_cfg, oracle))
    labels_so_far = sum(len(rd.table("labels", q)) for q in range(r + 1))
    result.update(round=r, labels=labels_so_far, oracle_requests=asked)
    return {"eval_samples": policy, "eval": result}, {**result, **ctx.server_restarts()}
