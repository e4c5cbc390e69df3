"""Candidate generation behind one small backend interface.

A backend samples `n` completions for each prompt (token ids) from the model saved at `model_path`
and returns a table with one row per completion. The coordinator creates one backend per run and
passes the current policy's path on every call: a backend that keeps weights loaded (an engine, a
pool of servers) swaps them when the path changes. Columns:

    prompt_index   position of the prompt in the input list
    sample         0..n-1
    token_ids      completion token ids (cut after the first EOS, EOS included)
    token_logprobs log pi(token | prefix) of each sampled token under the model (temperature 1,
                   no truncation: the model's own distribution, as scoring computes it)
    completion     decoded text
    finish_reason  "length" or "stop"
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 20
    fixed_length: bool = False  # never stop at EOS
    seed: int = 0


class Backend(Protocol):
    def generate(self, model_path: str, prompt_ids: list[list[int]], params: SamplingParams) -> pd.DataFrame: ...

    def close(self) -> None: ...


def completion_row(tokenizer, prompt_index: int, sample: int, token_ids: list[int], token_logprobs: list[float],
                   finish_reason: str) -> dict:
    """One row of the table every backend returns (text decoded the same way by all of them)."""
    return {"prompt_index": prompt_index, "sample": sample, "token_ids": token_ids,
            "token_logprobs": token_logprobs,
            "completion": tokenizer.decode(token_ids, skip_special_tokens=True), "finish_reason": finish_reason}


class HFBackend:
    """Reference backend: batched `model.generate` with left padding.

    `load(model_path)` returns the model (the coordinator passes its cache of loaded models).
    """

    def __init__(self, load: Callable[[str], object], tokenizer, batch_size: int = 32, progress: bool = True):
        self.load = load
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress

    @torch.no_grad()
    def generate(self, model_path: str, prompt_ids: list[list[int]], params: SamplingParams) -> pd.DataFrame:
        model = self.load(model_path).eval()
        torch.manual_seed(params.seed)
        rows = []
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        device = next(model.parameters()).device
        starts = range(0, len(prompt_ids), self.batch_size)
        for start in tqdm(starts, desc=f"generate n={params.n}", disable=not self.progress, unit="batch"):
            batch = prompt_ids[start: start + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            sample = params.temperature > 0
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=params.top_k if sample else None,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.max_new_tokens if params.fixed_length else None,
                num_return_sequences=params.n, pad_token_id=pad, eos_token_id=eos,
                output_logits=True, return_dict_in_generate=True,
            )
            new = out.sequences[:, width:]
            logits = torch.stack(out.logits, dim=1).float()  # raw model logits [B*n, T, V]
            logps = F.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for j in range(new.shape[0]):
                tokens = new[j].tolist()
                finish = "length"
                if not params.fixed_length and eos in tokens:
                    tokens = tokens[: tokens.index(eos) + 1]
                    finish = "stop"
                rows.append(completion_row(self.tokenizer, start + j // params.n, j % params.n, tokens,
                                           logps[j, : len(tokens)].tolist(), finish))
        return pd.DataFrame(rows)

    def close(self) -> None:
        pass


def choose_backend(cfg) -> tuple[str, str]:
    """(backend, why): `generation.backend`, with `auto` resolved to vllm where it can run, else hf."""
    name = cfg.generation.backend
    if name != "auto":
        return name, "set in the config"
    from .vllm_engine import vllm_support

    usable, why = vllm_support()
    return ("vllm", f"auto: {why}") if usable else ("hf", f"auto: {why}; using transformers generate")


def make_backend(cfg, load: Callable[[str], object], tokenizer, workdir: str | Path,
                 progress: bool = True) -> Backend:
    """The generation backend named by `generation.backend`.

    `load(path)` returns an HF model (generation for hf; the weight probe for the vLLM backends);
    `workdir` (the run directory) holds vLLM caches and server logs.
    """
    name, _ = choose_backend(cfg)
    if name == "hf":
        return HFBackend(load, tokenizer, cfg.generation.batch_size, progress)
    if name == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(cfg, load, tokenizer, Path(workdir), progress)
    if name == "vllm_server":
        from .vllm_servers import ServerPool

        return ServerPool.from_config(cfg, load, tokenizer, Path(workdir), progress)
    raise ValueError(f"unknown generation backend {name!r}")
