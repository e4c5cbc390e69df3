"""Evaluation: the eval prompts' reference completions (once), and each round's win-rate of the
policy's completions against them, judged by the eval oracle."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..context import RunContext
from ..evaluation import win_rate
from ..oracles.registry import make_oracle
from .prompts import split


def eval_completions(ctx: RunContext, model_path: str) -> pd.DataFrame:
    """One completion per eval prompt at the eval temperature (the same seed for every model)."""
    params = ctx.sampling(1, ctx.cfg.eval.temperature, ctx.seed(0, "eval"))
    return ctx.generate(model_path, split(ctx, "eval"), params)


def eval_reference(ctx: RunContext, _) -> tuple[dict, dict]:
    """eval_reference: the SFT model's completions, or the data's own references (eval.reference=dataset)."""
    if ctx.cfg.eval.reference == "dataset":
        prompts = split(ctx, "eval")
        token_ids = [ctx.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts["reference"]]
        table = prompts[["prompt_id", "prompt", "prompt_ids"]].assign(
            sample=0, token_ids=token_ids, token_logprobs=None, completion=prompts["reference"],
            finish_reason="reference")
        return {"eval_reference": table}, {"completions": len(table), "what": "eval_reference", "reference": "dataset"}
    table = eval_completions(ctx, ctx.sft_path)
    return {"eval_reference": table}, {"completions": len(table), "what": "eval_reference"}


def evaluate(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """eval_samples (the policy's completions) and eval (win-rate, standard error, counts)."""
    cfg, rd = ctx.cfg, ctx.rd
    policy = eval_completions(ctx, str(rd.path("policy", r)))
    reference = rd.table("eval_reference")
    judge_cfg = cfg.eval.oracle or cfg.oracle
    oracle = make_oracle(judge_cfg, cfg.seed, deterministic=True)
    outcomes, asked = ctx.store.label(oracle, list(policy["prompt"]), list(policy["completion"]),
                                      list(reference["completion"]), batch_size=judge_cfg.batch_size,
                                      progress=ctx.progress, desc="judge", run=ctx.run_id)
    judged = [x for x in outcomes if not np.isnan(x)]
    if not judged:
        raise RuntimeError(f"round {r}: the eval judge could not judge any of {len(outcomes)} eval pairs")
    result = win_rate(judged)
    result["unlabelable"] = len(outcomes) - len(judged)
    labels_so_far = sum(len(rd.table("labels", q)) for q in range(r + 1))
    result.update(round=r, labels=labels_so_far, oracle_requests=asked)
    return {"eval_samples": policy, "eval": result}, result
