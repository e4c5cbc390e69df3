"""Answers stored per second by the label store, SQLite vs PostgreSQL, with 1 and 8 concurrent writers.

Each writer is a process labelling its own distinct comparisons through `LabelStore.label` in
batches of 64 with a free, instant oracle whose answers look like an LLM judge's (model, prompt
version, order shown, a 200-character raw text, tokens, cost, latency), so the time measured is the
store's: look-up, claims, the request log and the answers, each batch committed before the next.
SQLite is a file in a fresh temporary folder on the local disk; PostgreSQL is a server started with
`launch/postgres.sh` (or --url), a fresh schema per measurement. Prints a table and a last line
`summary: ... ratio=X.XX` (PostgreSQL over SQLite with 8 writers).

    .venv/bin/python benchmarks/label_store.py [--answers 2048] [--url postgresql://...]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from apo_dist.oracles.store import open_store
from apo_dist.util import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "postgres.sh"
BATCH = 64
WORDS = "the movie film story plot acting was a an and but not very good bad great dull funny slow moving".split()


class FreeJudge:
    """An instant oracle answering like an LLM judge (text mode)."""

    identity = "bench-judge"

    def compare(self, prompts, a, b):
        return [{"label": float(len(x) >= len(y)), "model": "bench-model", "prompt_version": "judge-v1/bench",
                 "shown_order": "ab", "raw_text": "Continuation A is warmer about the film. " * 5 + "\nA",
                 "input_tokens": 180, "output_tokens": 40, "cost": 0.00012, "latency": 0.8} for x, y in zip(a, b)]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def writer(location: str, worker: int, answers: int, barrier, times) -> None:
    rng = random.Random(worker)
    prompts = [f"Review {worker}-{i}: {text(rng, 10)}" for i in range(answers)]
    a, b = [text(rng, 24) for _ in range(answers)], [text(rng, 24) for _ in range(answers)]
    store = open_store(location)
    barrier.wait()
    start = time.perf_counter()
    _, new = store.label(FreeJudge(), prompts, a, b, batch_size=BATCH, progress=False, run=f"bench-{worker}")
    times.put((start, time.perf_counter(), new))
    store.close()


def measure(location: str, writers: int, answers: int) -> tuple[int, float]:
    """(answers stored, seconds from the first writer's start to the last one's end)."""
    ctx = mp.get_context("fork")
    barrier, times = ctx.Barrier(writers), ctx.Queue()
    open_store(location).close()  # the tables exist before the clock starts
    procs = [ctx.Process(target=writer, args=(location, w, answers, barrier, times)) for w in range(writers)]
    for p in procs:
        p.start()
    results = [times.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    stored = len(open_store(location, readonly=True).export())
    assert stored == sum(r[2] for r in results) == writers * answers, (stored, results)
    return stored, max(r[1] for r in results) - min(r[0] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=2048, help="answers per writer")
    parser.add_argument("--url", default="", help="a PostgreSQL server's URL; default: start one (launch/postgres.sh)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="store-bench-"))
    server = None
    url = args.url
    if not url:
        server = tempfile.mkdtemp(prefix="apo-pg-bench-")  # reachable by the `postgres` user
        url = subprocess.run(["bash", str(SCRIPT), "up", server, str(free_port())], check=True, capture_output=True,
                             text=True).stdout.split()[-1]
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True) as db:
            pg_version = db.execute("SHOW server_version").fetchone()[0]
        rows = []
        for writers in (1, 8):
            location = str(work / f"labels_{writers}.sqlite")
            rows.append(("SQLite (WAL, synchronous=FULL)", writers, *measure(location, writers, args.answers)))
            schema = f"bench_{writers}_{os.getpid()}"
            with psycopg.connect(url, autocommit=True) as db:
                db.execute(f"CREATE SCHEMA {schema}")
            location = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
            rows.append(("PostgreSQL", writers, *measure(location, writers, args.answers)))
    finally:
        if server:
            subprocess.run(["bash", str(SCRIPT), "down", server], capture_output=True)
            shutil.rmtree(server, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    print(f"machine: {platform.machine()} {cpu}, {os.cpu_count()} cores; SQLite {sqlite3.sqlite_version}, "
          f"PostgreSQL {pg_version} on this machine; batches of {BATCH}, {args.answers} answers per writer")
    print(f"{'store':<32} {'writers':>7} {'answers':>8} {'seconds':>8} {'answers/s':>10}")
    for store, writers, stored, seconds in rows:
        print(f"{store:<32} {writers:>7} {stored:>8} {seconds:>8.2f} {stored / seconds:>10.0f}")
    rate = {(s.split()[0], w): n / t for s, w, n, t in rows}
    print(f"summary: 8 writers: PostgreSQL {rate['PostgreSQL', 8]:.0f} answers/s, SQLite {rate['SQLite', 8]:.0f} "
          f"(1 writer: {rate['PostgreSQL', 1]:.0f} and {rate['SQLite', 1]:.0f}) "
          f"ratio={rate['PostgreSQL', 8] / rate['SQLite', 8]:.2f}")


if __name__ == "__main__":
    main()
