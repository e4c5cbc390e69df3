"""How much one round does, from the config alone: the single place these counts are decided.

The stages draw, sample, keep and train on exactly these numbers, and the plan (`--dry-run`)
estimates from them, so the two cannot drift. Paper notation: M labels per round, f_p the prompt
over-sampling factor of the entropy step, f_g the pair over-generation factor of the certainty step,
N samples per prompt in the entropy estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError

ENTROPY_FUNCTIONS = ("entropy", "hybrid")  # acquisition functions that sample N completions per pool prompt
# acquisition functions on the policy's features with a Bayesian linear head (acquisition.py): their scoring
# pass also returns features, and rescores the labelled pairs of earlier rounds under the round's policy
FEATURE_FUNCTIONS = ("epistemic", "thompson", "diverse", "diverse_certainty")


@dataclass(frozen=True)
class RoundCounts:
    pool_prompts: int  # training prompts drawn into the round's pool (unused ones, unless data.reuse_prompts)
    entropy_samples: int  # completions sampled for the entropy estimate (N per pool prompt; 0 if unused)
    pair_prompts: int  # prompts kept for pair generation; one candidate pair each, every pair scored
    labels: int  # pairs acquired and sent to the oracle (M)
    train_pairs: int  # labelled pairs the round's training sees: every label so far, in both init modes
    history_pairs: int  # feature functions: earlier rounds' labels rescored by the round's policy (else 0)


def uses_entropy(cfg) -> bool:
    return cfg.acquisition.function in ENTROPY_FUNCTIONS


def uses_features(cfg) -> bool:
    return cfg.acquisition.function in FEATURE_FUNCTIONS


def round_counts(cfg, r: int) -> RoundCounts:
    """Round r's counts: random draws M prompts, entropy f_p*M (keeps M), certainty and uncertainty
    f_g*M, hybrid f_p*f_g*M (keeps f_g*M by entropy, then M pairs by certainty); the feature functions
    f_g*M like certainty (f_p unused; diverse_certainty designs among the top f_d*M of them)."""
    a = cfg.acquisition
    m, fp, fg = a.labels_per_round, a.prompt_factor, a.pair_factor
    pool = {"random": m, "entropy": fp * m, "hybrid": fp * fg * m,
            **dict.fromkeys(("certainty", "uncertainty", *FEATURE_FUNCTIONS), fg * m)}[a.function]
    return RoundCounts(
        pool_prompts=pool,
        entropy_samples=pool * cfg.scoring.entropy_samples if uses_entropy(cfg) else 0,
        pair_prompts={"entropy": m, "hybrid": fg * m}.get(a.function, pool),
        labels=m,
        train_pairs=(r + 1) * m,
        history_pairs=r * m if uses_features(cfg) else 0,
    )


def check_pool_size(cfg, n_train_prompts: int) -> None:
    """A round cannot draw more prompts than the training pool holds, unless prompts may be reused
    (data.reuse_prompts: the pool cycles through the training prompts)."""
    need = round_counts(cfg, 0).pool_prompts
    if need > n_train_prompts and not cfg.data.reuse_prompts:
        raise ConfigError(
            f"config key 'acquisition.labels_per_round': {cfg.acquisition.function} acquisition needs {need} "
            f"candidate prompts per round but the training pool has only {n_train_prompts}; lower "
            f"acquisition.labels_per_round or the over-sampling factors, use a larger prompt pool, or set "
            f"data.reuse_prompts=true to cycle through the prompts as the paper's loader did")


def prompts_consumed(cfg) -> int:
    """Distinct training prompts a run without prompt reuse needs: the last round's pool is drawn from
    the prompts no earlier round acquired (M each), so pool + (rounds - 1) * M."""
    return round_counts(cfg, 0).pool_prompts + (cfg.loop.rounds - 1) * cfg.acquisition.labels_per_round
