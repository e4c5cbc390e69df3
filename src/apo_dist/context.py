"""What every stage body works with: the config, the run directory, the tokenizer, and what a
process loads once and reuses across stages (the current model, the generation backend, the label
store). A stage body is a function of (RunContext, round); the engine (engine.py) decides when it
runs and writes what it returns.
"""
from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from accelerate import PartialState

from . import devices
from .assets import cache_dir, resolve_model_path
from .distributed import deepspeed_enabled, sharding_report, zero3_inference_model, zero_stage
from .errors import BudgetExhausted, Preempted
from .generation.backends import make_backend
from .generation.base import SamplingParams
from .models import adapter_base, is_adapter, load_model, load_tokenizer, training_forward
from .oracles.store import LabelStore, open_store
from .rundir import RunDir
from .scoring import sequence_logprobs


def stage_seed(seed: int, round_: int, stage: str) -> int:
    """The seed of one stage of one round: runs with the same seed draw the same samples."""
    return zlib.crc32(f"{seed}/{round_}/{stage}".encode())


class RunContext:
    def __init__(self, cfg, run_dir: str | Path, progress: bool = True, worker: bool = False):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.progress = progress
        self.worker = worker  # one rank of a stage under `accelerate launch` (cluster/worker.py)
        if cfg.loop.num_threads:
            torch.set_num_threads(cfg.loop.num_threads)
        cache = cache_dir(cfg.assets_dir)
        self.reference_path = resolve_model_path(cfg.model.reference or cfg.model.policy, cache)
        self.sft_path = resolve_model_path(cfg.model.policy, cache)
        self.tokenizer = load_tokenizer(self.sft_path)
        self._model: tuple[str, object] | None = None
        self._backend = None
        self._restarts_taken = 0  # the backend's server restarts already in a stage's metrics
        self._store: LabelStore | None = None

    # --- who and where -----------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0 of a launched stage (always true in the coordinator's own process)."""
        return PartialState().is_main_process

    @property
    def run_id(self) -> str:
        """Who paid for an answer in the label store (budgets count this run's answers only)."""
        return str(self.rd.root.resolve())

    def seed(self, round_: int, stage: str) -> int:
        return stage_seed(self.cfg.seed, round_, stage)

    def policy_path(self, r: int) -> str:
        """The policy that round r samples and scores with: the SFT model, then each round's result."""
        return self.sft_path if r == 0 else str(self.rd.path("policy", r - 1))

    def check_stop(self, where: str) -> None:
        """Raise Preempted when a stop was requested (SIGUSR1): call it at safe points only."""
        if self.rd.stop_path.exists():
            raise Preempted(f"{self.rd.stop_path.read_text() or 'stop requested'}; stopped {where}")

    # --- what a process holds ----------------------------------------------------------------
    @property
    def store(self) -> LabelStore:
        if self._store is None:
            self._store = open_store(self.cfg.oracle.store or self.rd.labels_db)
        return self._store

    def ask(self, oracle, prompts: list[str], a: list[str], b: list[str], batch_size: int, desc: str,
            on_batch=None) -> tuple[list[float], int]:
        """The oracle's answers through the label store, paid by this run, within its cost budget.
        A pair of identical completions is a tie (0.5) without a call: no oracle can prefer one."""
        differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        answers, new = self.store.label(oracle, [prompts[i] for i in differ], [a[i] for i in differ],
                                        [b[i] for i in differ], batch_size=batch_size, progress=self.progress,
                                        desc=desc, on_batch=on_batch, run=self.run_id,
                                        allow=lambda n: self.affordable(oracle.identity, n))
        labels = [0.5] * len(a)
        for i, answer in zip(differ, answers):
            labels[i] = answer
        return labels, new

    def affordable(self, identity: str, n: int) -> int:
        """How many of the next n calls to oracle `identity` oracle.max_cost still pays for, at the
        mean cost of this run's answers from it so far (1 before its first); BudgetExhausted when not
        one. Only the calls of the batch in flight can pass the budget (if they cost more than the mean)."""
        limit = self.cfg.oracle.max_cost
        if not limit:
            return n
        spent = self.store.totals(run=self.run_id)["cost"]
        mine = self.store.totals(run=self.run_id, oracle=identity)
        if not mine["answers"]:  # learn the price first
            can, price = int(spent < limit), "of unknown price"
        else:
            per_answer = mine["cost"] / mine["answers"]
            can = n if per_answer == 0 else min(n, int((limit - spent) / per_answer))
            price = f"at about ${per_answer:.4f} each"
        if can < 1:
            raise BudgetExhausted(f"cost budget reached: ${spent:.4f} spent on oracle answers, the next "
                                  f"{price} would pass oracle.max_cost={limit}")
        return can

    def model(self, path: str, dtype: str | None = None):
        """The model at `path` in `dtype` (default model.dtype), loaded once per stage sequence (one
        model held at a time) on this process's device (devices.process_device), which is noted for
        the stage's metrics. Under a multi-process ZeRO-3 launch it is partitioned across ranks. A
        LoRA policy (adapter folder) is a peft model on its base model (models.load_model)."""
        key = (path, dtype or self.cfg.model.dtype)
        if self._model is None or self._model[0] != key:
            self._model = None
            state = PartialState()
            if state.num_processes > 1 and zero_stage() == 3:
                model = zero3_inference_model(path, key[1], state.num_processes)
            else:
                model = load_model(path, key[1])
            if self.worker:
                self.log_sharding(path, sharding_report(model))
            self._model = (key, model)
        return devices.note(self._model[1])

    @contextmanager
    def scoring_model(self, path: str, dtype: str):
        """The model at `path` in `dtype` for a forward pass. When the model held is a LoRA policy
        trained on `path` (the SFT model: the reference), that policy with its adapter disabled,
        which computes what `path`'s own weights do, without loading a second model."""
        if self._holds_adapter_on(path, dtype):
            policy = self._model[1]
            with policy.disable_adapter():
                yield devices.note(policy)
        else:
            yield self.model(path, dtype)

    def _holds_adapter_on(self, path: str, dtype: str) -> bool:
        """Whether the model held is, in `dtype`, an adapter whose base model is `path`."""
        if self._model is None:
            return False
        held_path, held_dtype = self._model[0]
        return (held_dtype == dtype and is_adapter(held_path)
                and Path(adapter_base(held_path)).resolve() == Path(path).resolve())

    def release_model(self) -> None:
        """Free the held model (before training, which loads its own)."""
        self._model = None

    def log_sharding(self, path: str, report: dict) -> None:
        """Per rank: how much of each model it holds (logs/sharding_rank_K.jsonl)."""
        state = PartialState()
        logs = self.rd.root / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"sharding_rank_{state.process_index}.jsonl", "a") as f:
            f.write(json.dumps({"model": path, "world": state.num_processes, **report}) + "\n")

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    # --- the two things stages do with a model -------------------------------------------------
    def sampling(self, n: int, temperature: float, seed: int, truncate: bool = True) -> SamplingParams:
        """Sampling parameters from the generation section. `truncate=False` samples from the model's
        own distribution (no top-p/top-k), as the entropy estimate needs."""
        gen = self.cfg.generation
        top = {"top_p": gen.top_p, "top_k": gen.top_k} if truncate else {}
        return SamplingParams(n=n, temperature=temperature, max_new_tokens=gen.max_new_tokens,
                              fixed_length=gen.fixed_length, seed=seed, **top)

    def generate(self, model_path: str, prompts: pd.DataFrame, params: SamplingParams) -> pd.DataFrame:
        """Completions for every row of `prompts` (prompt_id, prompt, prompt_ids), one row each."""
        if self._backend is None:
            self._backend = make_backend(self.cfg.generation, self.cfg.model.dtype, self.model, self.tokenizer,
                                         self.rd.root, progress=self.progress, lora_rank=self.cfg.training.lora.rank)
        out = self._backend.generate(model_path, [list(p) for p in prompts["prompt_ids"]], params)
        meta = prompts.iloc[out["prompt_index"].values].reset_index(drop=True)
        return pd.concat([meta[["prompt_id", "prompt", "prompt_ids"]], out.drop(columns="prompt_index")], axis=1)

    def server_restarts(self) -> dict:
        """For a generating stage's metrics: {"server_restarts": N}, the vLLM servers the pool restarted
        since the last call (the vllm_server backend; {} for the others)."""
        total = getattr(self._backend, "restarts", None)
        if total is None:
            return {}
        n, self._restarts_taken = total - self._restarts_taken, total
        return {"server_restarts": n}

    def logprobs(self, model_path: str, samples: pd.DataFrame, with_entropy: bool = False,
                 desc: str = "score", shard_dir: Path | None = None, feature_dim: int = 0,
                 feature_seed: int = 0) -> pd.DataFrame:
        """Teacher-forced log-probs of each row's completion (token_ids) given its prompt (prompt_ids),
        computed in the trainer's precision (models.training_forward), whatever model.dtype is; with
        feature_dim > 0 also its features (scoring.sequence_logprobs). The SFT model's, while a LoRA
        policy on it is held, come from that policy with its adapter disabled (`scoring_model`)."""
        weights, autocast = training_forward(self.cfg.training.mixed_precision, deepspeed_enabled())
        with self.scoring_model(model_path, weights) as model:
            device = next(model.parameters()).device
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                return sequence_logprobs(model, [list(p) for p in samples["prompt_ids"]],
                                         [list(t) for t in samples["token_ids"]], self.tokenizer.pad_token_id,
                                         self.cfg.scoring.batch_size, with_entropy, desc, self.progress,
                                         shard_dir, feature_dim, feature_seed)
