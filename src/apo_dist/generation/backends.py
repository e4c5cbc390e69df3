"""Choosing and making the generation backend a config names (the implementations stay apart)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import Backend
from .hf import HFBackend


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
