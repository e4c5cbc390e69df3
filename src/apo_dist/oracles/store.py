"""The durable label store in front of every oracle.

Every oracle is reached through `LabelStore.label`, which answers from the store when the
comparison was asked before and otherwise asks the oracle and commits the answer before returning
it, so a paid comparison is never requested twice.
"""
from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm import tqdm

from .base import Oracle, OracleUnavailable, comparison_key

ANSWER_COLUMNS = ("model", "prompt_version", "shown_order", "raw_text", "input_tokens", "output_tokens",
                  "cost", "latency")



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
              on_batch: Callable[[], None] | None = None, run: str = "",
              allow: Callable[[int], int] | None = None) -> tuple[list[float], int]:
        """P(a preferred) for each pair (NaN when unlabelable), asking only for unseen comparisons.

        Each oracle batch is committed before the next is asked, so a crash loses at most the
        batch in flight. An answer with status "error" (the oracle gave up after its retries) is
        not stored: the rest of its batch is committed, then OracleUnavailable is raised. `run`
        names who paid, for budgets. `allow(n)`, called before each oracle batch of n calls, says how
        many of them (at least 1) may be made; it raises to stop (a budget). Returns (labels, number of new
        oracle answers).
        """
        keys = [comparison_key(oracle.identity, p, x, y) for p, x, y in zip(prompts, a, b)]
        known = self.lookup(keys)
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in known and k not in seen:
                todo.append(i)
                seen.add(k)
        bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, unit="pair")
        start = 0
        while start < len(todo):
            idx = todo[start: start + batch_size]
            if allow is not None:
                idx = idx[:allow(len(idx))]
            start += len(idx)
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

    def totals(self, run: str | None = None, oracle: str | None = None) -> dict:
        """Answers, unlabelable answers, tokens and dollars (of one run and/or oracle identity, or of
        the whole store)."""
        where = [(f"{column} = ?", value) for column, value in (("run", run), ("oracle", oracle)) if value is not None]
        args = tuple(value for _, value in where)
        where = ("WHERE " + " AND ".join(sql for sql, _ in where)) if where else ""
        answers, unlabelable, tokens_in, tokens_out, cost = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'unlabelable'), 0), COALESCE(SUM(input_tokens), 0), "
            f"COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0.0) FROM labels {where}", args).fetchone()
        requests = self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        return {"answers": answers, "unlabelable": unlabelable, "input_tokens": tokens_in,
                "output_tokens": tokens_out, "cost": cost, "requests": requests}

    def export(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM labels ORDER BY created", self.db)
