"""The reference generation backend: batched `transformers` generate (always available)."""
from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .base import SamplingParams, completion_row


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
