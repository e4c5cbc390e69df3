"""DPO loss by hand, gradient accumulation, and a short real training run on the tiny model."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from apo_dist.config import TrainingConfig
from apo_dist.models import completion_logprobs, load_model
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
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928...; label 0 (b preferred): -log sigmoid(-2) = 2 + that
    assert out["loss"].item() == pytest.approx(0.1269280110, abs=1e-9)
    assert loss_of(*Z_IS_2, 0.0, 0.5)["loss"].item() == pytest.approx(2.1269280110, abs=1e-9)


def test_dpo_loss_label_1_is_minus_log_sigmoid_of_beta_times_margin():
    beta, pa, pb, ra, rb = 0.1, -12.5, -20.25, -14.0, -19.0  # margins 1.5 and -1.25
    out = loss_of(pa, pb, ra, rb, 1.0, beta)
    assert out["reward_a"].item() == pytest.approx(beta * (pa - ra))
    assert out["reward_b"].item() == pytest.approx(beta * (pb - rb))
    assert out["loss"].item() == pytest.approx(-log_sigmoid(beta * (1.5 - -1.25)))


def test_dpo_loss_tie_is_symmetric():
    """Label 0.5: the loss is log(2 cosh(z / 2)), the same for z and -z."""
    tie = loss_of(*Z_IS_2, 0.5, 0.5)["loss"].item()
    assert tie == pytest.approx(math.log(2 * math.cosh(1.0)))
    assert tie == pytest.approx(1.1269280110, abs=1e-9)
    swapped = loss_of(Z_IS_2[1], Z_IS_2[0], Z_IS_2[3], Z_IS_2[2], 0.5, 0.5)
    assert swapped["margin"].item() == pytest.approx(-2.0) and swapped["loss"].item() == pytest.approx(tie)


@pytest.mark.parametrize("label", [0.0, 0.3, 0.5, 1.0])
def test_dpo_loss_is_ln2_at_z0(label):
    # policy == reference on both sides: z = 0 whatever the label
    out = loss_of(-4.0, -6.0, -4.0, -6.0, label, 0.1)
    assert out["loss"].item() == pytest.approx(math.log(2))
    assert out["reward_a"].item() == 0.0 and out["reward_b"].item() == 0.0


@pytest.mark.parametrize("label, expected", [(0.5, 1.1269280110), (0.3, 1.5269280110), (0.8, 0.5269280110)])
def test_dpo_loss_soft_labels(label, expected):
    # label * 0.126928... + (1 - label) * 2.126928...
    assert loss_of(*Z_IS_2, label, 0.5)["loss"].item() == pytest.approx(expected, abs=1e-9)


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


# ---- gradient accumulation gives the gradient of the whole batch ----

@pytest.fixture
def applied_gradients(monkeypatch):
    """Makes train_dpo use plain SGD in place of AdamW, recording the gradient of every parameter
    at each optimizer step (Accelerate calls the optimizer only on the step that ends accumulation)."""
    steps = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            steps.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: RecordingSGD(params, lr=lr))
    return steps


@pytest.fixture(scope="module")
def pairs10(tiny_model_dir, tiny_tokenizer):
    """10 pairs with hard, tied and soft labels."""
    model = load_model(str(tiny_model_dir))
    table = random_pairs(model, tiny_tokenizer.pad_token_id, len(tiny_tokenizer), n=10, seed=1)
    return table.assign(label=[1.0, 0.0, 0.5, 1.0, 0.3, 1.0, 0.0, 1.0, 0.8, 0.0])


def assert_close_relative(a: list[torch.Tensor], b: list[torch.Tensor], rel: float = 1e-5):
    """Each tensor of `a` is within `rel` of `b`'s, in norm; no `b` is zero (that would prove nothing)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert y.norm() > 0
        assert (x - y).norm() <= rel * y.norm()


SGD_TCFG = TrainingConfig(beta=0.1, lr=1e-3, epochs=1, max_grad_norm=1e9, checkpoint_every_steps=0)  # no clipping


@pytest.mark.parametrize("micro", [16, 8, 4, 2])
def test_one_step_applies_the_gradient_of_the_mean_loss(micro, applied_gradients, pairs10, tiny_model_dir,
                                                          tiny_tokenizer, tmp_path):
    """10 pairs, batch 16: one optimizer step whatever the micro-batch size. With micro-batches of
    4 (3 of 4 accumulation steps) or 2 (5 of 8) the batch has fewer micro-batches than accumulation."""
    tcfg = TrainingConfig(**{**vars(SGD_TCFG), "batch_size": 16, "micro_batch_size": micro})
    result = train_dpo(pairs10, str(tiny_model_dir), tmp_path / "policy", tcfg, seed=0, progress=False)
    assert result.steps == len(applied_gradients) == 1

    model = load_model(str(tiny_model_dir), "float32")  # by hand: one forward pass over the 10 pairs
    prompts = list(pairs10["prompt_ids"])
    logp, _, _ = completion_logprobs(model, prompts * 2, list(pairs10["tokens_a"]) + list(pairs10["tokens_b"]),
                                     tiny_tokenizer.pad_token_id)
    as_tensor = lambda col: torch.tensor(pairs10[col].values, dtype=torch.float32)  # noqa: E731
    loss = dpo_loss(logp[:10], logp[10:], as_tensor("ref_logp_a"), as_tensor("ref_logp_b"), as_tensor("label"),
                    tcfg.beta)["loss"].mean()
    loss.backward()
    assert result.history[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert_close_relative(applied_gradients[0], [p.grad for p in model.parameters()])


@pytest.mark.parametrize("micro", [2, 1])
def test_accumulation_matches_whole_batches_with_a_short_batch(micro, applied_gradients, pairs10, tiny_model_dir,
                                                                tmp_path):
    """10 pairs, batch 4, 2 epochs: steps of 4, 4 and 2 pairs, twice. The short step, as 1
    micro-batch of 2 with 2 accumulation steps (or 2 of 1 with 4), and every step after it,
    applies the same gradient as whole batches of 4."""
    whole = TrainingConfig(**{**vars(SGD_TCFG), "epochs": 2, "batch_size": 4, "micro_batch_size": 4})
    a = train_dpo(pairs10, str(tiny_model_dir), tmp_path / "whole", whole, seed=0, progress=False)
    whole_steps = list(applied_gradients)
    applied_gradients.clear()
    accumulated = TrainingConfig(**{**vars(whole), "micro_batch_size": micro})
    b = train_dpo(pairs10, str(tiny_model_dir), tmp_path / "accumulated", accumulated, seed=0, progress=False)
    assert a.steps == b.steps == len(whole_steps) == len(applied_gradients) == 6
    for x, y in zip(a.history, b.history):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
    for x, y in zip(applied_gradients, whole_steps):
        assert_close_relative(x, y)
