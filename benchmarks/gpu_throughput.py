"""GPU throughput of scoring, DPO training and HF generation, against plan.py's H100 assumptions.

    PYTHONPATH=src python benchmarks/gpu_throughput.py --tokenizer DIR [--shapes 135m,1.1b] [--out FILE]
    PYTHONPATH=src python benchmarks/gpu_throughput.py --tokenizer DIR --shapes tiny --smoke   # CPU check

Models are random-init Llama models built from a LlamaConfig (throughput does not depend on the
weights) in two shapes: SmolLM2-135M's (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
vocab 49152, tied embeddings) and TinyLlama-1.1B's (hidden 2048, 22 layers, 32 / 4 heads, MLP
5632, vocab 32000, untied). Each is saved with `save_pretrained` next to the tokenizer in DIR
(SmolLM2's files: tokenizer.json, tokenizer_config.json), as train_dpo loads from a folder. Token
ids are random ints in the vocab. Per shape, each with its baseline in the same run:

1. Scoring, bf16 weights: apo_dist.scoring.sequence_logprobs (length-sorted batches of --batch
   sequences) vs a naive loop (one pair = two sequences per forward pass, input order, every
   sequence padded to the longest of the set, as in scoring_throughput.py), on the same pairs
   (prompt 64 tokens, completions 16-128). The timed run of each follows an untimed warm-up run.
2. Training: apo_dist.training.train_dpo with mixed_precision bf16 (fp32 master weights, AdamW),
   batch --train-batch pairs in micro-batches of --micro vs micro-batches of 1 (same effective
   batch); pairs/s from the median time between optimizer steps, the first step excluded.
3. Generation: HF `model.generate`, bf16, greedy, --gen-tokens new tokens (EOS disabled, so every
   sequence runs the full length) for --gen-batch prompts of 64 tokens at once vs one at a time.

Model FLOPs count only real tokens (no padding): scoring 2 N T, training 6 N T, N = parameters
(tied embeddings once); attention's own FLOPs are left out (sequences here are under 200 tokens).
MFU is against the card's dense bf16 peak (989 TFLOP/s for H100/H200 SXM, `--peak-tflops`
otherwise). Generation is compared with plan.decode_tokens_per_s (the H100 roofline + 20 ms a step
for HF). Every table is also written to `--out`.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from common import naive_scores

from apo_dist.models import load_model, load_tokenizer
from apo_dist.plan import H100, decode_tokens_per_s
from apo_dist.scoring import sequence_logprobs
from apo_dist.training import train_dpo

SHAPES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 49152, "tie_word_embeddings": True},
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True},
    "1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "intermediate_size": 5632, "vocab_size": 32000, "tie_word_embeddings": False},
}

LINES: list[str] = []


def emit(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(shape: str, tokenizer_dir: str, folder: Path, device: str) -> tuple[str, float]:
    """Random-init Llama of `shape` saved (bf16) with the tokenizer into `folder`; (path, N)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SHAPES[shape]
    config = LlamaConfig(**spec, head_dim=spec["hidden_size"] // spec["num_attention_heads"],
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    n = float(sum(p.numel() for p in model.parameters()))  # shared (tied) tensors counted once
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(tokenizer_dir).save_pretrained(folder)
    del model
    return str(folder), n


def random_pairs(n: int, vocab: int, prompt: int, comp: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, vocab, size=int(k)).tolist()  # skip special ids 0-2
    return [(ids(prompt), ids(rng.integers(comp[0], comp[1] + 1)), ids(rng.integers(comp[0], comp[1] + 1)))
            for _ in range(n)]


def fmt_frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def scoring(path: str, n: float, pairs, pad_id: int, batches: list[int], device, peak: float | None) -> dict:
    model = load_model(path, "bfloat16", device).eval()
    prompts = [p for p, _, _ in pairs for _ in (0, 1)]
    completions = [c for _, a, b in pairs for c in (a, b)]
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))

    def ours(batch):
        return lambda: sequence_logprobs(model, prompts, completions, pad_id, batch, progress=False)["logp"].values

    runs = [("naive loop (one pair per pass, fixed padding)", lambda: naive_scores(model, pairs, pad_id, device),
             lambda: naive_scores(model, pairs[:8], pad_id, device))]
    runs += [(f"apo-dist sequence_logprobs (batch {b}, length-bucketed)", ours(b), ours(b)) for b in batches]
    rows = []
    for name, fn, warm in runs:
        warm()  # warm-up: kernels, cuBLAS heuristics, allocator
        sync()
        t0 = time.perf_counter()
        values = fn()
        sync()
        rows.append((name, time.perf_counter() - t0, values))
    emit("| scorer | pairs/s | tokens/s | seconds | model TFLOP/s (2NT) | MFU |")
    emit("|---|---:|---:|---:|---:|---:|")
    res = {}
    for name, secs, _ in rows:
        tflops = 2 * n * tokens / secs / 1e12
        mfu = tflops * 1e12 / peak if peak else None
        emit(f"| {name} | {len(pairs) / secs:.1f} | {tokens / secs:,.0f} | {secs:.2f} | {tflops:.1f} | {fmt_frac(mfu)} |")
        res["naive" if name.startswith("naive") else "ours"] = {"pairs_s": len(pairs) / secs, "mfu": mfu, "tflops": tflops}
    gap = float(np.max(np.abs(rows[0][2] - rows[-1][2])))
    emit(f"{len(pairs)} pairs, {tokens:,} real tokens; max |log-prob difference| ours vs naive (bf16): {gap:.3g}; "
         f"ratio={rows[0][1] / rows[-1][1]:.2f} (batch {batches[-1]} vs naive)")
    return res


def training(path: str, n: float, pairs, scores: np.ndarray, batch: int, micros: list[int],
             epochs: list[int], precision: str, peak: float | None) -> dict:
    table = pd.DataFrame({"prompt_ids": [p for p, _, _ in pairs], "tokens_a": [a for _, a, _ in pairs],
                          "tokens_b": [b for _, _, b in pairs], "ref_logp_a": scores[0::2],
                          "ref_logp_b": scores[1::2], "label": 1.0})
    tokens_per_pair = float(np.mean([2 * len(p) + len(a) + len(b) for p, a, b in pairs]))
    emit("| micro-batch (pairs) | steps timed | s/step (median) | pairs/s | tokens/s | model TFLOP/s (6NT) | MFU | first-step loss |")
    emit("|---:|---:|---:|---:|---:|---:|---:|---:|")
    res = {}
    for micro, ep in zip(micros, epochs):
        tcfg = SimpleNamespace(beta=0.1, lr=1e-6, epochs=ep, batch_size=batch, micro_batch_size=micro,
                               mixed_precision=precision, gradient_checkpointing=False, max_grad_norm=1.0,
                               weight_decay=0.0, checkpoint_every_steps=0,
                               lora=SimpleNamespace(rank=0))  # full fine-tuning
        stamps = []
        with tempfile.TemporaryDirectory() as tmp:
            result = train_dpo(table, path, Path(tmp) / "policy", tcfg, seed=0, progress=False,
                               on_step=lambda step, stamps=stamps: stamps.append(time.perf_counter()))
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        step_s = statistics.median(gaps)
        pairs_s = batch / step_s
        tflops = 6 * n * tokens_per_pair * pairs_s / 1e12
        mfu = tflops * 1e12 / peak if peak else None
        emit(f"| {micro} | {len(gaps)} | {step_s:.3f} | {pairs_s:.1f} | {tokens_per_pair * pairs_s:,.0f} | "
             f"{tflops:.1f} | {fmt_frac(mfu)} | {result.history[0]['loss']:.4f} |")
        res[micro] = {"pairs_s": pairs_s, "mfu": mfu, "tflops": tflops}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    first, last = micros[0], micros[-1]
    emit(f"batch {batch} pairs, {tokens_per_pair:.0f} tokens a pair (both sequences), mixed_precision={precision}; "
         f"ratio={res[first]['pairs_s'] / res[last]['pairs_s']:.2f}")
    return res


@torch.no_grad()
def generation(path: str, n: float, vocab: int, batches: list[int], new_tokens: int, prompt: int,
               baseline_prompts: int, device) -> dict:
    model = load_model(path, "bfloat16", device).eval()
    model.generation_config.eos_token_id = None  # fixed length: every sequence decodes new_tokens
    model.generation_config.pad_token_id = 2
    rng = np.random.default_rng(1)
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 2}
    warm = torch.tensor(rng.integers(3, vocab, size=(2, prompt)), device=device)
    model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=8, do_sample=False, pad_token_id=2)
    emit("| batch | prompts | seconds | new tokens/s | ms per decode step | weight reads GB/s (bf16) | plan.py model (H100, hf) tok/s |")
    emit("|---:|---:|---:|---:|---:|---:|---:|")
    res = {}
    for b in batches:
        calls = max(1, baseline_prompts // b) if b < max(batches) else 1
        produced = 0
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            ids = torch.tensor(rng.integers(3, vocab, size=(b, prompt)), device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            produced += (out.shape[1] - prompt) * b
        sync()
        secs = time.perf_counter() - t0
        step_ms = secs / (calls * new_tokens) * 1e3
        predicted = decode_tokens_per_s(n, "bfloat16", "hf", 1, prompt + new_tokens, batch=b)
        emit(f"| {b} | {b * calls} | {secs:.2f} | {produced / secs:,.0f} | {step_ms:.1f} | "
             f"{2 * n / (step_ms / 1e3) / 1e9:,.0f} | {predicted:,.0f} |")
        res[b] = {"tok_s": produced / secs, "step_ms": step_ms, "predicted": predicted}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit(f"prompt {prompt} tokens, {new_tokens} new tokens each, greedy; "
         f"ratio={res[max(batches)]['tok_s'] / res[min(batches)]['tok_s']:.2f}")
    return res


def section(fn, *args):
    """Run one measurement; a failure is printed and the other measurements still run."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 (a benchmark reports what broke and goes on)
        emit("FAILED:\n" + traceback.format_exc())
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    parser.add_argument("--shapes", default="135m,1.1b")
    parser.add_argument("--smoke", action="store_true", help="tiny workload (a CPU check of the script)")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch", default="64,128", help="sequences per scoring batch (ours), comma-separated")
    parser.add_argument("--train-pairs", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--micro", type=int, default=32, help="pairs per micro-batch (ours); baseline 1")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default by card)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    prompt, comp = 64, (16, 128)
    if args.smoke:
        args.pairs, args.batch, args.train_pairs, args.train_batch, args.micro = 8, "2,4", 8, 4, 2
        args.gen_batch, args.gen_tokens, prompt, comp = 2, 4, 8, (2, 6)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        989e12 if cuda and any(k in card for k in ("H100", "H200")) else None)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    emit(f"machine: {card}, torch {torch.__version__}, transformers {transformers.__version__}, "
         f"{platform.machine()}; dense bf16 peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    emit(f"plan.py assumes (H100): train_mfu {H100['train_mfu']:.2f}, score_mfu {H100['score_mfu']:.2f}, "
         f"HF decode step = roofline + {H100['step_overhead_s']['hf'] * 1e3:.0f} ms")
    summary = []
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path, n = build_model(shape, args.tokenizer, Path(tmp) / shape, str(device))
            vocab = SHAPES[shape]["vocab_size"]
            pad_id = load_tokenizer(path).pad_token_id
            emit("")
            emit(f"## {shape}: {n / 1e6:.1f}M parameters (built and saved in {time.perf_counter() - t0:.1f} s)")
            pairs = random_pairs(args.pairs, vocab, prompt, comp)
            emit("")
            emit(f"### Scoring ({args.pairs} pairs, prompt {prompt} + completions {comp[0]}-{comp[1]} tokens, bf16)")
            sc = section(scoring, path, n, pairs, pad_id, [int(b) for b in args.batch.split(",")], device, peak)
            train_pairs = random_pairs(args.train_pairs, vocab, prompt, comp, seed=2)
            ref = np.zeros(2 * len(train_pairs))  # reference log-probs: any fixed numbers do for timing
            emit("")
            emit(f"### DPO training ({args.train_pairs} pairs, batch {args.train_batch}, AdamW, bf16 mixed precision)")
            steps = max(1, args.train_pairs // args.train_batch)
            # ours: two epochs (2 x steps - 1 timed gaps); baseline micro-batch 1: one epoch
            tr = section(training, path, n, train_pairs, ref, args.train_batch, [args.micro, 1],
                          [2, 1] if steps > 1 else [3, 2], "bf16" if cuda else "no", peak)
            emit("")
            emit(f"### HF generate (bf16, greedy, prompt {prompt} + {args.gen_tokens} new tokens)")
            ge = section(generation, path, n, vocab, [1, args.gen_batch], args.gen_tokens, prompt,
                            2 if not args.smoke else 1, device)
        if not (sc and tr and ge):
            summary.append(f"{shape}: a section failed (see above)")
            continue
        summary.append(f"{shape}: score_mfu={fmt_frac(sc['ours']['mfu'])} "
                       f"(x{sc['ours']['pairs_s'] / sc['naive']['pairs_s']:.2f} naive) "
                       f"train_mfu={fmt_frac(tr[args.micro]['mfu'])} "
                       f"(x{tr[args.micro]['pairs_s'] / tr[1]['pairs_s']:.2f} micro 1) "
                       f"hf_b{args.gen_batch}={ge[args.gen_batch]['tok_s']:.0f} tok/s "
                       f"(x{ge[args.gen_batch]['tok_s'] / ge[1]['tok_s']:.2f} batch 1)")
    emit("")
    ratio = f" ratio={sc['ours']['pairs_s'] / sc['naive']['pairs_s']:.2f}" if sc else ""
    emit(f"summary: {card}; " + "; ".join(summary) + ratio)
    if args.out:
        Path(args.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
