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
from typing import Protocol

import pandas as pd


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
