"""The sentiment oracle, the durable label store in front of every oracle, and win-rates."""

import math

import pytest

from apo_dist.evaluation import win_rate
from apo_dist.oracles.sentiment import SentimentOracle
from apo_dist.oracles.store import LabelStore

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


# ---- LabelStore ----

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


def test_store_never_asks_twice(tmp_path):
    path = tmp_path / "labels.sqlite"
    store, oracle = LabelStore(path), CountingOracle()
    labels, new = store.label(oracle, PROMPTS, A, B, batch_size=2, progress=False)
    assert labels == [0.7] * 5 and new == 5 and oracle.calls == 3

    again, new = store.label(oracle, PROMPTS, A, B, progress=False)
    assert again == [0.7] * 5 and new == 0 and oracle.calls == 3
    swapped, new = store.label(oracle, PROMPTS, B, A, progress=False)  # the oracle would say 0.7
    assert swapped == pytest.approx([0.3] * 5) and new == 0 and oracle.calls == 3
    store.close()

    reopened, fresh = LabelStore(path), CountingOracle()
    labels, new = reopened.label(fresh, PROMPTS[::-1], B[::-1], A[::-1], progress=False)
    assert labels == pytest.approx([0.3] * 5) and new == 0 and fresh.calls == 0
    counts = reopened.request_counts()
    assert len(counts) == 5 and (counts["n"] == 1).all()


def test_store_asks_duplicates_in_one_call_once(tmp_path):
    store, oracle = LabelStore(tmp_path / "labels.sqlite"), CountingOracle()
    labels, new = store.label(oracle, ["p", "p", "p"], ["x", "y", "x"], ["y", "x", "y"], progress=False)
    assert new == 1 and oracle.asked == [("p", "x", "y")]
    assert labels == pytest.approx([0.7, 0.3, 0.7])
    assert store.request_counts()["n"].tolist() == [1]


def test_store_keeps_answers_across_a_crash(tmp_path):
    path = tmp_path / "labels.sqlite"
    crashing = CountingOracle(fail_on_call=2)
    with pytest.raises(RuntimeError, match="oracle down"):
        LabelStore(path).label(crashing, PROMPTS, A, B, batch_size=2, progress=False)
    assert len(crashing.asked) == 2

    store, oracle = LabelStore(path), CountingOracle()
    labels, new = store.label(oracle, PROMPTS, A, B, batch_size=2, progress=False)
    assert new == 3 and labels == [0.7] * 5
    assert sorted(oracle.asked) == sorted(zip(PROMPTS[2:], A[2:], B[2:]))
    assert len(store.export()) == 5


def test_store_keys_include_oracle_identity(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    first, second = CountingOracle("judge-1", 1.0), CountingOracle("judge-2", 0.0)
    assert store.label(first, PROMPTS[:2], A[:2], B[:2], progress=False) == ([1.0, 1.0], 2)
    assert store.label(second, PROMPTS[:2], A[:2], B[:2], progress=False) == ([0.0, 0.0], 2)
    assert first.calls == second.calls == 1
    assert len(store.request_counts()) == 4


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
