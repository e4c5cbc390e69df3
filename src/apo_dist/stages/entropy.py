"""The entropy step: N samples per pool prompt, each prompt's predictive entropy, and which prompts
go on to pair generation (every prompt for the functions that ignore entropy)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import acquisition
from ..context import RunContext
from ..counts import round_counts, uses_entropy
from ..scoring import prompt_entropy


def entropy_samples(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """entropy_samples: N completions per pool prompt from the current policy at the entropy temperature."""
    cfg = ctx.cfg
    params = ctx.sampling(cfg.scoring.entropy_samples, cfg.generation.entropy_temperature,
                          ctx.seed(r, "entropy_samples"), truncate=False)
    samples = ctx.generate(ctx.policy_path(r), ctx.rd.table("pool", r), params)
    return {"entropy_samples": samples}, {"samples": len(samples), **ctx.server_restarts()}


def entropy(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """entropy: per pool prompt its entropy estimate (NaN when unused), rank and whether it is kept."""
    cfg = ctx.cfg
    if uses_entropy(cfg):
        samples = ctx.rd.table("entropy_samples", r)
        token = cfg.scoring.entropy_estimator == "token"
        if cfg.scoring.entropy_from_generation and not token:
            scored = pd.DataFrame({"logp": [float(np.sum(lp)) for lp in samples["token_logprobs"]]})
        else:
            scored = ctx.logprobs(ctx.policy_path(r), samples, with_entropy=token, desc="score entropy",
                                  shard_dir=ctx.rd.round_dir(r) / "shards" / "entropy")
        table = prompt_entropy(pd.concat([samples, scored], axis=1), cfg.scoring.entropy_estimator)
    else:
        prompts = ctx.rd.table("pool", r)
        table = pd.DataFrame({"prompt_id": prompts["prompt_id"], "entropy": np.nan, "n_samples": 0})
    rng = np.random.default_rng(ctx.seed(r, "entropy"))
    table = acquisition.select_prompts(table, cfg.acquisition.function, round_counts(cfg, r).pair_prompts, rng)
    return {"entropy": table}, {
        "prompts": len(table), "selected": int(table["selected"].sum()),
        "mean_entropy": float(table["entropy"].mean()) if table["entropy"].notna().any() else None}
