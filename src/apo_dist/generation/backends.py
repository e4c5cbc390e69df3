"""Choosing and making the generation backend a config names (the implementations stay apart)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import Backend
from .hf import HFBackend


def choose_backend(gen) -> tuple[str, str]:
    """(backend, why): `gen.backend` (gen: the `generation` section), with `auto` resolved to vllm
    where it can run, else hf."""
    name = gen.backend
    if name != "auto":
        return str(name), "set in the config"
    from .vllm_engine import vllm_support

    usable, why = vllm_support()
    return ("vllm", f"auto: {why}") if usable else ("hf", f"auto: {why}; using transformers generate")


def make_backend(gen, dtype: str, load: Callable[[str], object], tokenizer, workdir: str | Path,
                 progress: bool = True, lora_rank: int = 0) -> Backend:
    """The generation backend named by `gen.backend` (gen: the `generation` section).

    `dtype` is model.dtype (the vLLM engines' dtype where generation.vllm.dtype is null);
    `load(path)` returns an HF model (generation for hf; the weight probe for the vLLM backends);
    `workdir` (the run directory) holds vLLM caches and server logs; `lora_rank` is training.lora.rank
    (> 0: vLLM engines and local servers start able to serve the policy's LoRA adapters).
    """
    name, _ = choose_backend(gen)
    if name == "hf":
        return HFBackend(load, tokenizer, gen.batch_size, progress)
    if name == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(gen.vllm, dtype, load, tokenizer, Path(workdir), progress, lora_rank)
    if name == "vllm_server":
        from .vllm_servers import ServerPool

        return ServerPool.from_config(gen, dtype, load, tokenizer, Path(workdir), progress, lora_rank)
    raise ValueError(f"unknown generation backend {name!r}")
