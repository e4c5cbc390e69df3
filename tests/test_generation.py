"""The HF generation backend: table format, sampled-token log-probs, lengths, seeds."""
from __future__ import annotations

import numpy as np
import pytest

from apo_dist.generation.base import SamplingParams
from apo_dist.generation.hf import HFBackend
from apo_dist.models import load_model
from apo_dist.scoring import sequence_logprobs


@pytest.fixture(scope="module")
def backend(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir))
    return HFBackend(lambda path: model, tiny_tokenizer, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    texts = ["The movie was", "A very good film and", "Terrible", "The actor is not very", "Some scene"]
    return [tiny_tokenizer(t)["input_ids"] for t in texts]


def test_table_has_n_rows_per_prompt_in_order(backend, tiny_model_dir, prompt_ids):
    out = backend.generate(str(tiny_model_dir), prompt_ids, SamplingParams(n=3, max_new_tokens=5, fixed_length=True))
    assert len(out) == 15
    assert list(out["prompt_index"]) == [i for i in range(5) for _ in range(3)]
    assert list(out["sample"]) == [0, 1, 2] * 5
    assert all(len(t) == 5 and len(lp) == 5 for t, lp in zip(out["token_ids"], out["token_logprobs"]))
    assert set(out["finish_reason"]) == {"length"}


def test_sampled_token_logprobs_match_teacher_forced_scoring(backend, tiny_model_dir, tiny_tokenizer, prompt_ids):
    """Left-padded generation and right-padded scoring see the same distribution (fp32)."""
    out = backend.generate(str(tiny_model_dir), prompt_ids, SamplingParams(n=2, max_new_tokens=6, fixed_length=True, seed=3))
    model = backend.load(str(tiny_model_dir))
    scored = sequence_logprobs(model, [prompt_ids[i] for i in out["prompt_index"]], list(out["token_ids"]),
                               tiny_tokenizer.pad_token_id, batch_size=4, progress=False)
    np.testing.assert_allclose([sum(lp) for lp in out["token_logprobs"]], scored["logp"], rtol=1e-4, atol=1e-4)


def test_same_seed_same_samples_other_seed_differs(backend, tiny_model_dir, prompt_ids):
    gen = lambda seed: backend.generate(str(tiny_model_dir), prompt_ids, SamplingParams(n=2, max_new_tokens=6, seed=seed))  # noqa: E731
    a, b, c = gen(1), gen(1), gen(2)
    assert list(a["completion"]) == list(b["completion"])
    assert list(a["completion"]) != list(c["completion"])


def test_stop_at_eos_cuts_after_it(tiny_model_dir, tiny_tokenizer, prompt_ids):
    """A model that always prefers EOS stops after one token unless fixed_length suppresses it."""
    import torch

    model = load_model(str(tiny_model_dir))
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():  # a zeroed final norm makes every logit the lm_head bias: EOS wins
        model.model.norm.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[eos] = 10.0
    backend = HFBackend(lambda path: model, tiny_tokenizer, batch_size=5, progress=False)
    free = backend.generate("tiny", prompt_ids, SamplingParams(n=1, temperature=0, max_new_tokens=4))
    assert all(list(t) == [eos] for t in free["token_ids"]) and set(free["finish_reason"]) == {"stop"}
    fixed = backend.generate("tiny", prompt_ids, SamplingParams(n=1, temperature=0, max_new_tokens=4, fixed_length=True))
    assert all(len(t) == 4 and eos not in list(t) for t in fixed["token_ids"])


def test_each_local_vllm_server_gets_its_own_gpus(monkeypatch):
    from apo_dist.generation.vllm_engine import gpu_groups

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_groups(4, 2, device_count=8) == ["0,1", "2,3", "4,5", "6,7"]
    assert gpu_groups(2, 1, device_count=0) == [None, None]  # CPU machine
    assert gpu_groups(3, 4, device_count=8) == [None, None, None]  # too few: shared, with a warning
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")  # e.g. what SLURM gave this job
    assert gpu_groups(2, 2, device_count=4) == ["3,5", "6,7"]
