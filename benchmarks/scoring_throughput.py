"""Scoring throughput: our length-bucketed batched scorer vs a naive loop, pairs/s.

    python benchmarks/scoring_throughput.py [--pairs 256] [--batch 32] [--threads 2]

The workload is candidate pairs with completions of 4-32 tokens (as generation without a fixed
length gives). The naive loop scores one pair per forward pass (its two completions), in the
given order, every sequence padded to the longest of the whole set. Ours sorts by length,
batches `--batch` sequences and pads only within a batch. Both give the same log-probs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import machine, model_path, naive_scores, text_pairs

from apo_dist.models import load_model, load_tokenizer
from apo_dist.scoring import sequence_logprobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = model_path()
    tok = load_tokenizer(path)
    model = load_model(path).eval()
    pairs = text_pairs(tok, args.pairs, completion_tokens=(4, 32))

    t0 = time.perf_counter()
    base = naive_scores(model, pairs, tok.pad_token_id)
    t_naive = time.perf_counter() - t0

    prompts = [p for p, _, _ in pairs for _ in (0, 1)]
    completions = [c for _, a, b in pairs for c in (a, b)]
    t0 = time.perf_counter()
    ours = sequence_logprobs(model, prompts, completions, tok.pad_token_id, args.batch, progress=False)["logp"].values
    t_ours = time.perf_counter() - t0
    gap = float(np.max(np.abs(ours - base)))

    print(f"machine: {machine()}")
    print(f"workload: SmolLM2-135M-Instruct fp32, {args.pairs} pairs, prompt 12 + completions 4-32 tokens")
    print("| scorer | pairs/s | seconds |")
    print("|---|---:|---:|")
    print(f"| naive loop (one pair per pass, fixed padding) | {args.pairs / t_naive:.2f} | {t_naive:.1f} |")
    print(f"| apo-dist sequence_logprobs (batch {args.batch}, length-bucketed) | {args.pairs / t_ours:.2f} | {t_ours:.1f} |")
    print(f"max |log-prob difference|: {gap:.2e}")
    print(f"summary: ours={args.pairs / t_ours:.2f} pairs/s naive={args.pairs / t_naive:.2f} pairs/s ratio={t_naive / t_ours:.2f}")


if __name__ == "__main__":
    main()
