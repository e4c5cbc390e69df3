"""Acquisition and labelling: the round's pairs for the oracle, then the oracle's answers."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pandas as pd

from .. import acquisition
from ..context import RunContext
from ..counts import round_counts, uses_features
from ..faults import fault_point
from ..oracles.registry import make_oracle

log = logging.getLogger("apo_dist.stages")


def ranked_pairs(ctx: RunContext, r: int, scores: pd.DataFrame, exclude: set | None = None) -> pd.DataFrame:
    """The round's seeded choice of pairs from its scores (and, for the feature functions, its
    history of labelled pairs), leaving out `exclude`."""
    a = ctx.cfg.acquisition
    rng = np.random.default_rng(ctx.seed(r, "acquired"))
    history = ctx.rd.table("history", r) if uses_features(ctx.cfg) else None
    return acquisition.select_pairs(scores, a.function, round_counts(ctx.cfg, r).labels, rng, exclude=exclude,
                                    history=history, prior_variance=a.prior_variance,
                                    diversity_factor=a.diversity_factor)


def acquired(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """acquired: the M pairs the acquisition function ranks first. Pairs of identical completions are
    never chosen: when they leave fewer than M candidates, the round gets fewer labels."""
    scores = ctx.rd.table("scores", r)
    chosen = ranked_pairs(ctx, r, scores)
    m = round_counts(ctx.cfg, r).labels
    identical = int(acquisition.identical_pairs(scores).sum())
    if chosen.empty:
        raise RuntimeError(f"round {r}: no candidate pairs for {m} labels ({identical} of {len(scores)} "
                           f"have identical completions)")
    if len(chosen) < m:
        log.warning("round %d: %d pairs acquired instead of %d: %d of %d candidate pairs have identical "
                    "completions", r, len(chosen), m, identical, len(scores))
    return {"acquired": chosen}, {"pairs": len(chosen), "identical_pairs": identical,
                                  "mean_certainty": float(chosen["certainty"].mean())}


def labels(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """labels: the oracle's answers for the acquired pairs; an unlabelable pair is replaced by the
    next best candidate of the same ranking. Answers come from (and go to) the label store."""
    cfg = ctx.cfg
    pairs = ctx.rd.table("acquired", r)
    oracle = make_oracle(cfg.oracle, cfg.seed)

    def batch_stored() -> None:  # a safe point to stop: the answers so far are committed
        fault_point(r, "labels", "mid")
        ctx.check_stop(f"in round {r} labels (answers so far are stored)")

    scores = None  # read once, when the first replacement is needed
    labelled, excluded, asked, reasons = [], set(), 0, Counter()
    while len(pairs):
        answers, new = ctx.ask(oracle, list(pairs["prompt"]), list(pairs["completion_a"]), list(pairs["completion_b"]),
                               cfg.oracle.batch_size, "label", on_batch=batch_stored)
        asked += new
        pairs = pairs.assign(label=answers)
        labelled.append(pairs[pairs["label"].notna()])
        failed = pairs[pairs["label"].isna()]
        if failed.empty:
            break
        excluded |= set(failed["pair_id"])
        reasons += ctx.store.reasons(oracle.identity, list(failed["prompt"]), list(failed["completion_a"]),
                                     list(failed["completion_b"]))
        scores = ctx.rd.table("scores", r) if scores is None else scores
        chosen = ranked_pairs(ctx, r, scores, exclude=excluded)
        done = set(pd.concat(labelled)["pair_id"])
        pairs = chosen[~chosen["pair_id"].isin(done)].reset_index(drop=True)
    table = pd.concat(labelled, ignore_index=True)
    if table.empty:
        raise RuntimeError(f"round {r}: the oracle could label none of {len(excluded)} candidate pairs "
                           f"({dict(reasons)})")
    shortfall = round_counts(cfg, r).labels - len(table)
    if shortfall:
        log.warning("round %d: %d labels instead of %d: %d pairs were unlabelable or the pool held too few "
                    "pairs of distinct completions, and no candidates are left (raise acquisition.pair_factor)",
                    r, len(table), len(table) + shortfall, len(excluded))
    return {"labels": table}, {
        "labels": len(table), "unlabelable": len(excluded), "shortfall": shortfall,
        "unlabelable_reasons": dict(reasons), "oracle_requests": asked,
        "from_store": len(table) + len(excluded) - asked, "tie_rate": float((table["label"] == 0.5).mean())}
