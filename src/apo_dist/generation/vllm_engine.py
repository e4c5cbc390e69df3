"""vLLM generation in this process (the offline engine), and what vLLM backends share.

Shared by the offline engine and the server pool (`vllm_servers`): the environment vLLM needs
(`vllm_env`), whether vLLM can run here (`vllm_support`), per-prompt seeds, what an engine must hold
to serve a policy folder (`Policy`), and the weight probe: after every weight or adapter load the
engine's log-prob of a fixed text must match the HF scorer on the same checkpoint, so that stale
weights never generate silently.

A LoRA policy (training.lora: an adapter folder on the SFT model) is served without touching the
base weights: engines started with LoRA enabled (`lora_engine_args`) keep the SFT model and load
each round's adapter (vLLM's LoRARequest; /v1/load_lora_adapter on servers), a few megabytes where
a full reload reads the whole checkpoint (benchmarks/weight_sync.py times both).

vLLM returns log-probs in `raw_logprobs` mode: log-softmax of the model's logits before
temperature, top-p or top-k, i.e. what the HF scorer computes by teacher forcing.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .base import SamplingParams, completion_row
from ..models import ADAPTER_CONFIG, adapter_base, completion_logprobs, is_adapter
from ..rundir import sha256_file
from .vllm_worker import EXTENSION, RELOAD_METHOD

log = logging.getLogger("apo_dist.vllm")

PROBE_TEXT = "The film was not bad at all: the cast was wonderful and the ending made me smile."
# Default probe tolerance (mean per-token |log p| gap, nats) by engine dtype.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's weights file in an adapter folder
# The values vLLM accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class StaleWeightsError(RuntimeError):
    """An engine's probe log-prob does not match the checkpoint it should be serving."""


def vllm_lora_rank(rank: int) -> int:
    """vLLM's max_lora_rank for adapters of rank `rank` (training.lora.rank): the smallest value it
    accepts that fits; 0 for 0 (LoRA off)."""
    if rank <= 0:
        return 0
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank, {VLLM_LORA_RANKS[-1]}")
    return fits[0]


def lora_engine_args(rank: int) -> dict:
    """vLLM engine arguments that let it serve adapters of rank `rank` (none for 0: LoRA off)."""
    return {"enable_lora": True, "max_lora_rank": vllm_lora_rank(rank)} if rank > 0 else {}


def adapter_rank(path: str | Path) -> int:
    """The rank of the adapter at `path` (its adapter_config.json "r")."""
    return int(json.loads((Path(path) / ADAPTER_CONFIG).read_text())["r"])


def adapter_name(path: str | Path) -> str:
    """vLLM's name for the adapter at `path`, from a digest of its config and weights. vLLM caches
    adapters and their prefix KV by name, so new files at the same path (a redone round) must get a
    new name, and the same files the same one."""
    digests = "".join(sha256_file(Path(path) / f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    return f"apo-lora-{hashlib.sha256(digests.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Policy:
    """What an engine holds to serve the policy folder `path`: full weights (`weights`), and for a LoRA
    policy its adapter on them (`adapter`, vLLM's name for it; None for full weights)."""

    path: str
    weights: str
    adapter: str | None = None

    @classmethod
    def of(cls, path: str | Path) -> "Policy":
        """The policy folder `path` (an adapter folder's weights are its base model's, the SFT model);
        `weights` is a real path, so that two spellings of one folder are not two checkpoints."""
        path = str(path)
        if is_adapter(path):
            return cls(path, os.path.realpath(adapter_base(path)), adapter_name(path))
        return cls(path, os.path.realpath(path))


def vllm_support() -> tuple[bool, str]:
    """(usable, why): vLLM imports and knows this platform."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"vllm does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if current_platform.is_unspecified():
        return False, f"vllm {vllm.__version__} imports but supports no device on this machine"
    return True, f"vllm {vllm.__version__} on {current_platform.device_type}"


def cpu_ranges(k: int) -> list[str]:
    """Split the CPUs this process may use into k contiguous ranges (shared when there are fewer)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < k:
        return [f"{cpus[0]}-{cpus[-1]}"] * k
    size = len(cpus) // k
    return [f"{cpus[i * size]}-{cpus[(i + 1) * size - 1]}" for i in range(k)]


def gpu_groups(k: int, per_server: int, device_count: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of k servers of `per_server` GPUs: disjoint groups of the GPUs
    this process sees (its CUDA_VISIBLE_DEVICES, else 0..device_count-1); None for every server when
    there are no GPUs or too few to give each its own."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g] if visible is not None else [str(i) for i in range(device_count)]
    if not gpus or len(gpus) < k * per_server:
        if gpus:
            log.warning("%d vLLM servers x %d GPUs need %d GPUs but %d are visible: they share them",
                        k, per_server, k * per_server, len(gpus))
        return [None] * k
    return [",".join(gpus[i * per_server: (i + 1) * per_server]) for i in range(k)]


def vllm_env(cache_dir: Path, kv_cache_gb: int, cpus: str) -> dict[str, str]:
    """Environment for a vLLM engine (the CPU build needs the KV-cache size and thread binding); CPU-only keys are ignored on GPUs."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    rpc = Path(tempfile.gettempdir()) / f"apo-dist-rpc-{os.getuid()}"  # short: ipc paths max ~107 chars
    rpc.mkdir(exist_ok=True)
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "VLLM_RPC_BASE_PATH": str(rpc),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def request_seed(seed: int, prompt_index: int) -> int:
    """Seed of one prompt's request; vLLM gives its n samples seed + 0..n-1."""
    return zlib.crc32(f"{seed}/{prompt_index}".encode())


def engine_dtype(vllm, dtype: str | None = None) -> str:
    """The engine's dtype: `generation.vllm.dtype`, or when that is null (or empty) `dtype` (model.dtype)."""
    chosen = vllm.dtype or dtype
    if not chosen:
        raise ValueError("no vLLM dtype: generation.vllm.dtype is null and no model dtype was given")
    return str(chosen)


def eager(vllm) -> bool:
    """`generation.vllm.enforce_eager`, or when null: eager on CPUs, CUDA graphs on GPUs (they speed up
    small-batch decoding several-fold; vLLM's CPU build does not use them)."""
    import torch

    return (not torch.cuda.is_available()) if vllm.enforce_eager is None else bool(vllm.enforce_eager)


def probe_tolerance(vllm, dtype: str | None = None) -> float:
    """`generation.vllm.probe_tolerance`, or when null the default of the engine's dtype."""
    tol = vllm.probe_tolerance
    return PROBE_TOLERANCE[engine_dtype(vllm, dtype)] if tol is None else tol


class Probe:
    """A fixed text whose mean per-token log-prob identifies the weights an engine serves."""

    def __init__(self, tokenizer, load: Callable[[str], object], tolerance: float):
        self.ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:32]
        self.pad_id = tokenizer.pad_token_id
        self.load = load
        self.tolerance = tolerance

    def expected(self, model_path: str) -> float:
        """Mean log p(token | prefix) over the probe's tokens 1.. under the HF scorer."""
        import torch

        with torch.no_grad():
            logp, n, _ = completion_logprobs(self.load(model_path), [self.ids[:1]], [self.ids[1:]], self.pad_id)
        return float(logp[0]) / int(n[0])

    def check(self, where: str, model_path: str, token_logprobs: list[float]) -> None:
        """Raise StaleWeightsError unless `token_logprobs` (of probe tokens 1..) match `model_path`."""
        served = sum(token_logprobs) / len(token_logprobs)
        want = self.expected(model_path)
        if abs(served - want) > self.tolerance:
            raise StaleWeightsError(
                f"{where} does not serve the weights of {model_path}: probe mean log-prob {served:.5f}, "
                f"HF scorer on that checkpoint {want:.5f} (tolerance {self.tolerance}). Generating now "
                f"would sample from stale weights; the weight reload failed or went to another model.")
        log.info("%s serves %s (probe %.5f vs %.5f)", where, model_path, served, want)


class VLLMBackend:
    """The vLLM offline engine in this process. When the policy changes, its full weights are swapped
    in place if they differ and its adapter (LoRA runs) is loaded; the probe then checks the result.

    `vllm`: the `generation.vllm` section (a VLLMConfig or its DictConfig node); `dtype`: model.dtype,
    the engine's dtype where generation.vllm.dtype is null; `lora_rank`: training.lora.rank (> 0: the
    engine starts able to serve adapters of that rank).
    """

    def __init__(self, vllm, dtype: str | None, load: Callable[[str], object], tokenizer, workdir: Path,
                 progress: bool = True, lora_rank: int = 0):
        self.vllm = vllm
        self.dtype = engine_dtype(vllm, dtype)
        self.tokenizer = tokenizer
        self.probe = Probe(tokenizer, load, probe_tolerance(vllm, dtype))
        self.workdir = Path(workdir)
        self.progress = progress
        self.lora_args = lora_engine_args(lora_rank)
        self.llm = None
        self.weights: str | None = None  # the full weights in the engine
        self.lora = None  # the LoRARequest every request carries; None: the full weights alone
        self.policy: Policy | None = None  # what the engine serves, once probed
        self._lora_ids = itertools.count(1)  # vLLM caches adapters by id: a new one for every load

    def _start(self, weights: str) -> None:
        from vllm import LLM

        v = self.vllm
        for key, value in vllm_env(self.workdir / "vllm_cache", v.kv_cache_gb, cpu_ranges(1)[0]).items():
            os.environ.setdefault(key, value)
        self.llm = LLM(model=weights, dtype=self.dtype, tensor_parallel_size=v.tensor_parallel_size,
                       max_model_len=v.max_model_len or None, enforce_eager=eager(v),
                       gpu_memory_utilization=v.gpu_memory_utilization, seed=v.seed,
                       **({"max_num_seqs": v.max_num_seqs} if v.max_num_seqs else {}),
                       **({} if v.prefix_caching else {"enable_prefix_caching": False}),
                       logprobs_mode="raw_logprobs", worker_extension_cls=EXTENSION, **self.lora_args)
        self.weights = weights

    def _load(self, policy: Policy) -> None:
        """Bring the engine to `policy` and probe; restart it on `policy`'s weights if that fails."""
        self.policy = None
        if self.llm is None:
            self._start(policy.weights)
            self.sync(policy)
            self.check(policy.path)
        else:
            try:
                self.sync(policy)
                self.check(policy.path)
            except Exception as e:  # noqa: BLE001 - any failure: restart on the new weights
                log.warning("weight reload failed (%s); restarting the engine on %s", e, policy.weights)
                self.close()
                self._start(policy.weights)
                self.sync(policy)
                self.check(policy.path)
        self.policy = policy

    def sync(self, policy: Policy) -> None:
        """Make the engine hold `policy` (unprobed): its full weights swapped in place where they differ,
        then its adapter (none for full weights) in `self.lora`, which every request carries. The engine
        keeps one adapter (max_cpu_loras = max_loras = 1): loading this round's evicts the last one's."""
        from vllm.lora.request import LoRARequest

        if policy.weights != self.weights:
            self.weights = None
            self.llm.collective_rpc(RELOAD_METHOD, kwargs={"weights_path": policy.weights})
            self.llm.reset_prefix_cache()  # cached KV came from the old weights
            self.weights = policy.weights
        self.lora = None
        if policy.adapter:
            lora = LoRARequest(policy.adapter, next(self._lora_ids), policy.path)
            self.llm.llm_engine.add_lora(lora)
            self.lora = lora

    def check(self, model_path: str) -> None:
        """Probe the engine (with its adapter, if any) against the HF scorer on `model_path`."""
        from vllm import SamplingParams as VSP

        out = self.llm.generate([{"prompt_token_ids": self.probe.ids}], VSP(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False, lora_request=self.lora)[0]
        served = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], self.probe.ids[1:])]
        self.probe.check("the vLLM offline engine", model_path, served)

    def generate(self, model_path: str, prompt_ids: list[list[int]], params: SamplingParams) -> pd.DataFrame:
        from vllm import SamplingParams as VSP

        policy = Policy.of(model_path)
        if policy != self.policy:
            self._load(policy)
        requests = [VSP(**vllm_sampling(params), seed=request_seed(params.seed, i)) for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids], requests,
                                 use_tqdm=self.progress, lora_request=self.lora)
        rows = []
        for i, out in enumerate(outs):
            for k, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                logps = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
                rows.append(completion_row(self.tokenizer, i, k, list(c.token_ids), logps, c.finish_reason))
        return pd.DataFrame(rows)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.weights = self.lora = self.policy = None


def vllm_sampling(params: SamplingParams) -> dict:
    """vLLM sampling fields for `params` (the same for the engine and the completions API)."""
    return {"n": params.n, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_new_tokens, "logprobs": 0,
            # like HF's min_new_tokens: EOS is masked (never sampled), not merely ignored
            "min_tokens": params.max_new_tokens if params.fixed_length else 0}
