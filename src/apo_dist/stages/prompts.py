"""The prompt stages: the run's train/eval prompts (once), and each round's candidate pool."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..context import RunContext
from ..counts import check_pool_size, round_counts
from ..data import cycle_prompts, id_stride, load_prompts
from ..models import format_prompt


def prompts(ctx: RunContext, _) -> tuple[dict, dict]:
    """prompts: train and eval prompts (disjoint, fixed by seed) with the token ids the model sees."""
    cfg = ctx.cfg
    train, evals, report = load_prompts(cfg, ctx.tokenizer)
    check_pool_size(cfg, len(train))
    table = pd.concat([train.assign(split="train"), evals.assign(split="eval")], ignore_index=True)
    table["prompt_ids"] = [format_prompt(ctx.tokenizer, p, cfg.data.instruction, cfg.model.use_chat_template)
                           for p in table["prompt"]]
    return {"prompts": table}, report


def split(ctx: RunContext, name: str) -> pd.DataFrame:
    """The train or eval prompts."""
    table = ctx.rd.table("prompts")
    return table[table["split"] == name].reset_index(drop=True)


def pool(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """pool: round r's candidate prompts, drawn (seeded) from training prompts no earlier round used;
    with data.reuse_prompts, from all of them, cycling (each draw its own prompt_id: data.cycle_prompts)."""
    if ctx.cfg.data.reuse_prompts:
        return reused_pool(ctx, r)
    train = split(ctx, "train")
    used = set()
    for q in range(r):
        used |= set(ctx.rd.table("acquired", q)["prompt_id"])
        used |= set(ctx.rd.table("labels", q)["prompt_id"])  # replacements of unlabelable pairs
    available = train[~train["prompt_id"].isin(used)]
    need = round_counts(ctx.cfg, r).pool_prompts
    if need > len(available):
        raise RuntimeError(f"round {r} needs {need} unused training prompts but only {len(available)} "
                           f"remain; use fewer rounds, fewer labels per round or a larger pool")
    rng = np.random.default_rng(ctx.seed(r, "pool"))
    drawn = available.iloc[np.sort(rng.choice(len(available), size=need, replace=False))]
    return {"pool": drawn[["prompt_id", "prompt", "prompt_ids"]]}, {"prompts": need, "available": len(available)}


def reused_pool(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """pool with data.reuse_prompts: the round's draws cycle through seeded permutations of every
    training prompt, whatever earlier rounds drew."""
    table = ctx.rd.table("prompts")
    train = table[table["split"] == "train"].reset_index(drop=True)
    need = round_counts(ctx.cfg, r).pool_prompts
    rng = np.random.default_rng(ctx.seed(r, "pool"))
    drawn = cycle_prompts(train, need, rng, id_stride(table["prompt_id"].max()))
    return {"pool": drawn[["prompt_id", "source_prompt_id", "prompt", "prompt_ids"]]}, {
        "prompts": need, "available": len(train), "passes": -(-need // len(train)),
        "distinct": int(drawn["source_prompt_id"].nunique())}
