"""Teacher-forced log-probs against a hand-written reference, per-prompt entropy, pair tables."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from apo_dist.models import completion_logprobs, load_model
from apo_dist.scoring import pair_table, prompt_entropy, sequence_logprobs


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def pad_id(tiny_tokenizer):
    return tiny_tokenizer.pad_token_id


def random_sequences(n, vocab, seed=0):
    """(prompt_ids, completion_ids) of mixed lengths from non-special token ids."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, vocab, rng.integers(2, 9)).tolist() for _ in range(n)]
    completions = [rng.integers(2, vocab, rng.integers(1, 7)).tolist() for _ in range(n)]
    return prompts, completions


@torch.no_grad()
def manual(model, prompt, completion):
    """(sum of log p, mean entropy) over completion tokens, from ONE unpadded forward pass."""
    ids = torch.tensor([prompt + completion])
    logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total, entropies = 0.0, []
    for j, token in enumerate(completion):
        row = logps[len(prompt) - 1 + j]  # the distribution that predicts completion[j]
        total += row[token].item()
        entropies.append(-(row.exp() * row).sum().item())
    return total, sum(entropies) / len(entropies)


def test_completion_logprobs_equals_manual_sum(model, pad_id, tiny_tokenizer):
    prompts, completions = random_sequences(1, len(tiny_tokenizer), seed=1)
    logp, n_tokens, entropy = completion_logprobs(model, prompts, completions, pad_id)
    expected, _ = manual(model, prompts[0], completions[0])
    assert entropy is None
    assert n_tokens.tolist() == [len(completions[0])]
    assert logp.item() == pytest.approx(expected, abs=1e-5)
    # Moving the last prompt token into the completion adds exactly its own log-prob.
    p, c = prompts[0], completions[0]
    moved, _, _ = completion_logprobs(model, [p[:-1]], [p[-1:] + c], pad_id)
    last_prompt_token, _ = manual(model, p[:-1], p[-1:])
    assert moved.item() - logp.item() == pytest.approx(last_prompt_token, abs=1e-5)
    assert abs(last_prompt_token) > 1e-3


def test_padding_and_batch_neighbours_do_not_change_logp(model, pad_id, tiny_tokenizer):
    (p, *_), (c, *_) = random_sequences(1, len(tiny_tokenizer), seed=2)
    expected, _ = manual(model, p, c)
    rng = np.random.default_rng(3)
    long_p = rng.integers(2, len(tiny_tokenizer), 20).tolist()
    long_c = rng.integers(2, len(tiny_tokenizer), 15).tolist()
    logp, n_tokens, _ = completion_logprobs(model, [long_p, p, long_p], [long_c, c, c], pad_id)
    assert logp[1].item() == pytest.approx(expected, abs=1e-5)
    assert n_tokens.tolist() == [15, len(c), len(c)]
    # The same completion after a different prompt gets a different log-prob.
    assert abs(logp[2].item() - expected) > 1e-3


def test_batched_equals_one_by_one_in_input_order(model, pad_id, tiny_tokenizer):
    prompts, completions = random_sequences(11, len(tiny_tokenizer), seed=4)
    expected = [manual(model, p, c) for p, c in zip(prompts, completions)]
    one = sequence_logprobs(model, prompts, completions, pad_id, batch_size=1, with_entropy=True, progress=False)
    seven = sequence_logprobs(model, prompts, completions, pad_id, batch_size=7, with_entropy=True, progress=False)
    for table in (one, seven):
        assert table["n_tokens"].tolist() == [len(c) for c in completions]
        np.testing.assert_allclose(table["logp"], [e[0] for e in expected], atol=1e-5, rtol=0)
        np.testing.assert_allclose(table["token_entropy"], [e[1] for e in expected], atol=1e-5, rtol=0)
    np.testing.assert_allclose(one["logp"], seven["logp"], atol=1e-5, rtol=0)


def test_without_entropy_has_no_entropy_column(model, pad_id, tiny_tokenizer):
    prompts, completions = random_sequences(3, len(tiny_tokenizer), seed=5)
    table = sequence_logprobs(model, prompts, completions, pad_id, progress=False)
    assert list(table.columns) == ["logp", "n_tokens"]


def test_token_entropy_is_entropy_of_full_distribution(model, pad_id, tiny_tokenizer):
    prompts, completions = random_sequences(2, len(tiny_tokenizer), seed=6)
    _, _, entropy = completion_logprobs(model, prompts, completions, pad_id, with_entropy=True)
    for i in range(2):
        _, expected = manual(model, prompts[i], completions[i])
        assert entropy[i].item() == pytest.approx(expected, abs=1e-5)
        assert 0 < expected <= math.log(len(tiny_tokenizer)) + 1e-6


# ---- prompt_entropy: each prompt's value from its own samples only ----

def entropy_samples(seed=0):
    """Rows of three prompts with N = 2, 3, 5 samples, shuffled so prompts interleave."""
    rng = np.random.default_rng(seed)
    counts = {"p0": 2, "p1": 3, "p2": 5}
    rows = [{"prompt_id": p, "logp": -rng.uniform(1, 30), "token_entropy": rng.uniform(0, 5)}
            for p, n in counts.items() for _ in range(n)]
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


def by_hand(samples, prompt, estimator):
    own = samples[samples["prompt_id"] == prompt]
    values = [-x for x in own["logp"]] if estimator == "mc" else list(own["token_entropy"])
    return sum(values) / len(values)


@pytest.mark.parametrize("estimator", ["mc", "token"])
def test_prompt_entropy_uses_own_samples(estimator):
    samples = entropy_samples()
    assert samples["prompt_id"].iloc[:4].nunique() > 1  # really interleaved
    out = prompt_entropy(samples, estimator).set_index("prompt_id")
    assert out["n_samples"].to_dict() == {"p0": 2, "p1": 3, "p2": 5}
    for p in ("p0", "p1", "p2"):
        assert out.loc[p, "entropy"] == pytest.approx(by_hand(samples, p, estimator), abs=1e-12)

    perturbed = samples.copy()
    others = perturbed["prompt_id"] != "p1"
    perturbed.loc[others, ["logp", "token_entropy"]] *= 3.0
    again = prompt_entropy(perturbed, estimator).set_index("prompt_id")
    assert again.loc["p1", "entropy"] == out.loc["p1", "entropy"]
    assert again.loc["p0", "entropy"] != out.loc["p0", "entropy"]


def test_prompt_entropy_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="mc, token"):
        prompt_entropy(entropy_samples(), "bald")


# ---- pair_table ----

def sample_rows(prompt_id, sample, policy, ref):
    return {"prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "prompt_ids": [1, prompt_id],
            "sample": sample, "token_ids": [10 + sample, prompt_id], "completion": f"c{prompt_id}{sample}",
            "policy_logp": policy, "ref_logp": ref}


SAMPLES = [(7, 0, -10.0, -12.0), (3, 0, -5.0, -5.0), (7, 1, -20.0, -15.0), (3, 1, -8.0, -9.0)]


def test_pair_table_rewards_and_certainty():
    beta = 0.5
    pairs = pair_table(pd.DataFrame([sample_rows(*s) for s in SAMPLES]), beta).set_index("prompt_id")
    # prompt 7: r_a = 0.5 * (-10 + 12) = 1.0, r_b = 0.5 * (-20 + 15) = -2.5, certainty 3.5
    # prompt 3: r_a = 0.5 * 0 = 0.0,          r_b = 0.5 * (-8 + 9) = 0.5,    certainty 0.5
    assert pairs.loc[7, ["reward_a", "reward_b", "certainty"]].tolist() == pytest.approx([1.0, -2.5, 3.5])
    assert pairs.loc[3, ["reward_a", "reward_b", "certainty"]].tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert pairs.loc[7, "completion_a"] == "c70" and pairs.loc[7, "completion_b"] == "c71"
    assert list(pairs.loc[3, "tokens_b"]) == [11, 3]
    assert pairs.loc[3, "ref_logp_b"] == -9.0


def test_pair_table_needs_two_samples_per_prompt():
    rows = [sample_rows(*s) for s in SAMPLES] + [sample_rows(9, 0, -1.0, -1.0)]
    with pytest.raises(ValueError, match="two samples"):
        pair_table(pd.DataFrame(rows), 0.1)


def test_pair_table_pairs_by_prompt_when_rows_are_shuffled():
    rows = [sample_rows(*s) for s in SAMPLES]
    shuffled = pd.DataFrame([rows[0], rows[1], rows[3], rows[2]])  # sample 1 rows: prompt 3 before 7
    pairs = pair_table(shuffled, 0.5).set_index("prompt_id")
    assert pairs.loc[7, "completion_b"] == "c71" and pairs.loc[3, "completion_b"] == "c31"
    assert pairs.loc[7, "certainty"] == pytest.approx(3.5)
