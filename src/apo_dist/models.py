"""Loading models and tokenizers, formatting prompts, and teacher-forced log-probs.

Everything downstream of generation works on token ids (prompt ids + completion ids), so scoring
and training see exactly the tokens that were sampled; text is only for the oracle and humans.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from . import devices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def training_forward(mixed_precision: str, deepspeed: bool = False) -> tuple[str, torch.dtype | None]:
    """(weights dtype, autocast dtype) of the DPO trainer's forward pass, which scoring copies so that
    the stored reference log-probs and the trainer's first step see the same numbers.

    Accelerate keeps fp32 weights and autocasts to bf16 under mixed precision; DeepSpeed casts the
    weights themselves to bf16.
    """
    if mixed_precision != "bf16":
        return "float32", None
    return ("bfloat16", None) if deepspeed else ("float32", torch.bfloat16)


ADAPTER_CONFIG = "adapter_config.json"  # what makes a policy folder a LoRA adapter (peft's layout)


def is_adapter(path: str | Path) -> bool:
    """Whether `path` holds a LoRA adapter (training.lora) rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The full model an adapter folder was trained on (the SFT model)."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_model(path: str, dtype: str = "float32", device: str | torch.device | None = None):
    """The causal LM at `path` in `dtype`, on `device` (default: this process's, devices.process_device).
    An adapter folder gives a peft PeftModel: its base model with the adapter attached (not merged),
    so that `model.disable_adapter()` turns it back into the base model."""
    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=DTYPES[dtype])
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(devices.process_device() if device is None else device)


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, instruction: str = "",
                  use_chat_template: bool = False) -> list[int]:
    """Token ids the model is conditioned on for `prompt`."""
    text = f"{instruction}{prompt}"
    if use_chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        pad_id: int, with_entropy: bool = False):
    """Sum of log p(completion | prompt) over completion tokens only, for one padded batch.

    Returns (logp_sum [B], n_tokens [B], mean_token_entropy [B] or None). Prompt tokens and
    padding never contribute. The forward pass keeps gradients, so training uses it too.
    """
    seqs = [[*p, *c] for p, c in zip(prompt_ids, completion_ids)]
    ids, mask = pad_right(seqs, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:]
    target_mask = torch.zeros_like(targets, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        target_mask[i, len(p) - 1: len(p) - 1 + len(c)] = True
    logps = F.log_softmax(logits, dim=-1)
    token_logp = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp_sum = (token_logp * target_mask).sum(-1)
    n_tokens = target_mask.sum(-1)
    entropy = None
    if with_entropy:
        token_entropy = -(logps.exp() * logps).sum(-1)
        entropy = (token_entropy * target_mask).sum(-1) / n_tokens.clamp(min=1)
    return logp_sum, n_tokens, entropy
