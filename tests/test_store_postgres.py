"""The PostgreSQL label store from the command line: an unreachable server, `migrate-labels`, and a
whole `apo-dist run` on it (the store's own tests, on both backends, are in test_oracle.py)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from apo_dist.cli import main
from apo_dist.oracles.store import StoreError, open_store
from apo_dist.util import free_port

from .test_loop import CONFIG, run_cli
from .test_oracle import CountingOracle, raw_contents


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path, capsys, tiny_overrides):
    port = free_port()  # nothing listens there
    url = f"postgresql://apo:s3cret@127.0.0.1:{port}/labels"
    with pytest.raises(StoreError) as refused:
        open_store(url)
    line = str(refused.value)
    assert line.startswith(f"postgresql://apo@127.0.0.1:{port}/labels: cannot connect (")
    assert "\n" not in line and "s3cret" not in line and "Connection refused" in line

    sqlite = tmp_path / "labels.sqlite"
    store = open_store(sqlite)
    store.label(CountingOracle(), ["p"], ["a"], ["b"], progress=False)
    store.close()
    before = raw_contents(str(sqlite))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"status": "running", "round": 0, "stage": "labels"}))
    (run_dir / "config.yaml").write_text(f"oracle:\n  store: {url}\n")
    assert main(["export-labels", url, str(tmp_path / "out.parquet")]) == 2
    assert main(["migrate-labels", str(sqlite), url]) == 2
    assert main(["run", str(CONFIG), "--run-dir", str(tmp_path / "new_run"), "--no-progress", *tiny_overrides,
                 f"oracle.store={url}"]) == 2
    assert main(["status", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [line, line, f"label store: {line}", f"label store: {line}"]
    assert "status: running" in out and "s3cret" not in out + err
    assert raw_contents(str(sqlite)) == before and not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "new_run").exists()


def test_migrate_labels_copies_each_row_once(postgres_url, tmp_path, capsys):
    sqlite = str(tmp_path / "labels.sqlite")
    store = open_store(sqlite)
    oracle = CountingOracle()
    store.label(oracle, [f"p{i}" for i in range(5)], [f"a{i}" for i in range(5)], ["b\x00"] * 5, progress=False,
                run="r1")
    store.close()

    assert main(["migrate-labels", sqlite, postgres_url]) == 0
    assert main(["migrate-labels", sqlite, postgres_url]) == 0  # again: nothing twice
    store = open_store(sqlite)
    store.label(oracle, ["q0", "q1"], ["a", "a"], ["b", "c"], progress=False, run="r2")
    store.close()
    assert main(["migrate-labels", sqlite, postgres_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in out] == [
        "labels 5 copied, 0 already there; requests 5 copied, 0 already there",
        "labels 0 copied, 5 already there; requests 0 copied, 5 already there",
        "labels 2 copied, 5 already there; requests 2 copied, 5 already there"]
    assert out[0].startswith(f"{sqlite} -> postgresql://apo@127.0.0.1:")

    source, copy = open_store(sqlite, readonly=True), open_store(postgres_url)
    mine, theirs = (s.export().sort_values("key", ignore_index=True) for s in (source, copy))
    assert (theirs["second"] == "b\ufffd").sum() == 5  # PostgreSQL text holds no NUL
    theirs["second"] = mine["second"]
    pd.testing.assert_frame_equal(mine, theirs)
    assert copy.totals(run="r1") == {**source.totals(run="r1"), "requests": 7} and copy.totals()["requests"] == 7
    fresh = CountingOracle()  # what was copied is never asked again
    labels, new = copy.label(fresh, [f"p{i}" for i in range(5)], ["b\x00"] * 5, [f"a{i}" for i in range(5)],
                             progress=False)
    assert new == 0 and fresh.calls == 0 and labels == pytest.approx([0.3] * 5)

    assert main(["migrate-labels", sqlite, str(tmp_path / "other.sqlite")]) == 2
    assert main(["migrate-labels", str(tmp_path / "missing.sqlite"), postgres_url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "migrate-labels SOURCE DESTINATION: SOURCE is a SQLite label store (a file), DESTINATION a postgresql:// URL",
        f"{tmp_path / 'missing.sqlite'}: no label store here"]
    assert not (tmp_path / "other.sqlite").exists()


def test_a_run_on_a_postgres_store(postgres_url, tmp_path, capsys, tiny_overrides):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "loop.rounds=1", f"oracle.store={postgres_url}"]
    assert run_cli(run_dir, overrides) == 0
    store = open_store(postgres_url)
    totals = store.totals(run=str(run_dir.resolve()))
    assert totals["answers"] >= 8 and totals["requests"] == totals["answers"]  # labels, then eval judgements
    assert (store.request_counts()["n"] == 1).all() and not (run_dir / "labels.sqlite").exists()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (f"label store: {totals['answers']} answers, {totals['requests']} oracle requests" in out
            and f"; shared store postgresql://apo@127.0.0.1:" in out)
    assert run_cli(run_dir, overrides) == 0  # a finished run: nothing asked again
    assert store.totals()["requests"] == totals["requests"]


def test_a_connection_lost_mid_run_is_one_line_and_keeps_what_was_committed(postgres_url):
    import psycopg

    store, oracle = open_store(postgres_url), CountingOracle()
    store.label(oracle, ["p1", "p2"], [" a", " bb"], [" ccc", " d"], progress=False)
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # what a server restart does to a session
        admin.execute("SELECT pg_terminate_backend(%s)", (store.db.info.backend_pid,))
    with pytest.raises(StoreError, match=r"lost the connection .*the answers committed so far are stored"):
        store.label(oracle, ["p3"], [" e"], [" ff"], progress=False)
    store.close()
    again = open_store(postgres_url)
    assert again.totals()["answers"] == 2 and oracle.calls == 1
    again.close()
