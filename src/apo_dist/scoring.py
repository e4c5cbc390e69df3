"""Scoring: teacher-forced log-probs of completions, per-prompt entropy, implicit rewards.

All functions take and return tables; `sequence_logprobs` is the only one that touches a model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .acquisition import certainty, implicit_reward
from .distributed import shard_by_tokens
from .models import completion_logprobs
from .rundir import read_table, write_table


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      pad_id: int, batch_size: int = 32, with_entropy: bool = False,
                      desc: str = "score", progress: bool = True, shard_dir: Path | None = None,
                      feature_dim: int = 0, feature_seed: int = 0) -> pd.DataFrame:
    """log p(completion | prompt) summed over completion tokens, in the input order.

    Batches hold sequences of similar length (little padding). Under several processes the rows
    are split into shards of equal token count; each rank scores its shard and writes it to
    `shard_dir/rank_K.parquet`, and every rank reads all shards back in the input order. Every
    rank runs the same number of forward passes, as ZeRO-3 needs. Columns: logp, n_tokens and,
    with `with_entropy`, token_entropy (mean entropy of the full next-token distribution along
    the completion); with `feature_dim` k > 0, features: float32 [k] per row from the same forward
    pass (completion_features of the LM head's input [B, T, d], projected by
    feature_projection(d, k, feature_seed)).
    """
    from accelerate import PartialState

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    lengths = np.array([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)])
    shards = shard_by_tokens(lengths, world)
    n_batches = max(math.ceil(len(s) / batch_size) for s in shards)
    mine = shards[rank]
    part = pd.DataFrame({"row": mine, "logp": 0.0, "n_tokens": 0, "token_entropy": np.nan})
    features = np.zeros((len(mine), feature_dim), dtype=np.float32)
    hidden: list[torch.Tensor] = []  # the LM head's input of the current batch: [B, T, d]
    hook = (model.get_output_embeddings().register_forward_pre_hook(lambda _, args: hidden.append(args[0]))
            if feature_dim else None)
    projection = None
    try:
        for b in tqdm(range(n_batches), desc=desc, disable=not progress or rank != 0, unit="batch"):
            idx = mine[b * batch_size: (b + 1) * batch_size]
            # A rank that ran out of rows still joins the forward pass (ZeRO-3 gathers collectively).
            run = idx if len(idx) else np.arange(min(1, len(prompt_ids)))
            hidden.clear()
            lp, nt, ent = completion_logprobs(model, [prompt_ids[i] for i in run],
                                              [completion_ids[i] for i in run], pad_id, with_entropy)
            if len(idx):
                rows = slice(b * batch_size, b * batch_size + len(idx))
                part.iloc[rows, 1] = lp.cpu().numpy()
                part.iloc[rows, 2] = nt.cpu().numpy()
                if with_entropy:
                    part.iloc[rows, 3] = ent.cpu().numpy()
                if feature_dim:
                    if projection is None:
                        projection = feature_projection(hidden[-1].shape[-1], feature_dim, feature_seed)
                    features[rows] = completion_features(hidden[-1], [len(prompt_ids[i]) for i in idx],
                                                         [len(completion_ids[i]) for i in idx], projection)
    finally:
        if hook is not None:
            hook.remove()
    if feature_dim:
        part["features"] = list(features)
    if world > 1:
        write_table(shard_dir / f"rank_{rank}.parquet", part)
        state.wait_for_everyone()
        part = pd.concat([read_table(shard_dir / f"rank_{k}.parquet") for k in range(world)])
    out = part.sort_values("row").drop(columns="row").reset_index(drop=True)
    return out if with_entropy else out.drop(columns="token_entropy")


def feature_projection(hidden_size: int, k: int, seed: int) -> np.ndarray:
    """[hidden_size, k] float32 Gaussian random projection, entries N(0, 1/k): it keeps norms and
    inner products of the (unit) features approximately (Johnson-Lindenstrauss)."""
    return np.random.default_rng(seed).normal(0.0, 1.0 / math.sqrt(k), (hidden_size, k)).astype(np.float32)


def completion_features(hidden: torch.Tensor, prompt_lens: list[int], completion_lens: list[int],
                        projection: np.ndarray) -> np.ndarray:
    """phi(x, y) [B, k] float32: the final hidden states [B, T, d] (right-padded) averaged over each
    row's completion tokens in float32, scaled to unit L2 norm, times `projection` [d, k] (on the CPU,
    outside any autocast)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    start = torch.tensor(prompt_lens, device=hidden.device)[:, None]
    end = start + torch.tensor(completion_lens, device=hidden.device)[:, None]
    mask = ((positions >= start) & (positions < end)).float()[:, :, None]  # [B, T, 1]
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy() @ projection


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
    if "features" in samples.columns:  # float32 [k] per completion (sequence_logprobs)
        pairs["features_a"] = a["features"].values
        pairs["features_b"] = b["features"].values
    return pairs


def pair_sequences(pairs: pd.DataFrame) -> pd.DataFrame:
    """[2n] rows (prompt_ids, token_ids) to score: the n pairs' a-completions, then their b-completions."""
    return pd.DataFrame({"prompt_ids": [*pairs["prompt_ids"], *pairs["prompt_ids"]],
                         "token_ids": [*pairs["tokens_a"], *pairs["tokens_b"]]})


HISTORY_COLUMNS = ["round", "pair_id", "label", "policy_logp_a", "policy_logp_b", "ref_logp_a", "ref_logp_b",
                   "reward_a", "reward_b", "features_a", "features_b"]


def rescored_pairs(labelled: pd.DataFrame, scored: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Labelled pairs under another policy: one row per row of `labelled` (round, pair_id, label,
    ref_logp_a, ref_logp_b) with `scored` ([2n] rows of logp and features for pair_sequences(labelled))
    turned into policy_logp_a/b, reward_a/b (the stored reference log-probs) and features_a/b."""
    n = len(labelled)
    out = labelled[["round", "pair_id", "label", "ref_logp_a", "ref_logp_b"]].reset_index(drop=True)
    out["policy_logp_a"] = scored["logp"].values[:n]
    out["policy_logp_b"] = scored["logp"].values[n:]
    out["reward_a"] = implicit_reward(out["policy_logp_a"].values, out["ref_logp_a"].values, beta)
    out["reward_b"] = implicit_reward(out["policy_logp_b"].values, out["ref_logp_b"].values, beta)
    out["features_a"] = list(scored["features"].values[:n])
    out["features_b"] = list(scored["features"].values[n:])
    return out[HISTORY_COLUMNS]
