"""What every preference oracle shares: the protocol, its errors, and the comparison key.

An oracle compares completion a with completion b for a prompt and answers with `label`, the
probability that a is preferred: 1.0 or 0.0 for a hard answer, 0.5 for a tie, anything between
for a soft answer, None when the pair cannot be labelled (with `reason`).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Protocol

import numpy as np


class Oracle(Protocol):
    # Identity of the labeller (kind, model, noise, seed ...): part of every store key.
    identity: str

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        """One dict per pair with at least `label` (P(a preferred)); other keys are kept as raw."""
        ...


class OracleError(RuntimeError):
    """An oracle failed; its message never holds a secret."""


class OracleUnavailable(OracleError):
    """The oracle could not answer (retries exhausted); answers already received are stored."""


def comparison_key(identity: str, prompt: str, a: str, b: str) -> str:
    """Order-free key: (a, b) and (b, a) are the same comparison."""
    first, second = sorted((a, b))
    return hashlib.sha256(json.dumps([identity, prompt, first, second]).encode()).hexdigest()


def score_preference(oracle, prompt: str, a: str, b: str, sa: float, sb: float) -> dict:
    """The answer of a score-based oracle (attributes identity, noise, temperature, seed).

    noise "none": the higher score wins, equal scores tie. "bradley_terry": a draw from
    Bernoulli(sigmoid((sa - sb) / temperature)), seeded by the comparison.
    """
    if oracle.noise == "none":
        return {"label": 0.5 if sa == sb else float(sa > sb), "score_a": sa, "score_b": sb}
    p = 1.0 / (1.0 + math.exp(-(sa - sb) / oracle.temperature))
    rng = np.random.default_rng([oracle.seed, int(comparison_key(oracle.identity, prompt, a, b)[:12], 16)])
    return {"label": float(rng.random() < p), "p_a": p, "score_a": sa, "score_b": sb}


class TextScorer:
    """An oracle that scores each prompt+completion text on its own and prefers the higher score.
    A subclass supplies `score(text)` and the attributes score_preference reads (identity, noise,
    temperature, seed)."""

    def scores(self, texts: list[str]) -> list[float]:
        return [self.score(t) for t in texts]

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        return [score_preference(self, prompt, ca, cb, self.score(prompt + ca), self.score(prompt + cb))
                for prompt, ca, cb in zip(prompts, a, b)]
