"""Preference oracles and the durable label store in front of them.

An oracle compares completion a with completion b for a prompt and answers with `label`, the
probability that a is preferred: 1.0 or 0.0 for a hard answer, 0.5 for a tie, anything between
for a soft answer, None when the pair cannot be labelled (with `reason`). Every oracle is reached
through `LabelStore.label`, which answers from the store when the comparison was asked before
and otherwise asks the oracle and commits the answer before returning it, so a paid comparison
is never requested twice. Kinds: sentiment (offline, here), llm_judge (judge.py), reward_model
(reward_model.py), custom (a user's function, here).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from .calls import backoff_delay


class Oracle(Protocol):
    # Identity of the labeller (kind, model, noise, seed ...): part of every store key.
    identity: str

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        """One dict per pair with at least `label` (P(a preferred)); other keys are kept as raw."""
        ...


class SentimentOracle:
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

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[dict]:
        return [score_preference(self, prompt, ca, cb, self.score(prompt + ca), self.score(prompt + cb))
                for prompt, ca, cb in zip(prompts, a, b)]


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


def make_oracle(oracle_cfg, seed: int, deterministic: bool = False) -> Oracle:
    """The labeller a config section names; `deterministic` drops label noise (used for evaluation)."""
    noise = "none" if deterministic else oracle_cfg.noise
    if oracle_cfg.kind == "sentiment":
        return SentimentOracle(noise, oracle_cfg.noise_temperature, seed)
    if oracle_cfg.kind == "llm_judge":
        from .judge import LLMJudge

        return LLMJudge(oracle_cfg)
    if oracle_cfg.kind == "reward_model":
        from .reward_model import RewardModelOracle

        return RewardModelOracle(oracle_cfg.model, noise, oracle_cfg.noise_temperature, seed)
    if oracle_cfg.kind == "custom":
        return CustomOracle(oracle_cfg.function, oracle_cfg.max_retries)
    raise ValueError(f"unknown oracle kind {oracle_cfg.kind!r}")


def comparison_key(identity: str, prompt: str, a: str, b: str) -> str:
    """Order-free key: (a, b) and (b, a) are the same comparison."""
    first, second = sorted((a, b))
    return hashlib.sha256(json.dumps([identity, prompt, first, second]).encode()).hexdigest()


ANSWER_COLUMNS = ("model", "prompt_version", "shown_order", "raw_text", "input_tokens", "output_tokens",
                  "cost", "latency")


class OracleError(RuntimeError):
    """An oracle failed; its message never holds a secret."""


class OracleUnavailable(OracleError):
    """The oracle could not answer (retries exhausted); answers already received are stored."""


class LabelStore:
    """SQLite (WAL) store of every oracle answer; the single source of truth for labels.

    `labels` holds one answer per comparison key, in canonical order (first = min(a, b)):
    status "ok" with its label, or "unlabelable" with the reason (never asked again either),
    plus what the oracle reported (model, prompt version, order shown, raw text, tokens, cost,
    latency) and the run that paid for it. `requests` logs every call made to an oracle.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS labels (
                key TEXT PRIMARY KEY, oracle TEXT NOT NULL, prompt TEXT NOT NULL,
                first TEXT NOT NULL, second TEXT NOT NULL, label REAL,
                status TEXT NOT NULL, reason TEXT NOT NULL,
                model TEXT, prompt_version TEXT, shown_order TEXT, raw_text TEXT,
                input_tokens INTEGER, output_tokens INTEGER, cost REAL, latency REAL,
                details TEXT NOT NULL, run TEXT NOT NULL, created REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS requests (
                id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, oracle TEXT NOT NULL,
                time REAL NOT NULL);
        """)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(labels)")}
        if "status" not in columns:
            self.db.close()
            raise RuntimeError(f"{self.path} was written by an older apo-dist (no status column); "
                               "point oracle.store at a new file")

    def close(self) -> None:
        self.db.close()

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, float | None]]:
        """key -> (first, label of first; None when unlabelable) for the keys already answered."""
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i: i + 500]
            q = f"SELECT key, first, label FROM labels WHERE key IN ({','.join('?' * len(chunk))})"
            for key, first, label in self.db.execute(q, chunk):
                found[key] = (first, label)
        return found

    def label(self, oracle: Oracle, prompts: list[str], a: list[str], b: list[str],
              batch_size: int = 16, progress: bool = True, desc: str = "label",
              on_batch: Callable[[], None] | None = None, run: str = "") -> tuple[list[float], int]:
        """P(a preferred) for each pair (NaN when unlabelable), asking only for unseen comparisons.

        Each oracle batch is committed before the next is asked, so a crash loses at most the
        batch in flight. An answer with status "error" (the oracle gave up after its retries) is
        not stored: the rest of its batch is committed, then OracleUnavailable is raised. `run`
        names who paid, for budgets. Returns (labels, number of new oracle answers).
        """
        keys = [comparison_key(oracle.identity, p, x, y) for p, x, y in zip(prompts, a, b)]
        known = self.lookup(keys)
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in known and k not in seen:
                todo.append(i)
                seen.add(k)
        bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, unit="pair")
        for start in range(0, len(todo), batch_size):
            idx = todo[start: start + batch_size]
            now = time.time()
            self._insert("INSERT INTO requests (key, oracle, time) VALUES (?, ?, ?)",
                         [(keys[i], oracle.identity, now) for i in idx])
            answers = oracle.compare([prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx])
            rows, errors = [], []
            for i, ans in zip(idx, answers):
                if ans.get("status") == "error":
                    errors.append(ans.get("reason", "unknown error"))
                    continue
                rows.append(self._row(keys[i], oracle.identity, prompts[i], a[i], b[i], ans, run))
                known[keys[i]] = (rows[-1][3], rows[-1][5])
            self._insert(f"INSERT OR IGNORE INTO labels VALUES ({','.join('?' * 19)})", rows)
            bar.update(len(idx))
            if errors:
                bar.close()
                raise OracleUnavailable(f"{len(errors)} of {len(idx)} comparisons got no answer "
                                        f"({len(rows)} stored); first error: {errors[0]}")
            if on_batch:
                on_batch()
        bar.close()
        labels = []
        for k, x in zip(keys, a):
            first, label_first = known[k]
            if label_first is None:
                labels.append(math.nan)
            else:
                labels.append(label_first if first == x else 1.0 - label_first)
        return labels, len(todo)

    @staticmethod
    def _row(key: str, identity: str, prompt: str, a: str, b: str, ans: dict, run: str) -> tuple:
        """A labels row in canonical order from an answer about (a, b)."""
        first, second = sorted((a, b))
        swapped = first != a
        label = ans.get("label")
        status = ans.get("status") or ("ok" if label is not None else "unlabelable")
        if label is not None and swapped:
            label = 1.0 - label
        order = ans.get("shown_order")
        if swapped and order in ("ab", "ba"):
            order = "ba" if order == "ab" else "ab"
        details = {k: v for k, v in ans.items() if k not in ("label", "status", "reason", "shown_order", *ANSWER_COLUMNS)}
        return (key, identity, prompt, first, second, label, status, ans.get("reason", ""),
                ans.get("model"), ans.get("prompt_version"), order, ans.get("raw_text"),
                ans.get("input_tokens"), ans.get("output_tokens"), ans.get("cost"), ans.get("latency"),
                json.dumps({**details, "asked_order": "ba" if swapped else "ab"}), run, time.time())

    def _insert(self, sql: str, rows: list[tuple]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(sql, rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def reasons(self, identity: str, prompts: list[str], a: list[str], b: list[str]) -> Counter:
        """How often each reason was given for the unlabelable ones among these comparisons."""
        keys = [comparison_key(identity, p, x, y) for p, x, y in zip(prompts, a, b)]
        found = Counter()
        for i in range(0, len(keys), 500):
            chunk = keys[i: i + 500]
            found.update(r for (r,) in self.db.execute(
                f"SELECT reason FROM labels WHERE status = 'unlabelable' AND key IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def request_counts(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT key, COUNT(*) AS n FROM requests GROUP BY key", self.db)

    def totals(self, run: str | None = None) -> dict:
        """Answers, unlabelable answers, tokens and dollars (of one run, or of the whole store)."""
        where, args = ("WHERE run = ?", (run,)) if run is not None else ("", ())
        answers, unlabelable, tokens_in, tokens_out, cost = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'unlabelable'), 0), COALESCE(SUM(input_tokens), 0), "
            f"COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0.0) FROM labels {where}", args).fetchone()
        requests = self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        return {"answers": answers, "unlabelable": unlabelable, "input_tokens": tokens_in,
                "output_tokens": tokens_out, "cost": cost, "requests": requests}

    def export(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM labels ORDER BY created", self.db)
