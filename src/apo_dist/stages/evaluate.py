"""Evaluation: the eval prompts' reference completions (once), and each round's win-rate of the
policy's completions against them, judged by the eval oracle."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..context import RunContext
from ..evaluation import win_rate
from ..oracles.registry import make_oracle
from .prompts import split


def eval_completions(ctx: RunContext, model_path: str, seed: int) -> pd.DataFrame:
    """One completion per eval prompt at the eval temperature. Each model gets its own seed: at
    T > 0 the policy's and the reference's samples are drawn independently, as in the paper."""
    return ctx.generate(model_path, split(ctx, "eval"), ctx.sampling(1, ctx.cfg.eval.temperature, seed))


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
    return {"eval_reference": table}, {"completions": len(table), "what": "eval_reference"}


def evaluate(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """eval_samples (the policy's completions) and eval (win-rate, standard error, counts).

    A pair the judge could not judge counts as a win or a loss by a seeded coin (the paper broke
    them at random); dropping them would bias the rate when the judge fails more often on bad
    outputs. Their number is reported as `unjudged`."""
    cfg, rd = ctx.cfg, ctx.rd
    policy = eval_completions(ctx, str(rd.path("policy", r)), ctx.seed(r, "eval"))
    reference = rd.table("eval_reference")
    judge_cfg = cfg.eval.oracle or cfg.oracle
    oracle = make_oracle(judge_cfg, cfg.seed, deterministic=True)
    outcomes, asked = ctx.ask(oracle, list(policy["prompt"]), list(policy["completion"]),
                              list(reference["completion"]), judge_cfg.batch_size, "judge")
    unjudged = np.isnan(outcomes)
    if unjudged.all():
        raise RuntimeError(f"round {r}: the eval judge could not judge any of {len(outcomes)} eval pairs")
    coins = np.random.default_rng(ctx.seed(r, "eval_unjudged")).integers(0, 2, len(outcomes)).astype(float)
    result = win_rate(np.where(unjudged, coins, outcomes))
    result["unjudged"] = int(unjudged.sum())
    labels_so_far = sum(len(rd.table("labels", q)) for q in range(r + 1))
    result.update(round=r, labels=labels_so_far, oracle_requests=asked)
    return {"eval_samples": policy, "eval": result}, result
