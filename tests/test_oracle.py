"""The sentiment oracle, the durable label store in front of every oracle (on SQLite and on
PostgreSQL: ids say which), and win-rates."""

import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from apo_dist.cli import main
from apo_dist.evaluation import win_rate
from apo_dist.oracles.sentiment import SentimentOracle
from apo_dist.oracles.store import StoreError, is_postgres, open_store

from .test_loop import CONFIG

GOOD = " wonderful, brilliant, I loved it"
BAD = " terrible, awful, I hated it"


# ---- SentimentOracle ----

def test_sentiment_prefers_positive_and_ties_equal_texts():
    oracle = SentimentOracle()
    answers = oracle.compare(["The movie was"] * 3, [GOOD, BAD, GOOD], [BAD, GOOD, GOOD])
    assert [a["label"] for a in answers] == [1.0, 0.0, 0.5]
    assert answers[0]["score_a"] > 0 > answers[0]["score_b"]


def gap_oracle(seed, gap=0.1, temperature=0.1):
    """Bradley-Terry oracle whose scores are fixed: 'A' texts score `gap` above 'B' texts."""
    oracle = SentimentOracle(noise="bradley_terry", temperature=temperature, seed=seed)
    oracle.score = lambda text: gap if text.endswith("A") else 0.0
    return oracle


def ask(oracle, n):
    return [a["label"] for a in oracle.compare([f"prompt {i}:" for i in range(n)], [" A"] * n, [" B"] * n)]


def test_bradley_terry_noise_is_reproducible():
    assert ask(gap_oracle(seed=1), 200) == ask(gap_oracle(seed=1), 200)
    assert ask(gap_oracle(seed=1), 200) != ask(gap_oracle(seed=2), 200)
    assert gap_oracle(1).identity != gap_oracle(2).identity != SentimentOracle().identity


def test_bradley_terry_win_fraction_matches_sigmoid():
    n = 3000
    oracle = gap_oracle(seed=0, gap=0.1, temperature=0.1)
    p = 1 / (1 + math.exp(-1.0))  # sigmoid(gap / T) = sigmoid(1) = 0.731
    assert oracle.compare(["x"], [" A"], [" B"])[0]["p_a"] == pytest.approx(p)
    fraction = sum(ask(oracle, n)) / n
    assert abs(fraction - p) < 0.04  # about 5 standard errors
    assert 1 - sum(ask(gap_oracle(seed=0, gap=-0.1), n)) / n == pytest.approx(p, abs=0.04)


# ---- LabelStore (each test on SQLite and on PostgreSQL) ----

class CountingOracle:
    """Answers `label` for every pair as asked; counts calls; can fail on one call."""

    def __init__(self, identity="counting", label=0.7, fail_on_call=None):
        self.identity, self.label, self.fail_on_call = identity, label, fail_on_call
        self.calls, self.asked = 0, []

    def compare(self, prompts, a, b):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("oracle down")
        self.asked += list(zip(prompts, a, b))
        return [{"label": self.label} for _ in prompts]


PROMPTS = [f"p{i}" for i in range(5)]
A = [f"a{i}" for i in range(5)]
B = [f"b{i}" for i in range(5)]


def test_store_never_asks_twice(store_location):
    store, oracle = open_store(store_location), CountingOracle()
    labels, new = store.label(oracle, PROMPTS, A, B, batch_size=2, progress=False)
    assert labels == [0.7] * 5 and new == 5 and oracle.calls == 3

    again, new = store.label(oracle, PROMPTS, A, B, progress=False)
    assert again == [0.7] * 5 and new == 0 and oracle.calls == 3
    swapped, new = store.label(oracle, PROMPTS, B, A, progress=False)  # the oracle would say 0.7
    assert swapped == pytest.approx([0.3] * 5) and new == 0 and oracle.calls == 3
    store.close()

    reopened, fresh = open_store(store_location), CountingOracle()
    labels, new = reopened.label(fresh, PROMPTS[::-1], B[::-1], A[::-1], progress=False)
    assert labels == pytest.approx([0.3] * 5) and new == 0 and fresh.calls == 0
    counts = reopened.request_counts()
    assert len(counts) == 5 and (counts["n"] == 1).all()


def test_store_asks_duplicates_in_one_call_once(store_location):
    store, oracle = open_store(store_location), CountingOracle()
    labels, new = store.label(oracle, ["p", "p", "p"], ["x", "y", "x"], ["y", "x", "y"], progress=False)
    assert new == 1 and oracle.asked == [("p", "x", "y")]
    assert labels == pytest.approx([0.7, 0.3, 0.7])
    assert store.request_counts()["n"].tolist() == [1]


def test_store_keeps_answers_across_a_crash(store_location):
    crashing = CountingOracle(fail_on_call=2)
    with pytest.raises(RuntimeError, match="oracle down"):
        open_store(store_location).label(crashing, PROMPTS, A, B, batch_size=2, progress=False)
    assert len(crashing.asked) == 2

    store, oracle = open_store(store_location), CountingOracle()
    labels, new = store.label(oracle, PROMPTS, A, B, batch_size=2, progress=False)
    assert new == 3 and labels == [0.7] * 5
    assert sorted(oracle.asked) == sorted(zip(PROMPTS[2:], A[2:], B[2:]))
    assert len(store.export()) == 5


def test_store_keys_include_oracle_identity(store_location):
    store = open_store(store_location)
    first, second = CountingOracle("judge-1", 1.0), CountingOracle("judge-2", 0.0)
    assert store.label(first, PROMPTS[:2], A[:2], B[:2], progress=False) == ([1.0, 1.0], 2)
    assert store.label(second, PROMPTS[:2], A[:2], B[:2], progress=False) == ([0.0, 0.0], 2)
    assert first.calls == second.calls == 1
    assert len(store.request_counts()) == 4


def test_store_totals_by_run_and_oracle(store_location):
    store = open_store(store_location)
    store.label(CountingOracle("judge-1"), PROMPTS[:3], A[:3], B[:3], progress=False, run="r1")
    store.label(CountingOracle("judge-2"), PROMPTS, A, B, progress=False, run="r2")
    assert store.totals()["answers"] == 8 and store.totals()["requests"] == 8
    assert store.totals(run="r1")["answers"] == 3 and store.totals(run="r2", oracle="judge-1")["answers"] == 0
    assert store.totals(run="r2", oracle="judge-2")["answers"] == 5


class LoggingOracle:
    """Appends each comparison it is asked for to its own file (one line, written before it
    answers, so the log survives the process), then answers 1.0 when a sorts before b."""

    identity = "logging"

    def __init__(self, log: Path, delay: float = 0.0):
        self.log, self.delay = log, delay

    def compare(self, prompts, a, b):
        with open(self.log, "a") as f:
            f.write("".join(f"{p} {min(x, y)} {max(x, y)}\n" for p, x, y in zip(prompts, a, b)))
        time.sleep(self.delay)
        return [{"label": float(x < y)} for x, y in zip(a, b)]


def asked(folder: Path, pattern: str = "asked_*.txt") -> Counter:
    return Counter(line for f in folder.glob(pattern) for line in f.read_text().splitlines())


WORKERS, COMPARISONS, PER_WORKER = 8, 48, 24


def _label_concurrently(location: str, worker: int, barrier, folder: Path) -> None:
    """Worker w labels comparisons w*6 ... w*6+23 (mod 48; each one is wanted by 4 workers), odd
    workers with the pair swapped, plus one duplicate, starting at the same moment as the others."""
    ids = [(worker * 6 + j) % COMPARISONS for j in range(PER_WORKER)] + [worker * 6]
    a, b = [f"x{i}" for i in ids], [f"y{i}" for i in ids]
    if worker % 2:
        a, b = b, a
    barrier.wait()
    store = open_store(location)
    labels, new = store.label(LoggingOracle(folder / f"asked_{worker}.txt", delay=0.02), [f"p{i}" for i in ids],
                              a, b, batch_size=4, progress=False)
    store.close()
    (folder / f"result_{worker}.json").write_text(json.dumps({"labels": labels, "new": new}))
    os._exit(0)


@pytest.mark.timeout(180)
def test_processes_sharing_a_store_never_ask_the_same_comparison_twice(store_location, tmp_path):
    """8 processes at once, each wanting comparisons that 3 others want too: every comparison is
    asked once across all of them, stored once, and each process gets every answer."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_label_concurrently, args=(store_location, w, barrier, tmp_path))
             for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    counts = asked(tmp_path)
    assert len(counts) == COMPARISONS and set(counts.values()) == {1}
    results = [json.loads((tmp_path / f"result_{w}.json").read_text()) for w in range(WORKERS)]
    assert sum(r["new"] for r in results) == COMPARISONS
    for w, r in enumerate(results):
        assert r["labels"] == [0.0 if w % 2 else 1.0] * (PER_WORKER + 1)  # "x.." < "y..": as asked
    store = open_store(store_location)
    assert len(store.export()) == COMPARISONS
    requests = store.request_counts()
    assert len(requests) == COMPARISONS and (requests["n"] == 1).all()


KILL_PAIRS = ([f"p{i}" for i in range(40)], [f"x{i}" for i in range(40)], [f"y{i}" for i in range(40)])


def _label_then_die(location: str, log: Path) -> None:
    """Labels 40 pairs in batches of 4; SIGKILLed once the oracle has answered the third batch,
    before the store commits it: 8 answers stored, 4 asked and lost."""
    oracle = LoggingOracle(log)
    compare, calls = oracle.compare, []

    def compare_then_die(*args):
        answers = compare(*args)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return answers

    oracle.compare = compare_then_die
    open_store(location).label(oracle, *KILL_PAIRS, batch_size=4, progress=False)
    os._exit(0)


@pytest.mark.timeout(120)
def test_a_killed_process_loses_only_its_batch_in_flight(store_location, tmp_path):
    child = mp.get_context("fork").Process(target=_label_then_die, args=(store_location, tmp_path / "asked_killed.txt"))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    lines = [f"p{i} x{i} y{i}" for i in range(40)]
    assert asked(tmp_path, "asked_killed.txt") == Counter(lines[:12])
    assert len(open_store(store_location, readonly=True).export()) == 8

    store = open_store(store_location)  # the killed process's claims went with it: nothing waits for them
    labels, new = store.label(LoggingOracle(tmp_path / "asked_rerun.txt"), *KILL_PAIRS, batch_size=4, progress=False)
    assert new == 32 and labels == [1.0] * 40
    assert asked(tmp_path, "asked_rerun.txt") == Counter(lines[8:])  # the lost batch again, nothing stored
    assert len(store.export()) == 40
    requests = dict(store.request_counts().values)
    assert sorted(requests.values()) == [1] * 36 + [2] * 4


def raw_contents(location: str):
    """Everything the store holds (tables and rows), read around apo-dist."""
    if not is_postgres(location):
        db = sqlite3.connect(f"file:{location}?mode=ro", uri=True)
        dump = list(db.iterdump())
        db.close()
        return dump
    import psycopg

    with psycopg.connect(location) as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in ("labels", "requests", "meta")}


def set_schema_version(location: str, version: int) -> None:
    execute_raw(location, f"UPDATE meta SET value = '{version}' WHERE name = 'schema_version'")


def execute_raw(location: str, sql: str) -> None:
    """One statement on the store's database, past apo-dist (to make a store of another version)."""
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as db:
            db.execute(sql)
    else:
        with sqlite3.connect(location) as db:
            db.execute(sql)
        db.close()


def test_a_store_from_a_newer_version_is_refused_untouched(store_location, tmp_path, capsys, tiny_overrides):
    store = open_store(store_location)
    store.label(CountingOracle(), PROMPTS, A, B, progress=False)
    store.close()
    set_schema_version(store_location, 99)
    before = raw_contents(store_location)
    with pytest.raises(StoreError, match=r"written by a newer apo-dist \(label store schema 99, this apo-dist reads up "
                                         r"to 1\); upgrade apo-dist"):
        open_store(store_location)
    out = tmp_path / "out" / "labels.parquet"
    assert main(["export-labels", store_location, str(out)]) == 2
    assert main(["run", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--no-progress", *tiny_overrides,
                 f"oracle.store={store_location}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "written by a newer apo-dist" in err[0] and err[1] == f"label store: {err[0]}"
    assert raw_contents(store_location) == before and not out.exists() and not (tmp_path / "run").exists()


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path, capsys, tiny_overrides):
    junk = tmp_path / "store" / "labels.sqlite"
    junk.parent.mkdir()
    junk.write_bytes(b"not a database\n" * 200)
    with pytest.raises(StoreError, match="not an apo-dist label store .file is not a database."):
        open_store(junk)
    assert main(["run", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--no-progress", *tiny_overrides,
                 f"oracle.store={junk}"]) == 2
    assert capsys.readouterr().err == f"label store: {junk}: not an apo-dist label store (file is not a database)\n"
    assert [p.name for p in junk.parent.iterdir()] == ["labels.sqlite"]
    assert junk.read_bytes() == b"not a database\n" * 200


# ---- win_rate ----

def test_win_rate_by_hand():
    out = win_rate([1, 0, 0.5, 1])
    # mean 2.5/4; deviations .375, -.625, -.125, .375; squares sum to .6875; ddof=1 variance .6875/3
    assert out["win_rate"] == pytest.approx(0.625)
    assert out["stderr"] == pytest.approx(math.sqrt(0.6875 / 3) / 2)
    assert (out["n"], out["wins"], out["losses"], out["ties"]) == (4, 2, 1, 1)
    assert out["tie_rate"] == pytest.approx(0.25)


def test_win_rate_edge_cases():
    assert math.isnan(win_rate([1.0])["stderr"])
    assert win_rate([1, 1, 1])["stderr"] == 0.0
    with pytest.raises(ValueError):
        win_rate([])
