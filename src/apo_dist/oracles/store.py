"""The durable label store in front of every oracle.

Every oracle is reached through `LabelStore.label`, which answers from the store when the
comparison was asked before and otherwise asks the oracle and commits the answer before returning
it, so a paid comparison is never requested twice: not across restarts, and not across processes
sharing a store, which claim a comparison before asking for it.

`open_store(location)` opens one of two backends with the same tables: `SQLiteStore`, a file in WAL
mode, the embedded default, for processes on ONE host (WAL's index is shared memory; "WAL does not
work over a network filesystem", https://www.sqlite.org/wal.html); `PostgresStore`, a
`postgresql://` URL, for processes on many nodes. `LabelStore` holds everything else.
"""
from __future__ import annotations

import fcntl
import getpass
import json
import math
import os
import sqlite3
import time
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
from tqdm import tqdm

from .base import Oracle, OracleUnavailable, comparison_key

ANSWER_COLUMNS = ("model", "prompt_version", "shown_order", "raw_text", "input_tokens", "output_tokens",
                  "cost", "latency")
LABEL_COLUMNS = ("key", "oracle", "prompt", "first", "second", "label", "status", "reason", *ANSWER_COLUMNS,
                 "details", "run", "created")
SCHEMA_VERSION = 1  # meta.schema_version; a store with a higher one is refused
# {real} and {serial} are the backend's types; statements are separated by ";".
SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    key TEXT PRIMARY KEY, oracle TEXT NOT NULL, prompt TEXT NOT NULL,
    first TEXT NOT NULL, second TEXT NOT NULL, label {real},
    status TEXT NOT NULL, reason TEXT NOT NULL,
    model TEXT, prompt_version TEXT, shown_order TEXT, raw_text TEXT,
    input_tokens INTEGER, output_tokens INTEGER, cost {real}, latency {real},
    details TEXT NOT NULL, run TEXT NOT NULL, created {real} NOT NULL);
CREATE TABLE IF NOT EXISTS requests (id {serial}, key TEXT NOT NULL, oracle TEXT NOT NULL, time {real} NOT NULL);
CREATE INDEX IF NOT EXISTS labels_run ON labels (run);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)
"""


class StoreError(RuntimeError):
    """The label store cannot be used: not a store, written by another apo-dist version, or
    unreachable. The message is one line that names the store (never a password)."""


def is_postgres(location: str | os.PathLike) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location: str | os.PathLike, readonly: bool = False) -> LabelStore:
    """The label store at `location`: a postgresql:// URL, else a SQLite file (created if missing).
    `readonly`: change nothing, and refuse what is not a store yet (status, export)."""
    return (PostgresStore if is_postgres(location) else SQLiteStore)(location, readonly)


class LabelStore:
    """Every oracle answer; the single source of truth for labels.

    `labels` holds one answer per comparison key, in canonical order (first = min(a, b)):
    status "ok" with its label, or "unlabelable" with the reason (never asked again either),
    plus what the oracle reported (model, prompt version, order shown, raw text, tokens, cost,
    latency) and the run that paid for it. `requests` logs every call made to an oracle; `meta`
    holds the schema version.

    This class is the generic part; a backend supplies the connection (`_execute`, `_executemany`,
    `_transaction`, `_tables`), the column types (`TYPES`), and claims: `_claim(keys)` takes what it
    can of the keys' locks without waiting, `_release(keys)` gives them back, `_wait(key)` returns
    once no other process holds that key's lock. A process that dies loses its locks.
    """
    TYPES: dict[str, str]
    where: str  # the store as messages name it

    # --- opening --------------------------------------------------------------------------------
    def _setup(self, readonly: bool) -> None:
        """Refuse a store this version cannot read (before writing anything); create the tables."""
        tables = self._tables()
        if "meta" in tables:
            row = self._execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.where}: written by a newer apo-dist (label store schema {row[0]}, this "
                                 f"apo-dist reads up to {SCHEMA_VERSION}); upgrade apo-dist to use it")
        if "labels" in tables:
            if "status" not in {d[0] for d in self._execute("SELECT * FROM labels LIMIT 0").description}:
                raise StoreError(f"{self.where}: written by an older apo-dist (no status column); "
                                 "point oracle.store at a new file")
        elif readonly:
            raise StoreError(f"{self.where}: not an apo-dist label store (no labels table)")
        if readonly:
            return
        with self._transaction():
            self._schema_lock()
            for statement in SCHEMA.format(**self.TYPES).split(";"):
                self._execute(statement)
            self._execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
                          (str(SCHEMA_VERSION),))

    def _schema_lock(self) -> None:
        """Inside the schema transaction: keep concurrent openers from creating the tables at once."""

    # --- labelling ------------------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> dict[str, float | None]:
        """key -> label of the canonical first completion (None when unlabelable), for the keys answered."""
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i: i + 500]
            found.update(self._execute(f"SELECT key, label FROM labels WHERE key IN ({','.join('?' * len(chunk))})",
                                       chunk).fetchall())
        return found

    def label(self, oracle: Oracle, prompts: list[str], a: list[str], b: list[str],
              batch_size: int = 16, progress: bool = True, desc: str = "label",
              on_batch: Callable[[], None] | None = None, run: str = "",
              allow: Callable[[int], int] | None = None) -> tuple[list[float], int]:
        """P(a preferred) for each pair (NaN when unlabelable), asking only for unseen comparisons.

        Each oracle batch is committed before the next is asked, so a crash loses at most the
        batch in flight. A comparison is claimed before it is asked and released once its answer
        is committed; one that another process holds is put back and taken again later (by then
        usually answered; with nothing else left, this waits for it), so processes sharing the
        store never ask for the same comparison twice. An answer with status "error" (the oracle
        gave up after its retries) is not stored: the rest of its batch is committed, then
        OracleUnavailable is raised. `run` names who paid, for budgets. `allow(n)`, called before
        each oracle batch of n calls, says how many of them (at least 1) may be made; it raises to
        stop (a budget). `on_batch()` runs after each batch. Returns (labels, number of oracle
        answers this call asked for).
        """
        keys = [comparison_key(oracle.identity, p, x, y) for p, x, y in zip(prompts, a, b)]
        known = self.lookup(keys)
        first_seen = {}
        for i, k in enumerate(keys):
            if k not in known:
                first_seen.setdefault(k, i)
        pending = deque(first_seen.values())
        bar = tqdm(total=len(pending), desc=desc, disable=not progress or not pending, unit="pair")
        asked = 0
        try:
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                held = self._claim([keys[i] for i in batch])
                try:
                    done = self.lookup([keys[i] for i in batch if keys[i] in held])  # answered meanwhile
                    known.update(done)
                    idx = [i for i in batch if keys[i] in held and keys[i] not in done]
                    busy = [i for i in batch if keys[i] not in held]  # another process is asking
                    if allow is not None and idx:
                        n = allow(len(idx))
                        pending.extendleft(reversed(idx[n:]))
                        idx = idx[:n]
                    if idx:
                        self._ask(oracle, [keys[i] for i in idx], [prompts[i] for i in idx], [a[i] for i in idx],
                                  [b[i] for i in idx], run, known)
                finally:
                    self._release(held)
                asked += len(idx)
                bar.update(len(idx) + len(done))
                pending.extend(busy)
                if busy and not idx and not done:
                    self._wait(keys[busy[0]])
                if on_batch:
                    on_batch()
        finally:
            bar.close()
        labels = []
        for k, x, y in zip(keys, a, b):
            label_first = known[k]
            labels.append(math.nan if label_first is None else label_first if x <= y else 1.0 - label_first)
        return labels, asked

    def _ask(self, oracle: Oracle, keys: list[str], prompts: list[str], a: list[str], b: list[str], run: str,
             known: dict) -> None:
        """One oracle batch: log the requests, ask, commit the answers (into `known` too)."""
        now = time.time()
        with self._transaction():
            self._executemany("INSERT INTO requests (key, oracle, time) VALUES (?, ?, ?)",
                              [(k, oracle.identity, now) for k in keys])
        answers = oracle.compare(prompts, a, b)
        rows, errors = [], []
        for key, p, x, y, ans in zip(keys, prompts, a, b, answers):
            if ans.get("status") == "error":
                errors.append(ans.get("reason", "unknown error"))
                continue
            rows.append(self._row(key, oracle.identity, p, x, y, ans, run))
            known[key] = rows[-1][5]
        with self._transaction():
            self._executemany(f"INSERT INTO labels VALUES ({','.join('?' * len(LABEL_COLUMNS))}) "
                              "ON CONFLICT DO NOTHING", rows)
        if errors:
            raise OracleUnavailable(f"{len(errors)} of {len(keys)} comparisons got no answer "
                                    f"({len(rows)} stored); first error: {errors[0]}")

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

    # --- reading --------------------------------------------------------------------------------
    def reasons(self, identity: str, prompts: list[str], a: list[str], b: list[str]) -> Counter:
        """How often each reason was given for the unlabelable ones among these comparisons."""
        keys = [comparison_key(identity, p, x, y) for p, x, y in zip(prompts, a, b)]
        found = Counter()
        for i in range(0, len(keys), 500):
            chunk = keys[i: i + 500]
            found.update(r for (r,) in self._execute(
                f"SELECT reason FROM labels WHERE status = 'unlabelable' AND key IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def request_counts(self) -> pd.DataFrame:
        return self._frame("SELECT key, COUNT(*) AS n FROM requests GROUP BY key")

    def totals(self, run: str | None = None, oracle: str | None = None) -> dict:
        """Answers, unlabelable answers, tokens and dollars (of one run and/or oracle identity, or of
        the whole store)."""
        where = [(f"{column} = ?", value) for column, value in (("run", run), ("oracle", oracle)) if value is not None]
        args = tuple(value for _, value in where)
        where = ("WHERE " + " AND ".join(sql for sql, _ in where)) if where else ""
        answers, unlabelable, tokens_in, tokens_out, cost = self._execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'unlabelable' THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0.0) "
            f"FROM labels {where}", args).fetchone()
        requests = self._execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        return {"answers": answers, "unlabelable": unlabelable, "input_tokens": tokens_in,
                "output_tokens": tokens_out, "cost": cost, "requests": requests}

    def export(self) -> pd.DataFrame:
        return self._frame("SELECT * FROM labels ORDER BY created")

    def _frame(self, sql: str) -> pd.DataFrame:
        cursor = self._execute(sql)
        return pd.DataFrame.from_records(cursor.fetchall(), columns=[d[0] for d in cursor.description],
                                         coerce_float=True)

    def close(self) -> None:
        self.db.close()


class SQLiteStore(LabelStore):
    """A SQLite file in WAL mode. Claims are POSIX record locks on `<file>-claims`, one byte per key
    (the kernel drops them when the process dies); within one process they do not exclude each other."""
    TYPES = {"real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.where = str(path)
        self.claims = None
        if readonly and not self.path.is_file():
            raise StoreError(f"{self.where}: no label store here")
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path.resolve().as_uri() + ("?mode=ro" if readonly else ""), uri=True,
                                      timeout=60, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.where}: cannot open ({e})") from None
        try:
            self._setup(readonly)  # first reads the header: a file that is not a database fails unchanged
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.claims = os.open(f"{self.path}-claims", os.O_RDWR | os.O_CREAT, 0o644)
        except StoreError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{self.where}: not an apo-dist label store ({e})") from None
        except OSError as e:
            self.db.close()
            raise StoreError(f"{self.where}: cannot open ({e})") from None

    def _execute(self, sql: str, args=()):
        return self.db.execute(sql, args)

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        self.db.executemany(sql, rows)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _tables(self) -> set[str]:
        return {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @staticmethod
    def _offset(key: str) -> int:
        return int(key[:15], 16)

    def _claim(self, keys: list[str]) -> set[str]:
        held = set()
        for key in keys:
            try:
                fcntl.lockf(self.claims, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(key))
                held.add(key)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
                pass
        return held

    def _release(self, keys: set[str]) -> None:
        for key in keys:
            fcntl.lockf(self.claims, fcntl.LOCK_UN, 1, self._offset(key))

    def _wait(self, key: str) -> None:
        fcntl.lockf(self.claims, fcntl.LOCK_EX, 1, self._offset(key))
        fcntl.lockf(self.claims, fcntl.LOCK_UN, 1, self._offset(key))

    def close(self) -> None:
        super().close()
        if self.claims is not None:
            os.close(self.claims)
            self.claims = None


class PostgresStore(LabelStore):
    """A PostgreSQL database (psycopg 3, autocommit; each write is its own transaction). Claims are
    session-level advisory locks on the key's first 64 bits, which the server drops when the
    connection ends (the process died). PostgreSQL text cannot hold NUL: stored text shows U+FFFD
    in its place (keys are computed from the original text, so lookups are unaffected)."""
    TYPES = {"real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY"}

    def __init__(self, url: str, readonly: bool = False):
        import psycopg

        self.where = describe_url(url)
        try:
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="apo-dist")
        except psycopg.Error as e:
            raise StoreError(f"{self.where}: cannot connect ({one_line(e)})") from None
        try:
            if readonly:
                self.db.execute("SET default_transaction_read_only = on")
            self._setup(readonly)
        except psycopg.Error as e:
            self.db.close()
            raise StoreError(f"{self.where}: {one_line(e)}") from None
        except StoreError:
            self.db.close()
            raise

    def _execute(self, sql: str, args=()):
        with self._connected():
            return self.db.execute(sql.replace("?", "%s"), [clean(v) for v in args])  # no statement holds a literal ?

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._connected(), self.db.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), [tuple(clean(v) for v in row) for row in rows])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._connected(), self.db.transaction():
            yield

    @contextmanager
    def _connected(self) -> Iterator[None]:
        """A lost connection (server down, restarted, network) is a StoreError: one line, and the
        answers committed before it are safe in the database."""
        import psycopg

        try:
            yield
        except psycopg.OperationalError as e:
            raise StoreError(f"{self.where}: lost the connection ({one_line(e)}); the answers committed "
                             "so far are stored: run again once the server is back") from None

    def _tables(self) -> set[str]:
        return {name for (name,) in self._execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    def _schema_lock(self) -> None:
        self._execute("SELECT pg_advisory_xact_lock(0, 1)")  # the (int, int) key space: apart from the claims'

    @staticmethod
    def _lock_id(key: str) -> int:
        return int(key[:16], 16) - (1 << 63)

    def _claim(self, keys: list[str]) -> set[str]:
        ids = {self._lock_id(k): k for k in keys}
        got = self._execute("SELECT k FROM unnest(?::bigint[]) AS k WHERE pg_try_advisory_lock(k)", (list(ids),))
        return {ids[k] for (k,) in got}

    def _release(self, keys: set[str]) -> None:
        if keys:
            self._execute("SELECT pg_advisory_unlock(k) FROM unnest(?::bigint[]) AS k",
                          ([self._lock_id(k) for k in keys],))

    def _wait(self, key: str) -> None:
        self._execute("SELECT pg_advisory_lock(?), pg_advisory_unlock(?)", (self._lock_id(key),) * 2)

    def copy_from(self, source: LabelStore) -> dict[str, tuple[int, int]]:
        """Every labels and requests row of `source` that is not here yet, in one transaction
        (a request counts as here when one with the same key, oracle and time is). Returns
        {table: (rows copied, rows already here)}."""
        import psycopg

        try:
            return self._copy_from(source)
        except psycopg.Error as e:  # rolled back: nothing copied
            raise StoreError(f"{self.where}: {one_line(e)}") from None

    def _copy_from(self, source: LabelStore) -> dict[str, tuple[int, int]]:
        counts = {}
        columns = ", ".join(LABEL_COLUMNS)
        with self._transaction():
            for table, select, insert in (
                    ("labels", f"SELECT {columns} FROM labels",
                     f"INSERT INTO labels ({columns}) SELECT {columns} FROM incoming ON CONFLICT DO NOTHING"),
                    ("requests", "SELECT key, oracle, time FROM requests",
                     "INSERT INTO requests (key, oracle, time) SELECT key, oracle, time FROM incoming i WHERE "
                     "NOT EXISTS (SELECT 1 FROM requests r WHERE r.key = i.key AND r.oracle = i.oracle "
                     "AND r.time = i.time)")):
                self._execute(f"CREATE TEMP TABLE incoming AS {select} LIMIT 0")
                rows, total = source._execute(select), 0
                with self.db.cursor() as cursor, cursor.copy("COPY incoming FROM STDIN") as copy:
                    while chunk := rows.fetchmany(5000):
                        total += len(chunk)
                        for row in chunk:
                            copy.write_row([clean(v) for v in row])
                copied = self._execute(insert).rowcount
                self._execute("DROP TABLE incoming")
                counts[table] = (copied, total - copied)
        return counts


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def clean(value):
    """A value PostgreSQL can store: text without NUL characters."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def describe_url(url: str) -> str:
    """postgresql://USER@HOST:PORT/DB of a connection URL, with libpq's defaults and without the password."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        raise StoreError("oracle.store: not a valid postgresql:// URL (postgresql://USER@HOST:PORT/DATABASE)") from None
    user = info.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    host = info.get("host") or os.environ.get("PGHOST") or "localhost"
    port = info.get("port") or os.environ.get("PGPORT") or "5432"
    return f"postgresql://{user}@{host}:{port}/{info.get('dbname') or os.environ.get('PGDATABASE') or user}"
