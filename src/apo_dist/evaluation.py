"""Evaluation: win-rate of the policy's completions against a fixed reference set."""
from __future__ import annotations

import math

import numpy as np


def win_rate(outcomes: list[float] | np.ndarray) -> dict:
    """Mean of per-prompt outcomes (1 win, 0 loss, 0.5 tie) with its standard error."""
    x = np.asarray(outcomes, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("win_rate needs at least one outcome")
    stderr = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"win_rate": float(x.mean()), "stderr": stderr, "n": n,
            "wins": int((x > 0.5).sum()), "losses": int((x < 0.5).sum()),
            "ties": int((x == 0.5).sum()), "tie_rate": float((x == 0.5).mean())}
