"""Preference oracles and the durable label store in front of them.

An oracle compares completion a with completion b for a prompt and answers with `label`, the
probability that a is preferred: 1.0 or 0.0 for a hard answer, 0.5 for a tie, anything between
for a soft answer. Every oracle is reached through `LabelStore.label`, which answers from the
store when the comparison was asked before and otherwise asks the oracle and commits the answer
before returning it, so a paid comparison is never requested twice.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm


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
        answers = []
        for prompt, ca, cb in zip(prompts, a, b):
            sa, sb = self.score(prompt + ca), self.score(prompt + cb)
            if self.noise == "none":
                label = 0.5 if sa == sb else float(sa > sb)
                answers.append({"label": label, "score_a": sa, "score_b": sb})
            else:
                p = 1.0 / (1.0 + math.exp(-(sa - sb) / self.temperature))
                rng = np.random.default_rng([self.seed, int(comparison_key(self.identity, prompt, ca, cb)[:12], 16)])
                answers.append({"label": float(rng.random() < p), "p_a": p, "score_a": sa, "score_b": sb})
        return answers


def make_oracle(oracle_cfg, seed: int, deterministic: bool = False) -> Oracle:
    """The labeller a config names; `deterministic` drops label noise (used for evaluation)."""
    if oracle_cfg.kind == "sentiment":
        noise = "none" if deterministic else oracle_cfg.noise
        return SentimentOracle(noise, oracle_cfg.noise_temperature, seed)
    raise NotImplementedError(
        f"oracle.kind={oracle_cfg.kind!r} is configured but not available in this version; "
        "the LLM judge over OpenAI-compatible endpoints is tracked as its own issue. "
        "Use oracle.kind=sentiment.")


def comparison_key(identity: str, prompt: str, a: str, b: str) -> str:
    """Order-free key: (a, b) and (b, a) are the same comparison."""
    first, second = sorted((a, b))
    return hashlib.sha256(json.dumps([identity, prompt, first, second]).encode()).hexdigest()


class LabelStore:
    """SQLite (WAL) store of every oracle answer; the single source of truth for labels.

    `labels` holds one answer per comparison key, in canonical order (first = min(a, b)).
    `requests` logs every call made to an oracle, so repeated requests can be counted.
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
                first TEXT NOT NULL, second TEXT NOT NULL, label REAL NOT NULL,
                raw TEXT NOT NULL, created REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS requests (
                id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, oracle TEXT NOT NULL,
                time REAL NOT NULL);
        """)

    def close(self) -> None:
        self.db.close()

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, float]]:
        """key -> (first, label of first) for the keys already answered."""
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i: i + 500]
            q = f"SELECT key, first, label FROM labels WHERE key IN ({','.join('?' * len(chunk))})"
            for key, first, label in self.db.execute(q, chunk):
                found[key] = (first, label)
        return found

    def label(self, oracle: Oracle, prompts: list[str], a: list[str], b: list[str],
              batch_size: int = 16, progress: bool = True, desc: str = "label",
              on_batch: Callable[[], None] | None = None) -> tuple[list[float], int]:
        """P(a preferred) for each pair, asking the oracle only for unseen comparisons.

        Each oracle batch is committed before the next is asked, so a crash loses at most the
        batch in flight. Returns (labels, number of new oracle answers).
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
            rows = []
            for i, ans in zip(idx, answers):
                first, second = sorted((a[i], b[i]))
                label_first = ans["label"] if first == a[i] else 1.0 - ans["label"]
                rows.append((keys[i], oracle.identity, prompts[i], first, second, label_first,
                             json.dumps({**ans, "order": "ab" if first == a[i] else "ba"}), time.time()))
                known[keys[i]] = (first, label_first)
            self._insert("INSERT OR IGNORE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            bar.update(len(idx))
            if on_batch:
                on_batch()
        bar.close()
        labels = []
        for k, x in zip(keys, a):
            first, label_first = known[k]
            labels.append(label_first if first == x else 1.0 - label_first)
        return labels, len(todo)

    def _insert(self, sql: str, rows: list[tuple]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(sql, rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def request_counts(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT key, COUNT(*) AS n FROM requests GROUP BY key", self.db)

    def export(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM labels ORDER BY created", self.db)
