"""The offline sentiment oracle (VADER): the quickstart's labeller."""
from __future__ import annotations

import json

from .base import TextScorer


class SentimentOracle(TextScorer):
    """Prefers the continuation whose prompt+completion has the higher VADER compound score.

    noise="none": deterministic (equal scores are a tie, label 0.5). noise="bradley_terry": the
    answer is drawn from Bernoulli(sigmoid((s_a - s_b) / temperature)), seeded per comparison, so
    it behaves like a noisy human or LLM labeller while staying reproducible.
    """

    def __init__(self, noise: str = "none", temperature: float = 0.1, seed: int = 0):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.noise, self.temperature, self.seed = noise, temperature, seed
        self.identity = json.dumps({"kind": "sentiment", "noise": noise,
                                    **({"temperature": temperature, "seed": seed} if noise != "none" else {})},
                                   sort_keys=True)

    def score(self, text: str) -> float:
        return self.analyzer.polarity_scores(text)["compound"]
