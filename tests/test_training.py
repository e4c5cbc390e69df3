"""DPO loss by hand, gradient accumulation, and a short real training run on the tiny model."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from apo_dist.config import TrainingConfig
from apo_dist.models import load_model
from apo_dist.scoring import sequence_logprobs
from apo_dist.training import dpo_loss, gradient_accumulation, train_dpo


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def loss_of(policy_a, policy_b, ref_a, ref_b, label, beta):
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return dpo_loss(t(policy_a), t(policy_b), t(ref_a), t(ref_b), t(label), beta)


# beta = 0.5, policy a/b = -3/-9, ref a/b = -5/-7: margins +2 and -2, z = 0.5 * (2 - -2) = 2.
Z_IS_2 = (-3.0, -9.0, -5.0, -7.0)


def test_dpo_loss_hard_labels_by_hand():
    out = loss_of(*Z_IS_2, 1.0, 0.5)
    assert out["margin"].item() == pytest.approx(2.0)
    assert out["reward_a"].item() == pytest.approx(1.0)  # 0.5 * (-3 - -5)
    assert out["reward_b"].item() == pytest.approx(-1.0)  # 0.5 * (-9 - -7)
    assert out["loss"].item() == pytest.approx(-log_sigmoid(2.0))
    assert loss_of(*Z_IS_2, 0.0, 0.5)["loss"].item() == pytest.approx(-log_sigmoid(-2.0))
    assert -log_sigmoid(-2.0) == pytest.approx(2.0 + -log_sigmoid(2.0))  # the reference itself


@pytest.mark.parametrize("label", [0.0, 0.3, 0.5, 1.0])
def test_dpo_loss_is_ln2_at_z0(label):
    # policy == reference on both sides: z = 0 whatever the label
    out = loss_of(-4.0, -6.0, -4.0, -6.0, label, 0.1)
    assert out["loss"].item() == pytest.approx(math.log(2))
    assert out["reward_a"].item() == 0.0 and out["reward_b"].item() == 0.0


@pytest.mark.parametrize("label", [0.5, 0.3])
def test_dpo_loss_soft_labels(label):
    expected = -(label * log_sigmoid(2.0) + (1 - label) * log_sigmoid(-2.0))
    assert loss_of(*Z_IS_2, label, 0.5)["loss"].item() == pytest.approx(expected)


def test_dpo_loss_is_elementwise():
    out = dpo_loss(torch.tensor([-3.0, 0.0]), torch.tensor([-9.0, 0.0]), torch.tensor([-5.0, 0.0]),
                   torch.tensor([-7.0, 0.0]), torch.tensor([1.0, 0.0]), 0.5)
    assert out["loss"].tolist() == pytest.approx([-log_sigmoid(2.0), math.log(2)], abs=1e-6)


@pytest.mark.parametrize("batch, micro, world, steps", [(64, 8, 1, 8), (64, 8, 4, 2), (8, 8, 1, 1),
                                                        (12, 2, 3, 2)])
def test_gradient_accumulation(batch, micro, world, steps):
    assert gradient_accumulation(batch, micro, world) == steps


def test_gradient_accumulation_not_divisible():
    with pytest.raises(ValueError) as e:
        gradient_accumulation(64, 8, 3)
    message = str(e.value)
    assert "training.batch_size=64" in message and "(8)" in message and "(3)" in message


# ---- a real run on the tiny model ----

def random_pairs(model, pad_id, vocab, n=8, seed=0):
    """Pairs of random token ids, label 1 (a preferred), with the tiny model as reference."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, vocab, rng.integers(3, 6)).tolist() for _ in range(n)]
    tokens_a = [rng.integers(2, vocab, rng.integers(3, 6)).tolist() for _ in range(n)]
    tokens_b = [rng.integers(2, vocab, rng.integers(3, 6)).tolist() for _ in range(n)]
    ref = sequence_logprobs(model, prompts + prompts, tokens_a + tokens_b, pad_id, progress=False)["logp"]
    return pd.DataFrame({"prompt_ids": prompts, "tokens_a": tokens_a, "tokens_b": tokens_b,
                         "ref_logp_a": ref.values[:n], "ref_logp_b": ref.values[n:], "label": 1.0})


TCFG = TrainingConfig(beta=0.1, lr=1e-3, epochs=4, batch_size=4, micro_batch_size=2)


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir))
    return random_pairs(model, tiny_tokenizer.pad_token_id, len(tiny_tokenizer))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "policy"
    result = train_dpo(pairs, str(tiny_model_dir), out, TCFG, seed=0, progress=False)
    return out, result


def test_train_dpo_learns(trained, pairs):
    _, result = trained
    history = result.history
    assert result.steps == len(history) == TCFG.epochs * math.ceil(len(pairs) / TCFG.batch_size)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert abs(history[0]["margin"]) < 1e-4
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    per_epoch = pd.DataFrame(history).groupby("epoch")[["loss", "reward_accuracy"]].mean()
    assert per_epoch["loss"].is_monotonic_decreasing
    assert per_epoch["reward_accuracy"].iloc[-1] > per_epoch["reward_accuracy"].iloc[0]
    assert per_epoch["reward_accuracy"].iloc[-1] == 1.0


def test_checkpoint_loads_and_changed(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out, _ = trained
    assert not out.with_name(out.name + ".tmp").exists()
    new = AutoModelForCausalLM.from_pretrained(out).state_dict()
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert new.keys() == old.keys()
    assert any(not torch.equal(new[k], old[k]) for k in old)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


def test_trained_policy_prefers_a(trained, pairs, tiny_tokenizer):
    """The saved policy's implicit reward margin is positive on the training pairs."""
    out, _ = trained
    model = load_model(str(out))
    n = len(pairs)
    logp = sequence_logprobs(model, list(pairs["prompt_ids"]) * 2, list(pairs["tokens_a"]) + list(pairs["tokens_b"]),
                             tiny_tokenizer.pad_token_id, progress=False)["logp"].values
    margin = (logp[:n] - pairs["ref_logp_a"].values) - (logp[n:] - pairs["ref_logp_b"].values)
    assert (margin > 0).all()


def test_train_dpo_is_deterministic(trained, pairs, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    first, result = trained
    second = tmp_path / "again"
    again = train_dpo(pairs, str(tiny_model_dir), second, TCFG, seed=0, progress=False)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history]
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_short_last_batch_with_fewer_micro_batches_than_accumulation(pairs, tiny_model_dir, tmp_path):
    """5 pairs, batch 4 of micro-batches of 2: the last step has one micro-batch of one pair."""
    from types import SimpleNamespace

    tcfg = SimpleNamespace(**{**vars(TCFG), "epochs": 1, "batch_size": 4, "micro_batch_size": 2})
    result = train_dpo(pairs.iloc[:5], str(tiny_model_dir), tmp_path / "policy", tcfg, seed=0, progress=False)
    assert result.steps == 2 and all(h["loss"] > 0 for h in result.history)
