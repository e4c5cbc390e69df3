"""Oracles as a service: the LLM judge against a real vLLM server behind a fault-injection proxy,
the reward-model and custom oracles, unlabelable pairs, cost accounting and budgets.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import traceback
import zlib
from pathlib import Path

import pandas as pd
import pytest

from apo_dist.calls import RateLimiter, Transient, retry
from apo_dist.cli import main
from apo_dist.config import ConfigError, load_config
from apo_dist.oracles.judge import JudgeError, LLMJudge, parse_verdict, read_logprobs, render
from apo_dist.oracles.base import OracleError, OracleUnavailable
from apo_dist.oracles.custom import CustomOracle
from apo_dist.oracles.registry import make_oracle
from apo_dist.oracles.store import StoreError, open_store

from .judge_server import JUDGE_KEY, JUDGE_MODEL, FaultProxy, judge_server, pair_key  # noqa: F401 (fixture)
from .test_loop import run_cli
from .test_oracle import execute_raw

KEY_ENV = "APO_TEST_JUDGE_KEY"


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, JUDGE_KEY)


def judge_cfg(base_url: str, *overrides: str):
    cfg = load_config(None, ["model.policy=unused", "oracle.kind=llm_judge", f"oracle.model={JUDGE_MODEL}",
                             f"oracle.base_url={base_url}", f"oracle.api_key_env={KEY_ENV}", "oracle.timeout=6",
                             "oracle.max_concurrency=32", "oracle.batch_size=16", *overrides])
    return cfg.oracle


def pairs(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    good = [" a wonderful, moving film", " great fun from start to end", " brilliant acting"]
    bad = [" a dull, boring mess", " terrible and far too long", " awful acting"]
    return ([f"Review {seed}-{i}: The movie was" for i in range(n)],
            [good[i % 3] for i in range(n)], [bad[(i + 1) % 3] for i in range(n)])


# ---- text parsing and log-probabilities (no server) ----

VERDICTS = [
    ("Continuation A is more upbeat.\nA", "A"),
    ("B", "B"),
    ("b", "B"),
    ("The second one is warmer.\n\n**B**", "B"),
    ("Comparison: A praises the film, B criticises it.\nPreferred: A", "A"),
    ("A is cheerful while B is gloomy.\n'A'.", "A"),
    ("Both are fine, but A is warmer.\nAnswer: \"A\"", "A"),
    ("Response B reads as more positive.\nFinal answer: **Response B**", "B"),
    ("A is more positive.\n### Verdict: (A)", "A"),
    ("B is more positive.\nThe better one is B.", "B"),
    ("B\n\nThe second continuation is more enthusiastic about the film.", "B"),
    ("`A`", "A"),
    ("I'm sorry, but I can't help with comparing these texts.", None),
    ("Both have merit.\nA or B", None),
    ("A and B are equally positive.", None),
    ("Neither continuation is positive.", None),
    ("", None),
    ("   \n\n", None),
]


@pytest.mark.parametrize("text,expected", VERDICTS)
def test_parse_verdict_table(text, expected):
    letter, reason = parse_verdict(text)
    assert letter == expected
    assert bool(reason) == (expected is None)


def test_parse_verdict_reasons():
    assert parse_verdict("I'm sorry, I cannot judge this.")[1] == "refusal"
    assert parse_verdict("A and B")[1] == "both A and B in the verdict line"
    assert parse_verdict("")[1] == "empty answer"
    assert parse_verdict("Hard to say.")[1] == "no A/B verdict"


def test_read_logprobs_normalises_over_a_and_b():
    p, _ = read_logprobs([("A", math.log(0.6)), (" A", math.log(0.1)), ("B", math.log(0.2)), ("The", math.log(0.1))])
    assert p == pytest.approx(0.7 / 0.9)
    assert read_logprobs([("The", -0.1), ("a", -2.0)]) == (None, "neither A nor B among the top log-probabilities")


def test_prompt_structure_and_recorded_order():
    text = render("summary", "text", "POST", "first", "second")[0]["content"]
    assert "Summary A:\n<<<\nfirst\n>>>" in text and "Summary B:\n<<<\nsecond\n>>>" in text
    assert text.rstrip().endswith("write only the letter of the better one: A or B.")
    judge = LLMJudge(judge_cfg("http://127.0.0.1:9/v1"))
    orders = [judge.shown_order(f"p{i}", "x", "y") for i in range(200)]
    assert 70 < orders.count("ab") < 130  # random per comparison ...
    flipped = {"ab": "ba", "ba": "ab"}
    assert all(judge.shown_order(f"p{i}", "y", "x") == flipped[o] for i, o in enumerate(orders))  # ... and stable


def test_judge_config_is_validated():
    for bad, message in [(["oracle.api_key_env=sk-live-abc"], "NAME of an environment variable"),
                         (["oracle.answer=json"], "allowed: text, logprob"),
                         (["oracle.max_cost=5"], "no price for model 'judge'"),
                         (["oracle.kind=custom", "oracle.function=nocolon"], "package.module:function"),
                         (["eval.oracle.kind=sentiment", "eval.oracle.max_labels=3"], "budgets are run-wide")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.policy=unused", "oracle.kind=llm_judge", "oracle.model=judge", *bad])
    cfg = load_config(None, ["model.policy=unused", "oracle.kind=llm_judge", "oracle.model=judge",
                             "oracle.max_cost=5", "oracle.prices.judge.input=2.5", "oracle.prices.judge.output=10"])
    assert cfg.oracle.prices["judge"].output == 10 and cfg.eval.oracle is None


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"environment variable {KEY_ENV}"):
        LLMJudge(judge_cfg("http://127.0.0.1:9/v1"))


# ---- calling at scale (no server) ----



class FakeClock:
    """time.monotonic and asyncio.sleep for apo_dist.calls: sleeping is recorded and advances the clock."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retry_honours_retry_after_then_gives_up(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from apo_dist import calls as calls_module

    clock = FakeClock()
    monkeypatch.setattr(calls_module, "asyncio", SimpleNamespace(sleep=clock.sleep))
    asked = []

    async def flaky():
        asked.append(clock.now)
        raise Transient("HTTP 429", retry_after=0.3)

    with pytest.raises(Exception, match="failed 3 times; last error: HTTP 429"):
        asyncio.run(retry(flaky, max_retries=2))
    # two waits of Retry-After plus a jitter of at most 0.1 s
    assert len(asked) == 3 and len(clock.sleeps) == 2 and all(0.3 <= s <= 0.4 for s in clock.sleeps)


def test_rate_limiter_spaces_requests(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from apo_dist import calls

    clock = FakeClock()
    monkeypatch.setattr(calls, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(calls, "asyncio", SimpleNamespace(sleep=clock.sleep))

    async def take(n, amount=1.0):
        for _ in range(n):
            await limiter.acquire(amount)

    limiter = RateLimiter(per_minute=240)  # 4 per second, a burst of 240
    asyncio.run(take(240))
    assert clock.sleeps == []  # a full bucket: a minute's allowance at once
    asyncio.run(take(5))
    assert clock.sleeps == [0.25] * 5 and clock.now == 1.25  # then one every 1/4 s
    clock.now += 1.0  # idle for a second: 4 refilled
    asyncio.run(take(4))
    assert len(clock.sleeps) == 5
    asyncio.run(take(1, amount=1000))  # more than a minute's allowance waits for a full bucket
    assert clock.sleeps[5:] == [60.0]
    asyncio.run(RateLimiter(per_minute=0).acquire(1e9))
    assert len(clock.sleeps) == 6  # per_minute 0: unlimited, never waits


# ---- custom and reward-model oracles, unlabelable pairs (no server) ----

def length_labeller(prompts, a, b):
    """A user's labeller: prefers the longer completion; None (unlabelable) when equally long."""
    return [None if len(x) == len(y) else len(x) > len(y) for x, y in zip(a, b)]


def costly_labeller(prompts, a, b):
    """A labeller that reports what each answer cost."""
    return [{"label": float(len(x) >= len(y)), "cost": 0.01, "input_tokens": 10, "output_tokens": 1}
            for x, y in zip(a, b)]


def test_custom_oracle_through_the_store_and_unlabelable_never_reasked(store_location, tmp_path):
    oracle = CustomOracle("tests.test_judge:length_labeller")
    store = open_store(store_location)
    labels, new = store.label(oracle, ["p", "p", "p"], ["long one", "x", "same"], ["short", "longer", "SAME"],
                              progress=False)
    assert new == 3 and labels[:2] == [1.0, 0.0] and math.isnan(labels[2])
    again, new = store.label(oracle, ["p"], ["SAME"], ["same"], progress=False)
    assert new == 0 and math.isnan(again[0])
    assert store.totals()["unlabelable"] == 1
    with pytest.raises(OracleError, match="cannot be loaded"):
        CustomOracle("tests.test_judge:no_such_function")
    assert store.reasons(oracle.identity, ["p"], ["same"], ["SAME"]) == {"the labeller returned None": 1}
    store.close()
    assert main(["export-labels", store_location, str(tmp_path / "labels.parquet")]) == 0
    exported = pd.read_parquet(tmp_path / "labels.parquet")
    assert len(exported) == 3 and sorted(exported["status"]) == ["ok", "ok", "unlabelable"]


def test_a_store_from_an_older_version_is_refused(store_location):
    old = ("CREATE TABLE labels (key TEXT PRIMARY KEY, oracle TEXT, prompt TEXT, first TEXT, second TEXT, "
           "label REAL, raw TEXT, created REAL)")
    execute_raw(store_location, old)
    with pytest.raises(StoreError, match="older apo-dist .no status column.; point oracle.store at a new file"):
        open_store(store_location)


OUTAGE = {"on": True}


def half_down_labeller(prompts, a, b):
    """During an outage, every other pair gets no answer (as when retries are exhausted)."""
    return [{"status": "error", "reason": "HTTP 503 x9"} if OUTAGE["on"] and i % 2 else {"label": 1.0}
            for i in range(len(prompts))]


def test_unanswered_pairs_stop_the_stage_and_are_asked_again_later(store_location, monkeypatch):
    store, oracle = open_store(store_location), CustomOracle("tests.test_judge:half_down_labeller")
    with pytest.raises(OracleUnavailable, match="2 of 4 comparisons got no answer .2 stored.; first error: HTTP 503"):
        store.label(oracle, *pairs(4), progress=False)
    assert store.totals()["answers"] == 2  # the answers received are kept
    monkeypatch.setitem(OUTAGE, "on", False)
    labels, new = store.label(oracle, *pairs(4), progress=False)
    assert new == 2 and labels == [1.0] * 4  # only the unanswered ones are asked again


def test_reward_model_oracle(tmp_path, tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    cfg = load_config(None, ["model.policy=unused", "oracle.kind=reward_model", f"oracle.model={tmp_path / 'rm'}"])
    prompts, a, b = pairs(6)
    oracle = make_oracle(cfg.oracle, seed=0)
    answers = oracle.compare(prompts, a, b)
    assert all(x["label"] == float(x["score_a"] > x["score_b"]) for x in answers)
    swapped = oracle.compare(prompts, b, a)
    assert [x["label"] for x in swapped] == [1 - x["label"] for x in answers]
    noisy = make_oracle(load_config(None, ["model.policy=unused", "oracle.kind=reward_model", "oracle.noise=bradley_terry",
                                           f"oracle.model={tmp_path / 'rm'}"]).oracle, seed=0)
    assert all(0 < x["p_a"] < 1 for x in noisy.compare(prompts, a, b))


# ---- unlabelable pairs in a round, budgets (tiny runs, no server) ----

def picky_labeller(prompts, a, b):
    """Refuses about a third of the prompts (by a stable hash), prefers the longer completion."""
    return [None if zlib.crc32(p.encode()) % 3 == 0 else len(x) >= len(y) for p, x, y in zip(prompts, a, b)]


def test_unlabelable_pairs_are_replaced_by_the_next_best(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "loop.rounds=1", "oracle.kind=custom", "oracle.function=tests.test_judge:picky_labeller",
                 "eval.oracle.kind=sentiment"]
    run_dir = tmp_path / "certainty"
    assert run_cli(run_dir, [*overrides, "acquisition.function=certainty"]) == 0
    rd = run_dir / "round_0000"
    labels, acquired = pd.read_parquet(rd / "labels.parquet"), pd.read_parquet(rd / "acquired.parquet")
    refused = acquired[[zlib.crc32(p.encode()) % 3 == 0 for p in acquired["prompt"]]]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    m = next(x for x in metrics if x["stage"] == "labels")
    assert len(refused) > 0 and len(labels) == 8 and labels["label"].notna().all()
    assert set(labels["pair_id"]) == set(acquired["pair_id"]) - set(refused["pair_id"]) | set(labels["pair_id"])
    assert not set(labels["pair_id"]) & set(refused["pair_id"])
    assert m["unlabelable"] >= len(refused) and m["shortfall"] == 0
    assert m["unlabelable_reasons"] == {"the labeller returned None": m["unlabelable"]}
    # random acquisition draws exactly M candidates: nothing can replace a refused pair. Training
    # on what is left ends on a short batch: fewer micro-batches (of 2) than the 2 accumulated.
    run_dir = tmp_path / "random"
    assert run_cli(run_dir, overrides) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    m, train = (next(x for x in metrics if x["stage"] == stage) for stage in ("labels", "train"))
    assert m["shortfall"] == m["unlabelable"] > 0 and m["labels"] == 8 - m["shortfall"]
    assert m["labels"] % 4 in (1, 2) and train["pairs"] == m["labels"]
    assert train["steps"] == math.ceil(m["labels"] / 4)


def test_label_budget_stops_the_run_at_a_stage_boundary(tmp_path, tiny_overrides, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, [*tiny_overrides, "oracle.max_labels=12"]) == 6
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and "label budget reached" in state["reason"]
    assert (run_dir / "round_0000" / "eval.json").exists() and not (run_dir / "round_0001").exists()
    assert main(["status", str(run_dir)]) == 0
    assert "status: stopped (label budget reached: 8 labels so far" in capsys.readouterr().out
    # Raising the budget resumes the run where it stopped.
    assert run_cli(run_dir, [*tiny_overrides, "oracle.max_labels=16"]) == 0


def test_cost_budget_stops_the_run_with_everything_saved(tmp_path, tiny_overrides, capsys):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "oracle.kind=custom", "oracle.function=tests.test_judge:costly_labeller",
                 "oracle.max_cost=0.08", "eval.oracle.kind=sentiment"]
    assert run_cli(run_dir, overrides) == 6
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and "cost budget reached: $0.0800" in state["reason"]
    assert len(pd.read_parquet(run_dir / "round_0000" / "labels.parquet")) == 8
    assert not (run_dir / "round_0001").exists()  # stopped before the next round
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "cost budget reached" in out and "this run paid for 8 (80 + 8 tokens, $0.0800)" in out


def test_cost_budget_stops_inside_the_labelling_stage(tmp_path, tiny_overrides):
    """$0.01 an answer, $0.035 to spend, batches of 64: one answer to learn the price, two more fit,
    the fourth would pass the budget and is not asked. Raising the budget continues from the store."""
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "oracle.kind=custom", "oracle.function=tests.test_judge:costly_labeller",
                 "eval.oracle.kind=sentiment"]
    assert run_cli(run_dir, [*overrides, "oracle.max_cost=0.035"]) == 6
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and "cost budget reached: $0.0300 spent" in state["reason"]
    assert not (run_dir / "round_0000" / "labels.parquet").exists()
    store = open_store(run_dir / "labels.sqlite")
    assert store.totals()["answers"] == 3 and store.totals()["requests"] == 3
    assert run_cli(run_dir, [*overrides, "oracle.max_cost=1"]) == 0
    labeller = CustomOracle("tests.test_judge:costly_labeller").identity
    assert store.totals(oracle=labeller)["answers"] == 16  # 8 labels a round
    assert store.request_counts()["n"].max() == 1  # none asked twice
    store.close()


# ---- against the real judge server ----

def stored(db: Path) -> dict[str, str]:
    """pair_key -> status of every answer in the store."""
    with sqlite3.connect(db) as con:
        return {pair_key(p, f, s): status for p, f, s, status in
                con.execute("SELECT prompt, first, second, status FROM labels")}


def test_labelling_64_pairs_through_faults(judge_server, tmp_path):
    with FaultProxy(judge_server, fault_rate=0.35, seed=1, retry_after=0.5) as proxy:
        oracle = make_oracle(judge_cfg(proxy.url, "oracle.max_tokens=4", "oracle.max_reasks=1", "oracle.max_concurrency=16",
                                       f"oracle.prices.{JUDGE_MODEL}.input=1",
                                       f"oracle.prices.{JUDGE_MODEL}.output=2"), seed=0)
        store = open_store(tmp_path / "labels.sqlite")
        prompts, a, b = pairs(64)
        labels, new = store.label(oracle, prompts, a, b, batch_size=32, progress=False, run="r")
    assert new == 64 and sum(proxy.injected.values()) >= 0.3 * proxy.requests
    assert set(proxy.injected) == {"429", "500", "timeout", "malformed", "truncated"}
    table = store.export()
    assert len(table) == 64 and set(table["status"]) <= {"ok", "unlabelable"}
    ok = table[table["status"] == "ok"]
    assert ok["label"].between(0, 1).all() and (table.loc[table["status"] != "ok", "reason"] != "").all()
    assert sum(not math.isnan(x) for x in labels) == len(ok)
    assert (table["model"] == JUDGE_MODEL).all() and set(table["shown_order"]) == {"ab", "ba"}
    assert (table["input_tokens"] > 0).all() and (table["cost"] > 0).all() and (table["latency"] > 0).all()
    assert table["prompt_version"].str.startswith("judge-v1/sentiment/text").all()
    totals = store.totals(run="r")
    assert totals["answers"] == 64 and totals["cost"] == pytest.approx(table["cost"].sum())
    assert proxy.auth_headers == {f"Bearer {JUDGE_KEY}"}


KILLED_IN_BATCH = 5  # of 4 pairs each


def _label_in_child(db: str, base_url: str) -> None:
    """Labels 64 pairs in batches of 4 and is killed (SIGKILL) once the judge has answered the
    KILLED_IN_BATCH-th batch, before the store commits it: 16 answers stored, 4 paid for and lost."""
    os.environ[KEY_ENV] = JUDGE_KEY
    oracle = make_oracle(judge_cfg(base_url, "oracle.answer=logprob", "oracle.max_concurrency=4"), seed=0)
    compare, batches = oracle.compare, []

    def compare_then_die(*args):
        answers = compare(*args)
        batches.append(answers)
        if len(batches) == KILLED_IN_BATCH:
            os.kill(os.getpid(), signal.SIGKILL)
        return answers

    oracle.compare = compare_then_die
    open_store(db).label(oracle, *pairs(64, seed=7), batch_size=4, progress=False)
    os._exit(0)


def test_killed_labelling_never_resends_a_stored_comparison(judge_server, tmp_path):
    db = tmp_path / "labels.sqlite"
    prompts, a, b = pairs(64, seed=7)
    keys = [pair_key(p, x, y) for p, x, y in zip(prompts, a, b)]
    stored_keys, lost_keys, never_asked = keys[:16], keys[16:20], keys[20:]
    with FaultProxy(judge_server, fault_rate=0.3, faults=("429", "500", "malformed"), seed=2, retry_after=0.5) as proxy:
        child = mp.get_context("fork").Process(target=_label_in_child, args=(str(db), proxy.url))
        child.start()
        child.join(300)
        if child.exitcode is None:  # stuck: end it (SIGTERM, so that the assertion below fails)
            child.terminate()
            child.join()
        assert child.exitcode == -signal.SIGKILL
        before = stored(db)
        counts_before = dict(proxy.counts)
        assert sorted(before) == sorted(stored_keys)
        assert all(counts_before.get(k, 0) >= 1 for k in lost_keys)  # asked, answered, not stored
        assert not any(k in counts_before for k in never_asked)
        oracle = make_oracle(judge_cfg(proxy.url, "oracle.answer=logprob"), seed=0)
        labels, new = open_store(db).label(oracle, prompts, a, b, progress=False)
    assert new == 48 and sorted(stored(db)) == sorted(keys)
    assert all(proxy.counts[k] == counts_before[k] for k in stored_keys)  # nothing stored was asked again
    assert all(proxy.counts[k] > counts_before[k] for k in lost_keys)  # the lost batch was
    assert all(0 <= x <= 1 for x in labels)


def test_logprob_mode_gives_soft_labels_and_both_orders_agreement(judge_server, tmp_path):
    oracle = make_oracle(judge_cfg(judge_server, "oracle.answer=logprob", "oracle.both_orders=true"), seed=0)
    answers = oracle.compare(*pairs(6))
    for x in answers:
        p_ab, p_ba = x["p_a_by_order"]
        assert 0 < p_ab < 1 and 0 < p_ba < 1 and x["label"] == pytest.approx((p_ab + p_ba) / 2)
        assert x["shown_order"] == "both" and isinstance(x["agreement"], bool) and x["asks"] == 2


def test_whole_run_with_the_judge_through_faults_keeps_the_key_secret(judge_server, tmp_path, tiny_overrides, capfd):
    run_dir = tmp_path / "run"
    with FaultProxy(judge_server, fault_rate=0.35, seed=3) as proxy:
        overrides = [*tiny_overrides, "loop.rounds=1", "oracle.kind=llm_judge", f"oracle.model={JUDGE_MODEL}",
                     f"oracle.base_url={proxy.url}", f"oracle.api_key_env={KEY_ENV}", "oracle.answer=logprob",
                     "oracle.timeout=6", "oracle.max_concurrency=32", f"oracle.prices.{JUDGE_MODEL}.input=0.5",
                     f"oracle.prices.{JUDGE_MODEL}.output=1.5"]
        assert run_cli(run_dir, overrides) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    labels = next(m for m in metrics if m["stage"] == "labels")
    evals = next(m for m in metrics if m["stage"] == "eval")
    assert labels["labels"] == 8 and labels["shortfall"] == 0
    assert labels["oracle_requests"] == labels["labels"] + labels["unlabelable"]  # a fresh store: all asked
    assert evals["n"] == 24 and 0 <= evals["unjudged"] <= 24  # unjudged pairs count, by a seeded coin
    assert main(["status", str(run_dir)]) == 0
    out = "".join(capfd.readouterr())
    answers = labels["labels"] + labels["unlabelable"] + 24 - evals["identical"]  # identical pairs: ties, not asked
    assert evals["oracle_requests"] == 24 - evals["identical"]
    assert f"label store: {answers} answers, {answers} oracle requests" in out and "this run paid for" in out
    assert sum(proxy.injected.values()) > 0
    # The key is nowhere: run directory (tables, store, logs, config), console output.
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert JUDGE_KEY.encode() not in f.read_bytes(), f
    assert JUDGE_KEY not in out
    assert KEY_ENV in (run_dir / "config.yaml").read_text()


def test_errors_never_show_the_key(judge_server, caplog):
    with FaultProxy(judge_server, fault_rate=1.0, faults=("reject",)) as proxy:
        oracle = make_oracle(judge_cfg(proxy.url), seed=0)
        with pytest.raises(JudgeError) as info:
            oracle.compare(*pairs(2))
    assert "HTTP 401" in str(info.value) and "Incorrect API key provided: ***" in str(info.value)
    text = "".join(traceback.format_exception(info.value)) + caplog.text
    assert JUDGE_KEY not in text
