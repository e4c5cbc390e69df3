"""A user's own labeller, named by import path in the config."""
from __future__ import annotations

import importlib
import json
import time

from ..calls import backoff_delay
from .base import OracleError


class CustomOracle:
    """A user's labeller named by import path: fn(prompts, a, b) -> one answer per pair.

    An answer is a bool (a preferred?), a number (P(a preferred)), None (unlabelable) or a dict
    with `label`. A call that raises is retried `max_retries` times with backoff, then fails.
    """

    def __init__(self, function: str, max_retries: int = 3):
        module, name = function.split(":")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise OracleError(f"oracle.function={function!r} cannot be loaded: {e}") from None
        self.max_retries = max_retries
        self.identity = json.dumps({"kind": "custom", "function": function}, sort_keys=True)

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        for attempt in range(self.max_retries + 1):
            try:
                answers = list(self.fn(prompts, a, b))
                break
            except Exception as e:
                if attempt == self.max_retries:
                    return [{"status": "error", "reason": f"{type(e).__name__}: {e}"} for _ in prompts]
                time.sleep(backoff_delay(attempt))
        if len(answers) != len(prompts):
            raise ValueError(f"{self.identity}: returned {len(answers)} answers for {len(prompts)} pairs")
        return [self._answer(x) for x in answers]

    @staticmethod
    def _answer(x) -> dict:
        if isinstance(x, dict):
            return x
        if x is None:
            return {"label": None, "reason": "the labeller returned None"}
        label = float(x)
        if not 0.0 <= label <= 1.0:
            raise ValueError(f"custom oracle answer {x!r} is not a preference or a probability in [0, 1]")
        return {"label": label}
