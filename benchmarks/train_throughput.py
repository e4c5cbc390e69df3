"""DPO training throughput: apo-dist's trainer vs TRL's DPOTrainer, same pairs, batch, lengths, dtype,
and ours with a LoRA adapter (training.lora) vs full fine-tuning.

    python benchmarks/train_throughput.py [--pairs 64] [--batch 8] [--threads 2] [--lora-rank 16] [--no-trl]

Both start from SmolLM2-135M-Instruct in fp32, train one epoch with Adam(W) at a constant lr and
beta 0.1, and are timed per optimizer step (the first step is warm-up and not counted). Ours
reads the reference log-probs that the scoring stage stored, so it runs no reference forward pass;
TRL computes them on every step (its default). Needs TRL: `pip install -e .[bench]` (or --no-trl).
The LoRA row trains a rank --lora-rank adapter on every attention and MLP projection, the rest frozen.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from common import machine, model_path, text_pairs


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(pairs, path: str, batch: int, lora_rank: int = 0) -> tuple[float, float]:
    from apo_dist.config import LoraSettings
    from apo_dist.models import load_model, load_tokenizer
    from apo_dist.scoring import sequence_logprobs
    from apo_dist.training import train_dpo

    tok = load_tokenizer(path)
    prompts = [p for p, _, _ in pairs]
    ref = load_model(path)
    ref_a = sequence_logprobs(ref, prompts, [a for _, a, _ in pairs], tok.pad_token_id, progress=False)["logp"]
    ref_b = sequence_logprobs(ref, prompts, [b for _, _, b in pairs], tok.pad_token_id, progress=False)["logp"]
    del ref
    table = pd.DataFrame({"prompt_ids": prompts, "tokens_a": [a for _, a, _ in pairs],
                          "tokens_b": [b for _, _, b in pairs], "ref_logp_a": ref_a.values,
                          "ref_logp_b": ref_b.values, "label": 1.0})
    tcfg = SimpleNamespace(beta=0.1, lr=1e-5, epochs=1, batch_size=batch, micro_batch_size=batch, mixed_precision="no",
                           gradient_checkpointing=False, max_grad_norm=1e9, weight_decay=0.0, checkpoint_every_steps=0,
                           lora=LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank, target_modules=ALL_PROJECTIONS))
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        result = train_dpo(table, path, Path(tmp) / "policy", tcfg, seed=0, progress=False,
                           on_step=lambda step: stamps.append(time.perf_counter()))
    return batch / statistics.median(b - a for a, b in zip(stamps, stamps[1:])), result.history[0]["loss"]


def trl(pairs, path: str, batch: int) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_list([{"prompt": tok.decode(p), "chosen": tok.decode(a), "rejected": tok.decode(b)}
                              for p, a, b in pairs])
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                         num_train_epochs=1, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                         beta=0.1, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         max_grad_norm=1e9, seed=0, dataloader_num_workers=0)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args=args,
                             train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
        first_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return batch / statistics.median(b - a for a, b in zip(stamps, stamps[1:])), first_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (when it is not installed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = model_path()
    from transformers import AutoTokenizer

    pairs = text_pairs(AutoTokenizer.from_pretrained(path), args.pairs)
    ours_rate, ours_loss = ours(pairs, path, args.batch)
    lora_rate, lora_loss = ours(pairs, path, args.batch, args.lora_rank)
    trl_rate, trl_loss = (None, None) if args.no_trl else trl(pairs, path, args.batch)
    print(f"machine: {machine()}")
    print(f"workload: SmolLM2-135M-Instruct fp32, {args.pairs} pairs, batch {args.batch}, prompt 12 + completion 16 tokens")
    print("| trainer | pairs/s | first-step loss |")
    print("|---|---:|---:|")
    if trl_rate is not None:
        print(f"| TRL DPOTrainer (reference model in memory) | {trl_rate:.2f} | {trl_loss:.4f} |")
    print(f"| apo-dist train_dpo (stored reference log-probs) | {ours_rate:.2f} | {ours_loss:.4f} |")
    print(f"| apo-dist train_dpo, LoRA rank {args.lora_rank} on all projections | {lora_rate:.2f} | {lora_loss:.4f} |")
    if trl_rate is not None:
        print(f"summary: ours={ours_rate:.2f} pairs/s trl={trl_rate:.2f} pairs/s ratio={ours_rate / trl_rate:.2f}")
    print(f"summary: lora={lora_rate:.2f} pairs/s full={ours_rate:.2f} pairs/s ratio={lora_rate / ours_rate:.2f}")


if __name__ == "__main__":
    main()
