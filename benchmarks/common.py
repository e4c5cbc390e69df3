"""Shared workload for the benchmarks: SmolLM2-135M-Instruct and movie-review text pairs."""
from __future__ import annotations

import json
import platform

import numpy as np
import torch

from apo_dist.assets import cache_dir, ensure_model, ensure_movie_reviews


def model_path() -> str:
    return str(ensure_model("smollm2-135m-instruct", cache_dir()))


def text_pairs(tokenizer, n: int, prompt_tokens: int = 12, completion_tokens=(16, 16), seed: int = 0):
    """n (prompt, chosen, rejected) token-id triples cut from movie-review sentences.

    `completion_tokens` is the (min, max) length of each completion, drawn uniformly."""
    rng = np.random.default_rng(seed)
    lines = (ensure_movie_reviews(cache_dir())).read_text().splitlines()
    ids = [tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] for line in lines[:4000]]
    ids = [t for t in ids if len(t) >= prompt_tokens + completion_tokens[1]]
    out = []
    for _ in range(n):
        p, a, b = (ids[i] for i in rng.choice(len(ids), size=3, replace=False))
        la, lb = rng.integers(completion_tokens[0], completion_tokens[1] + 1, size=2)
        out.append((p[:prompt_tokens], a[prompt_tokens: prompt_tokens + la], b[prompt_tokens: prompt_tokens + lb]))
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


@torch.no_grad()
def naive_scores(model, pairs, pad_id: int, device="cpu") -> np.ndarray:
    """The scoring baseline: one pair (two sequences) per forward pass, every sequence padded to the
    longest of the whole set; returns the completions' summed log-probs, a then b for each pair."""
    width = max(len(p) + max(len(a), len(b)) for p, a, b in pairs)
    out = []
    for p, a, b in pairs:
        ids = torch.full((2, width), pad_id)
        mask = torch.zeros((2, width), dtype=torch.long)
        for i, c in enumerate((a, b)):
            ids[i, : len(p) + len(c)] = torch.tensor([*p, *c])
            mask[i, : len(p) + len(c)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token = logps.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out += [token[i, len(p) - 1: len(p) - 1 + len(c)].sum().item() for i, c in enumerate((a, b))]
    return np.array(out)
