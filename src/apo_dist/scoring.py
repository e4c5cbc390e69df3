"""Scoring: teacher-forced log-probs of completions, per-prompt entropy, implicit rewards.

All functions take and return tables; `sequence_logprobs` is the only one that touches a model.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .acquisition import certainty, implicit_reward
from .models import completion_logprobs


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      pad_id: int, batch_size: int = 32, with_entropy: bool = False,
                      desc: str = "score", progress: bool = True) -> pd.DataFrame:
    """log p(completion | prompt) summed over completion tokens, in the input order.

    Sequences are sorted by length and batched so that a batch holds similar lengths (little
    padding); the result is put back in the input order. Columns: logp, n_tokens and, with
    `with_entropy`, token_entropy (mean entropy of the full next-token distribution along the
    completion).
    """
    model.eval()
    n = len(prompt_ids)
    lengths = np.array([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)])
    order = np.argsort(lengths, kind="stable")
    logp = np.zeros(n)
    n_tokens = np.zeros(n, dtype=np.int64)
    entropy = np.full(n, np.nan)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start: start + batch_size]
        lp, nt, ent = completion_logprobs(model, [prompt_ids[i] for i in idx],
                                          [completion_ids[i] for i in idx], pad_id, with_entropy)
        logp[idx] = lp.cpu().numpy()
        n_tokens[idx] = nt.cpu().numpy()
        if with_entropy:
            entropy[idx] = ent.cpu().numpy()
    out = pd.DataFrame({"logp": logp, "n_tokens": n_tokens})
    if with_entropy:
        out["token_entropy"] = entropy
    return out


def prompt_entropy(samples: pd.DataFrame, estimator: str = "mc") -> pd.DataFrame:
    """Per-prompt predictive entropy from that prompt's own samples only.

    mc:    H(x) ~= -(1/N) sum_n log pi(y_n | x)          (the paper's estimator, not length-normalised)
    token: mean over samples of the mean per-token entropy of the next-token distribution
    `samples` needs prompt_id and logp (mc) or token_entropy (token).
    """
    if estimator == "mc":
        per_sample = -samples["logp"]
    elif estimator == "token":
        per_sample = samples["token_entropy"]
    else:
        raise ValueError(f"unknown entropy estimator {estimator!r} (allowed: mc, token)")
    grouped = per_sample.groupby(samples["prompt_id"])
    return pd.DataFrame({"prompt_id": grouped.mean().index, "entropy": grouped.mean().values,
                         "n_samples": grouped.size().values})


def pair_table(samples: pd.DataFrame, beta: float) -> pd.DataFrame:
    """One row per prompt from its two samples (sample 0 -> a, sample 1 -> b), with rewards.

    `samples` needs prompt_id, prompt, prompt_ids, sample, token_ids, completion, policy_logp,
    ref_logp.
    """
    a = samples[samples["sample"] == 0].set_index("prompt_id")
    b = samples[samples["sample"] == 1].set_index("prompt_id")
    if len(a) != len(b) or not a.index.is_unique or set(a.index) != set(b.index):
        raise ValueError("pair_table needs exactly two samples (0 and 1) per prompt")
    b = b.loc[a.index]  # pair by prompt_id, whatever the row order
    pairs = pd.DataFrame({
        "prompt_id": a.index.values,
        "prompt": a["prompt"].values,
        "prompt_ids": a["prompt_ids"].values,
        "completion_a": a["completion"].values,
        "completion_b": b["completion"].values,
        "tokens_a": a["token_ids"].values,
        "tokens_b": b["token_ids"].values,
        "policy_logp_a": a["policy_logp"].values,
        "policy_logp_b": b["policy_logp"].values,
        "ref_logp_a": a["ref_logp"].values,
        "ref_logp_b": b["ref_logp"].values,
    })
    pairs.insert(0, "pair_id", pairs["prompt_id"].astype(np.int64))
    pairs["reward_a"] = implicit_reward(pairs["policy_logp_a"].values, pairs["ref_logp_a"].values, beta)
    pairs["reward_b"] = implicit_reward(pairs["policy_logp_b"].values, pairs["ref_logp_b"].values, beta)
    pairs["certainty"] = certainty(pairs["reward_a"].values, pairs["reward_b"].values)
    return pairs
