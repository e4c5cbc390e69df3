"""Weight sync: seconds to bring a new policy into vLLM, a LoRA adapter load vs a full in-place reload.

    python benchmarks/weight_sync.py [--rank 16] [--swaps 6] [--dtype float32]

The same two trained policies on SmolLM2-135M-Instruct in both forms: peft adapters (rank `--rank` on
q/k/v/o, random lora_B) and the merged full checkpoints of those adapters. A full fine-tuning run's
offline engine (started without LoRA) swaps to each merged checkpoint in place (the baseline); a LoRA
run's engine (started with LoRA) keeps the SFT weights and loads each adapter. Both through
`VLLMBackend.sync`, the step the backend takes when the policy changes, followed by a one-token
request (an adapter is copied into the engine's LoRA slots on its first request), alternating the
two policies; then the weight probe, timed apart (its HF side is the same for both). Medians over
`--swaps` swaps; engine start-up is not timed. Ends with `summary: ... ratio=X.XX` (full reload
over adapter load, sync + first request).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import machine, model_path, text_pairs

from apo_dist.config import load_config
from apo_dist.generation.backends import make_backend
from apo_dist.generation.base import SamplingParams
from apo_dist.models import load_model, load_tokenizer


def make_policies(base: str, rank: int, workdir: Path, tok) -> tuple[list[str], list[str]]:
    """Two adapters on `base` and their merged full checkpoints: ([adapter dirs], [merged dirs])."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters, merged = [], []
    for seed in (1, 2):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=rank, lora_alpha=16,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        adapters.append(str(workdir / f"adapter_{seed}"))
        model.save_pretrained(adapters[-1])
        merged.append(str(workdir / f"merged_{seed}"))
        model.merge_and_unload().save_pretrained(merged[-1])
        for folder in (adapters[-1], merged[-1]):
            tok.save_pretrained(folder)
    return adapters, merged


def time_swaps(backend, base: str, policies: list[str], prompt: list[int], swaps: int) -> tuple[float, float, float]:
    """Median seconds of (sync + a one-token request, the same request with nothing to sync, the probe)."""
    from vllm import SamplingParams as VSP

    from apo_dist.generation.vllm_engine import Policy

    def one_token() -> float:
        t0 = time.perf_counter()
        backend.llm.generate([{"prompt_token_ids": prompt}], VSP(max_tokens=1), use_tqdm=False,
                             lora_request=backend.lora)
        return time.perf_counter() - t0

    backend.generate(base, [prompt], SamplingParams(n=1, max_new_tokens=1))  # start-up, not timed
    synced, probed = [], []
    for i in range(swaps):
        policy = Policy.of(policies[i % 2])
        t0 = time.perf_counter()
        backend.sync(policy)
        synced.append(time.perf_counter() - t0 + one_token())
        t0 = time.perf_counter()
        backend.check(policy.path)  # the engine serves the policy: the sync is real
        probed.append(time.perf_counter() - t0)
    request = statistics.median(one_token() for _ in range(swaps))
    return statistics.median(synced), request, statistics.median(probed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16, help="the adapters' LoRA rank (training.lora.rank)")
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--dtype", default="float32", help="the engine's dtype (the probe's tolerance follows)")
    args = parser.parse_args()
    base = model_path()
    tok = load_tokenizer(base)
    prompt = text_pairs(tok, 1, prompt_tokens=12)[0][0]
    workdir = Path(tempfile.mkdtemp(prefix="apo-weight-sync-"))
    adapters, merged = make_policies(base, args.rank, workdir, tok)
    cfg = load_config(None, [f"model.policy={base}", "generation.backend=vllm", f"generation.vllm.dtype={args.dtype}"])
    load_before = os.getloadavg()[0]
    rows = []
    for name, lora_rank, policies in [("full reload in place (merged checkpoint)", 0, merged),
                                      (f"LoRA adapter load (rank {args.rank})", args.rank, adapters)]:
        backend = make_backend(cfg.generation, cfg.model.dtype, load_model, tok, workdir, progress=False,
                               lora_rank=lora_rank)
        try:
            rows.append((name, *time_swaps(backend, base, policies, prompt, args.swaps)))
        finally:
            backend.close()
    sizes = [sum(f.stat().st_size for f in Path(p[0]).glob("*.safetensors")) / 2**20 for p in (merged, adapters)]
    full, lora = rows[0][1], rows[1][1]
    print(f"machine: {machine()}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"workload: SmolLM2-135M-Instruct, vLLM offline engine, {args.dtype}; median of {args.swaps} swaps "
          f"alternating two policies; weights files {sizes[0]:.0f} MiB (full) vs {sizes[1]:.1f} MiB (adapter)")
    print("| weight sync | sync + first request s | request alone s | probe s | ratio to full reload |\n"
          "|---|---:|---:|---:|---:|")
    for name, synced, request, probe in rows:
        print(f"| {name} | {synced:.3f} | {request:.3f} | {probe:.3f} | {full / synced:.2f} |")
    print(f"summary: full_reload={full:.3f} s adapter_load={lora:.3f} s (sync + first one-token request) "
          f"ratio={full / lora:.2f}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
