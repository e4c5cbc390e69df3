"""Generation throughput: HF generate vs the vLLM offline engine vs a pool of vLLM servers, tokens/s.

    python benchmarks/generation_throughput.py [--prompts 64] [--n 4] [--tokens 24] [--servers 1]
                                               [--vllm-dtype bfloat16]

Same workload for all three, through the backends the coordinator uses (`make_backend`): 64
movie-review prompts of 12 tokens, 4 samples each at T = 1, 24 new tokens (fixed length), with
per-token log-probs. HF runs in fp32 (its CPU fast path); vLLM in `--vllm-dtype`. Timings exclude
start-up (engine/server start and the first weight probe, shown separately). Ends with
`summary: ... ratio=X.XX` (server pool over HF).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import machine, model_path, text_pairs

from apo_dist.config import load_config
from apo_dist.generation.backends import make_backend
from apo_dist.generation.base import SamplingParams
from apo_dist.models import load_model, load_tokenizer


def timed(backend, path: str, prompts, params) -> tuple[float, float]:
    """(start-up seconds: first call on 2 prompts, seconds for the workload)."""
    t0 = time.perf_counter()
    backend.generate(path, prompts[:2], SamplingParams(n=1, max_new_tokens=2))
    t1 = time.perf_counter()
    out = backend.generate(path, prompts, params)
    t2 = time.perf_counter()
    assert len(out) == len(prompts) * params.n and all(len(t) == params.max_new_tokens for t in out["token_ids"])
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--servers", type=int, default=1, help="local servers in the pool (CPUs split between them)")
    parser.add_argument("--vllm-dtype", default="bfloat16")
    args = parser.parse_args()
    path = model_path()
    tok = load_tokenizer(path)
    prompts = [p for p, _, _ in text_pairs(tok, args.prompts, prompt_tokens=12)]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.tokens, fixed_length=True, seed=0)
    tokens = args.prompts * args.n * args.tokens
    models = {}

    def load(p):  # HF model for HF generate and for the vLLM weight probe (fp32)
        return models.setdefault(p, load_model(p))

    workdir = Path(tempfile.mkdtemp(prefix="apo-gen-bench-"))
    rows = []
    for name, overrides in [
        ("hf generate (fp32)", ["generation.backend=hf", "generation.batch_size=64"]),
        (f"vllm offline engine ({args.vllm_dtype})", ["generation.backend=vllm"]),
        (f"vllm server pool x{args.servers} ({args.vllm_dtype})",
         ["generation.backend=vllm_server", f"generation.servers.num_local={args.servers}"]),
    ]:
        cfg = load_config(None, [f"model.policy={path}", f"generation.vllm.dtype={args.vllm_dtype}",
                                 "generation.vllm.probe_tolerance=0.2", *overrides])
        backend = make_backend(cfg.generation, cfg.model.dtype, load, tok, workdir, progress=False)
        try:
            startup, seconds = timed(backend, path, prompts, params)
        finally:
            backend.close()
        rows.append((name, startup, seconds, tokens / seconds))
    hf = rows[0][3]
    print(f"machine: {machine()}")
    print(f"workload: {args.prompts} prompts x {args.n} samples x {args.tokens} tokens = {tokens} tokens, "
          f"T=1, per-token log-probs, SmolLM2-135M-Instruct")
    print("| backend | start-up s | seconds | tokens/s | ratio to HF |\n|---|---|---|---|---|")
    for name, startup, seconds, rate in rows:
        print(f"| {name} | {startup:.1f} | {seconds:.2f} | {rate:.0f} | {rate / hf:.2f} |")
    print(f"summary: hf={hf:.0f} tok/s vllm_engine={rows[1][3]:.0f} tok/s vllm_server_pool={rows[2][3]:.0f} tok/s "
          f"ratio={rows[2][3] / hf:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
