"""Plan a run before starting it: per-round counts, tokens, FLOPs, GPUs, time and judge cost, and
the training state per rank and weight sync of a round (full fine-tuning, and LoRA's adapter).

Pure functions of a resolved config: no model is loaded, no GPU touched, nothing fetched. The
counts are the stages' own (counts.py); tokens, FLOPs and times are estimates under the
assumptions stated in ASSUMPTIONS, which `format_plan` prints with every plan.

    plan(cfg)                 -> dict (rounds, stages of one round, totals)
    format_plan(p)            -> the text `apo-dist run CONFIG --dry-run` prints
    scaling_rows(path, ...)   -> the tables of docs/scaling.md (`python -m apo_dist.plan scaling CONFIG`)
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import counts
from .assets import ASSET_PREFIX
from .config import ConfigError, load_config
from .data import PREFIX_SOURCES, source_rows

# Parameter counts of models the paper setups and the docs use.
KNOWN_PARAMS = {
    "gpt2-large": 774e6,
    "eleutherai/pythia-1.4b": 1.41e9,
    "eleutherai/pythia-2.8b": 2.78e9,
    "eleutherai/pythia-6.9b": 6.86e9,
    "smollm2-135m-instruct": 134.5e6,
    "huggingfacetb/smollm2-135m-instruct": 134.5e6,
}

# Measured on this repo's 2-core CPU VM with SmolLM2-135M (benchmarks/README.md), extrapolated to
# other sizes in proportion to parameters: (work per second, parameters of the measured model).
CPU_RATES = {
    "train_flops": 6 * 134.5e6 * 2.87 * 2 * 28,  # 2.87 pairs/s, 2 sequences of 12 + 16 tokens
    "score_flops": 2 * 134.5e6 * 8.30 * 2 * 30,  # 8.30 pairs/s, 2 sequences of 12 + ~18 tokens
    "hf_tokens": 199.0,  # generated tokens/s, HF generate fp32
    "vllm_tokens": 535.0,  # generated tokens/s, vLLM CPU engine bf16 (also used for vllm_server)
    "params": 134.5e6,
    # operations/s of the feature functions' selection (acquisition_ops): select_pairs at 4,096 and
    # 40,960 candidates (k = 32, one BLAS thread) ran at 0.3-1.9G/s on the same VM under load; the
    # coordinator's CPU does this work on a GPU node too
    "acquisition_ops": 1.0e9,
}

# The H100 model (SXM, 80 GB): a roofline with efficiencies calibrated on one H200 (same dense bf16
# peak) by benchmarks/gpu_throughput.py at a 1.1B shape (benchmarks/README.md, 2026-11-27).
H100 = {
    "peak_flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # dense tensor / fp32
    "hbm_bytes_per_s": 3.35e12,
    "memory_bytes": 80e9,
    "train_mfu": 0.22,  # fraction of peak reached by DPO training (of 6 N T model FLOPs); measured 0.22
    "score_mfu": 0.33,  # fraction of peak reached by scoring forwards (2 N T); measured 0.33
    "decode_bw_eff": 0.60,  # fraction of HBM bandwidth a decode step reaches
    "decode_mfu": 0.40,  # compute cap of a decode step
    "decode_batch": 256,  # sequences decoded together per vLLM replica (memory permitting)
    "step_overhead_s": {"vllm": 0.002, "vllm_server": 0.002, "hf": 0.045},  # per decode step; HF measured 37-70 ms
    "gpus_per_node": 8,
}

# Judge requests: template around the prompt and two candidates (judge.render, ~600 characters),
# output tokens by answer mode, and latency per request. Judge tokens counted as policy tokens.
JUDGE = {"template_tokens": 150, "output_tokens": {"text": 40, "logprob": 1},
         "latency_s": {"text": 3.0, "logprob": 1.0}}

# Weight sync: the trainer writes the round's policy and generation reads it back (a shared filesystem).
SYNC_BYTES_PER_S = 2e9

ASSUMPTIONS = [
    "prompt length: mean of data.prompt_min/max_tokens for imdb/movie_reviews/fortunes prompts, else "
    "data.max_prompt_tokens (an upper bound); completions: generation.max_new_tokens (an upper bound "
    "unless generation.fixed_length)",
    "FLOPs: scoring 2*N*tokens, training 6*N*tokens (x4/3 time for gradient checkpointing's recompute), "
    "generation 2*N*tokens (prompt + completion)",
    f"H100 model: {H100['peak_flops']['bfloat16'] / 1e12:.0f} TFLOP/s bf16 peak, "
    f"{H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM; training at {H100['train_mfu']:.0%} and scoring at "
    f"{H100['score_mfu']:.0%} of peak (measured on an H200 at 1.1B); decode per replica: {H100['decode_batch']} sequences a step, "
    f"step = max(weights + KV reads at {H100['decode_bw_eff']:.0%} of HBM, compute at "
    f"{H100['decode_mfu']:.0%} of peak) + 2 ms (vLLM) / 45 ms (HF generate, measured 37-70 ms); KV cache without GQA, "
    "model shape from N (d_model = (128 N / 12)^(1/3), layers = d_model / 128)",
    "CPU: 2-core throughputs of benchmarks/README.md (SmolLM2-135M) scaled by 135M / N",
    f"judge: {JUDGE['template_tokens']} template tokens + prompt + 2 completions in, "
    f"{JUDGE['output_tokens']['text']} tokens out (text; 1 for logprob), {JUDGE['latency_s']['text']:.0f} s "
    "per request (1 s logprob), oracle.max_concurrency in flight; no re-asks or retries counted",
    "GPUs held: generation GPUs (vLLM engines stay resident) + max(scoring, training) ranks; "
    "model loading, vLLM start-up and weight reloads not counted in the times",
    "training state: per trained parameter its weight and gradient in the trainer's dtype (bf16 under DeepSpeed "
    "with bf16 mixed precision, else fp32) and AdamW's two fp32 moments, plus fp32 master weights when the "
    "weights are bf16 (16 bytes either way); LoRA's frozen base weights in the trainer's dtype; sharded as the "
    "ZeRO stage of launcher.accelerate_config says; activations, buffers and the CUDA context not counted",
    f"weight sync per round: the trainer writes the round's policy (the full weights, or with training.lora "
    f"only the adapter) and generation reads it back, each at {SYNC_BYTES_PER_S / 1e9:.0f} GB/s (a shared "
    "filesystem; not measured), beside the round times, not in them",
    "LoRA: r (in + out) adapter parameters per targeted projection and layer, from the model's config.json (or "
    "a known Llama shape); training FLOPs and times as for full fine-tuning, an upper bound (the frozen "
    "weights need no weight gradients: ~4 N instead of 6 N per token); vLLM's LoRA kernels not modelled",
    "feature functions (epistemic, thompson, diverse, diverse_certainty): the scoring pass also scores the "
    "labels of earlier rounds under the policy (2 sequences each, no reference pass) and stores k float32 "
    "features per completion; selecting is numpy work on the coordinator's CPU (acquisition_ops, "
    f"{CPU_RATES['acquisition_ops'] / 1e9:.1f}G operations/s, the same on a GPU node), with "
    "10 Newton steps for the Laplace fit",
]


def _hf_config(policy: str) -> tuple[str, Path, dict | None]:
    """(name without the asset prefix, its config.json path, the config or None when not a local folder)."""
    name = policy[len(ASSET_PREFIX):] if policy.startswith(ASSET_PREFIX) else policy
    path = Path(name).expanduser() / "config.json"
    return name, path, json.loads(path.read_text()) if path.is_file() else None


def model_params(policy: str) -> tuple[float | None, str]:
    """(parameters, where the number came from) for a model path, asset or hub id; None if unknown."""
    name, path, config = _hf_config(policy)
    if config:
        n = _params_from_hf_config(config)
        if n:
            return n, f"from {path}"
    key = name.lower()
    if key in KNOWN_PARAMS:
        return KNOWN_PARAMS[key], "known size"
    match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", key.rsplit("/", 1)[-1])
    if match:
        return float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6), "from the size in its name"
    return None, "unknown size"


def _params_from_hf_config(c: dict) -> float | None:
    """Decoder parameters from an HF config.json: embeddings + per layer attention and MLP."""
    d = c.get("hidden_size") or c.get("n_embd")
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    vocab = c.get("vocab_size")
    if not (d and layers and vocab):
        return None
    ff = c.get("intermediate_size") or c.get("n_inner") or 4 * d
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    kv = (c.get("num_key_value_heads") or heads) * d // heads
    mlp = 3 * d * ff if "intermediate_size" in c else 2 * d * ff  # gated (llama-style) or plain
    tied = c.get("tie_word_embeddings", True)
    return float(vocab * d * (1 if tied else 2) + layers * (2 * d * d + 2 * d * kv + mlp))


# Shapes (config.json) of the Llama-style models the configs and docs name, for LoRA's adapter count
# where no local config.json is at hand: hidden and intermediate size, layers, heads, kv heads, head size.
KNOWN_SHAPES = {
    "smollm2-135m-instruct": (576, 1536, 30, 9, 3, 64),
    "huggingfacetb/smollm2-135m-instruct": (576, 1536, 30, 9, 3, 64),
    "meta-llama/llama-3.2-1b": (2048, 8192, 16, 32, 8, 64),
    "meta-llama/llama-2-7b-hf": (4096, 11008, 32, 32, 32, 128),
    "meta-llama/llama-2-70b-hf": (8192, 28672, 80, 64, 8, 128),
}
SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim")


def model_shape(policy: str) -> tuple[dict | None, str]:
    """(shape, where it came from) of a Llama-style model: SHAPE_KEYS from its config.json, else
    KNOWN_SHAPES; None when neither has it (or the config has no intermediate_size: not gated)."""
    name, path, c = _hf_config(policy)
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if c and all(c.get(k) for k in needed):
        d, heads = c["hidden_size"], c["num_attention_heads"]
        return dict(zip(SHAPE_KEYS, (d, c["intermediate_size"], c["num_hidden_layers"], heads,
                                     c.get("num_key_value_heads") or heads, c.get("head_dim") or d // heads))), \
            f"from {path}"
    if name.lower() in KNOWN_SHAPES:
        return dict(zip(SHAPE_KEYS, KNOWN_SHAPES[name.lower()])), "of a known model"
    return None, f"no config.json with a Llama-style shape at {path.parent} and not a known model"


def projection_widths(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear projection of a Llama-style layer (peft's module names)."""
    d, ff = shape["hidden"], shape["intermediate"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}


def lora_adapter(cfg) -> dict | None:
    """training.lora's adapter (None when rank is 0: full fine-tuning): per targeted projection of
    every layer, A [r, in] and B [out, r], r (in + out) parameters. `modules` maps each target to its
    parameters over all layers; `params` is their sum, None (with a `note`) when the model's shape
    or a target's name is unknown."""
    lora = cfg.training.lora
    if not lora.rank:
        return None
    out = {"rank": lora.rank, "targets": list(lora.target_modules), "modules": {}, "params": None, "note": ""}
    shape, where = model_shape(cfg.model.policy)
    if shape is None:
        out["note"] = f"adapter size unknown: {where}"
        return out
    widths = projection_widths(shape)
    unknown = [m for m in lora.target_modules if m not in widths]
    if unknown:
        out["note"] = (f"adapter size unknown: training.lora.target_modules {', '.join(unknown)} not among the "
                       f"projections the plan counts ({', '.join(widths)})")
        return out
    out["modules"] = {m: lora.rank * sum(widths[m]) * shape["layers"] for m in lora.target_modules}
    out["params"] = float(sum(out["modules"].values()))
    out["note"] = f"shape {where}"
    return out


# ZeRO stage -> the parts of the training state sharded over the training ranks
ZERO_SHARDED = {None: (), 0: (), 1: ("optimizer",), 2: ("optimizer", "grads"), 3: ("optimizer", "grads", "weights")}


def zero_stage(accelerate_config: str) -> int | None:
    """The DeepSpeed ZeRO stage of an accelerate config file (None: not DeepSpeed, or no config):
    deepspeed_config.zero_stage, or zero_optimization.stage of its deepspeed_config_file."""
    if not accelerate_config or not Path(accelerate_config).expanduser().is_file():
        return None
    acc = OmegaConf.to_container(OmegaConf.load(Path(accelerate_config).expanduser()))
    if acc.get("distributed_type") != "DEEPSPEED":
        return None
    ds = acc.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file"):
        file = Path(ds["deepspeed_config_file"]).expanduser()
        return json.loads(file.read_text()).get("zero_optimization", {}).get("stage", 0) if file.is_file() else 0
    return int(ds.get("zero_stage", 0))


def state_bytes(frozen: float, trainable: float, width: int) -> dict:
    """Training state by part: weights (frozen and trainable, `width` bytes each), gradients of the
    trainable ones, and AdamW's optimizer state: two fp32 moments, plus fp32 master weights when the
    weights themselves are 16-bit (DeepSpeed bf16). Activations and buffers are not counted."""
    return {"weights": (frozen + trainable) * width, "grads": trainable * width,
            "optimizer": trainable * (8 + (4 if width < 4 else 0))}


def weight_figures(cfg, params: float | None, zero: int | None) -> dict:
    """One round's training state per rank and weight sync, for full fine-tuning and (training.lora.rank
    > 0) for the LoRA adapter: base weights frozen, only the adapter trained, saved and synced.

    Weights in the trainer's dtype (models.training_forward: bf16 under DeepSpeed with bf16 mixed
    precision, else fp32); `zero`: the ZeRO stage (zero_stage; None without DeepSpeed).
    Each of "full" and "lora": trainable params, optimizer bytes, bytes per training rank, bytes
    synced per round and their seconds (SYNC_BYTES_PER_S, written once and read back); None when
    the sizes are unknown."""
    width = 2 if cfg.training.mixed_precision == "bf16" and zero is not None else 4
    ranks = cfg.launcher.training_processes

    def figures(frozen: float, trainable: float) -> dict:
        state = state_bytes(frozen, trainable, width)
        per_rank = sum(v / ranks if part in ZERO_SHARDED[zero] else v for part, v in state.items())
        sync = trainable * width
        return {"trainable": trainable, "optimizer_bytes": state["optimizer"], "rank_bytes": per_rank,
                "sync_bytes": sync, "sync_s": 2 * sync / SYNC_BYTES_PER_S}

    adapter = lora_adapter(cfg)
    counted = adapter is not None and adapter["params"] is not None and params is not None
    lora = figures(params, adapter["params"]) if counted else None
    return {"zero": zero, "ranks": ranks, "width": width, "full": None if params is None else figures(0.0, params),
            "adapter": adapter, "lora": lora}


def lengths(cfg) -> dict:
    """Estimated tokens per prompt and per completion (see ASSUMPTIONS)."""
    d, g = cfg.data, cfg.generation
    if d.source in PREFIX_SOURCES:
        prompt = (d.prompt_min_tokens + d.prompt_max_tokens) / 2
    else:
        prompt = float(d.max_prompt_tokens)
    return {"prompt": prompt + _instruction_tokens(cfg), "completion": float(g.max_new_tokens)}


def _instruction_tokens(cfg) -> float:
    return len(cfg.data.instruction) / 4  # ~4 characters a token


def round_counts(cfg, r: int) -> dict:
    """What round r does: counts.round_counts (what the stages do) plus the requests and steps they imply."""
    c = counts.round_counts(cfg, r)
    scored_entropy = c.entropy_samples if not (cfg.scoring.entropy_from_generation and
                                               cfg.scoring.entropy_estimator == "mc") else 0
    same_ref = r == 0 and cfg.model.reference in ("", cfg.model.policy)  # the policy of round 0 is the reference
    asks = 2 if cfg.oracle.both_orders else 1
    eval_oracle = cfg.eval.oracle or cfg.oracle
    k = cfg.acquisition.feature_dim if counts.uses_features(cfg) else 0
    return {
        "round": r, "pool_prompts": c.pool_prompts, "entropy_samples": c.entropy_samples,
        "entropy_scored": scored_entropy, "pair_prompts": c.pair_prompts, "candidate_pairs": c.pair_prompts,
        "pair_completions": 2 * c.pair_prompts, "history_pairs": c.history_pairs,
        "policy_scored": 2 * (c.pair_prompts + c.history_pairs),
        "reference_scored": 0 if same_ref else 2 * c.pair_prompts, "labels": c.labels,
        "feature_bytes": 4 * k * 2 * (c.pair_prompts + c.history_pairs),  # scores + history tables
        "acquisition_ops": acquisition_ops(cfg, c),
        "label_requests": c.labels * asks, "train_pairs": c.train_pairs, "pair_epochs": c.train_pairs * cfg.training.epochs,
        "train_steps": math.ceil(c.train_pairs / cfg.training.batch_size) * cfg.training.epochs,
        "eval_completions": cfg.data.n_eval * cfg.eval.samples_per_prompt,
        "eval_requests": cfg.data.n_eval * cfg.eval.samples_per_prompt * (2 if eval_oracle.both_orders else 1),
        "kl_samples": cfg.data.n_eval * cfg.eval.kl_samples,  # policy samples at T = 1, scored by policy and SFT
    }


NEWTON_STEPS = 10  # Laplace fit: Newton steps assumed (each step also evaluates the objective)


def acquisition_ops(cfg, c: counts.RoundCounts) -> float:
    """Numpy operations of one round's choice of pairs by a feature function (0 for the paper's
    functions, whose sort is negligible). n candidates, h labelled pairs, k features, M picks:
    the posterior (10 Newton steps of h (2 k^2 + 60)) or the design matrix (once), z^T cov z of every
    candidate (2 n k^2), then epistemic: n x 64 quadrature nodes; thompson: M draws over n (2 k + 30: the
    sampled logit and its sigmoid); diverse: M greedy picks over n (2 k + 10: Sherman-Morrison);
    diverse_certainty: M picks over its f_d M designed pairs."""
    a = cfg.acquisition
    if not counts.uses_features(cfg):
        return 0.0
    n, h, k, m = c.pair_prompts, c.history_pairs, a.feature_dim, c.labels
    if a.function == "diverse_certainty":
        n = min(n, a.diversity_factor * m)
    fit = (NEWTON_STEPS if a.function in ("epistemic", "thompson") else 1) * h * (2 * k * k + 60)
    select = {"epistemic": n * 64 * 60, "thompson": m * n * (2 * k + 30)}.get(a.function, m * n * (2 * k + 10))
    return float(fit + 2 * n * k * k + select)


def stage_gpus(cfg) -> dict:
    """GPUs each stage uses under this config (generation: engines x tensor parallel size)."""
    g = cfg.generation
    tp = g.vllm.tensor_parallel_size
    slurm_servers = (OmegaConf.select(cfg, "slurm.generation_nodes", default=0)
                     * OmegaConf.select(cfg, "slurm.servers_per_node", default=1))
    engines = {"hf": 1, "vllm": tp, "auto": tp,
               "vllm_server": (len(g.servers.urls) or g.servers.num_local or slurm_servers) * tp}[g.backend]
    return {"generation": engines, "scoring": cfg.launcher.scoring_processes,
            "training": cfg.launcher.training_processes,
            "held": (engines if g.backend != "hf" else 0) + max(cfg.launcher.scoring_processes,
                                                                cfg.launcher.training_processes,
                                                                1 if g.backend == "hf" else 0)}


def decode_tokens_per_s(params: float, dtype: str, backend: str, tp: int, context: float,
                        batch: int | None = None) -> float:
    """Generated tokens/s of one generation replica on `tp` H100s (the roofline in ASSUMPTIONS)."""
    width = 4 if dtype == "float32" else 2
    weights = params * width
    d = (128 * params / 12) ** (1 / 3)
    kv_per_token = 2 * (d / 128) * d * width  # K and V, every layer
    free = 0.85 * H100["memory_bytes"] * tp - weights
    fit = int(free // (kv_per_token * context)) if free > 0 else 0
    batch = max(1, min(batch or H100["decode_batch"], fit))
    bytes_step = weights + batch * kv_per_token * context / 2  # mean context over the decode
    t_mem = bytes_step / (tp * H100["hbm_bytes_per_s"] * H100["decode_bw_eff"])
    t_flop = batch * 2 * params / (tp * H100["peak_flops"][dtype] * H100["decode_mfu"])
    return batch / (max(t_mem, t_flop) + H100["step_overhead_s"].get(backend, 0.002))


def judge_request(section, lens: dict) -> dict:
    """Tokens, dollars (None: no price configured) and seconds of one request to oracle `section`."""
    tokens_in = JUDGE["template_tokens"] + lens["prompt"] + 2 * lens["completion"]
    tokens_out = min(JUDGE["output_tokens"][section.answer], section.max_tokens)
    if section.kind != "llm_judge":  # local labellers: no API price, no request latency
        return {"input_tokens": 0, "output_tokens": 0, "cost": 0.0, "latency_s": 0.0}
    price = section.prices.get(section.model)
    cost = None if price is None else (tokens_in * price.input + tokens_out * price.output) / 1e6
    return {"input_tokens": tokens_in, "output_tokens": tokens_out, "cost": cost,
            "latency_s": JUDGE["latency_s"][section.answer]}


def judge_seconds(section, requests: int, latency: float) -> float:
    """Wall time of `requests` judge calls at the configured concurrency and rate limit."""
    t = math.ceil(requests / section.max_concurrency) * latency
    if section.requests_per_minute:
        t = max(t, requests / section.requests_per_minute * 60)
    return t


def round_stages(cfg, r: int, params: float | None) -> list[dict]:
    """One dict per stage of round r: GPUs, tokens, FLOPs, judge requests and estimated seconds."""
    c, lens, gpus = round_counts(cfg, r), lengths(cfg), stage_gpus(cfg)
    p, comp = lens["prompt"], lens["completion"]
    backend = "vllm" if cfg.generation.backend == "auto" else cfg.generation.backend
    dtype, tp = cfg.model.dtype, cfg.generation.vllm.tensor_parallel_size
    stages = []

    def gen(name, prompts, sequences):
        flops = None if params is None else 2 * params * (prompts * p + sequences * comp)
        stages.append({"stage": name, "kind": "generation", "gpus": gpus["generation"], "sequences": sequences,
                       "tokens": sequences * comp, "flops": flops, "prompts": prompts})

    def score(name, sequences):
        tokens = sequences * (p + comp)
        stages.append({"stage": name, "kind": "scoring", "gpus": gpus["scoring"], "sequences": sequences,
                       "tokens": tokens, "flops": None if params is None else 2 * params * tokens})

    if c["entropy_samples"]:
        gen("entropy_samples", c["pool_prompts"], c["entropy_samples"])
    if c["entropy_scored"]:
        score("entropy", c["entropy_scored"])
    gen("samples", c["pair_prompts"], c["pair_completions"])
    score("scores", c["policy_scored"] + c["reference_scored"])
    if c["acquisition_ops"]:
        stages.append({"stage": "acquired", "kind": "acquisition", "gpus": 0, "ops": c["acquisition_ops"],
                       "candidates": c["candidate_pairs"], "history": c["history_pairs"],
                       "feature_bytes": c["feature_bytes"], "flops": None})
    stages.append({"stage": "labels", "kind": "judge", "gpus": 0, "requests": c["label_requests"]})
    train_tokens = c["pair_epochs"] * 2 * (p + comp)
    stages.append({"stage": "train", "kind": "training", "gpus": gpus["training"], "tokens": train_tokens,
                   "sequences": 2 * c["pair_epochs"], "flops": None if params is None else 6 * params * train_tokens})
    gen("eval (generate)", cfg.data.n_eval, c["eval_completions"])
    if c["kl_samples"]:
        gen("eval (KL samples)", cfg.data.n_eval, c["kl_samples"])
        score("eval (KL scoring)", 2 * c["kl_samples"])
    stages.append({"stage": "eval (judge)", "kind": "judge", "gpus": 0, "requests": c["eval_requests"]})
    for s in stages:
        _estimate(cfg, s, params, backend, dtype, tp, lens)
    return stages


def _estimate(cfg, s: dict, params, backend, dtype, tp, lens) -> None:
    """Add h100_s, cpu_s (and judge cost) to stage `s` in place."""
    if s["kind"] == "acquisition":  # numpy on the coordinator's CPU, on any machine
        s["h100_s"] = s["cpu_s"] = s["ops"] / CPU_RATES["acquisition_ops"]
        return
    if s["kind"] == "judge":
        section = (cfg.eval.oracle or cfg.oracle) if s["stage"].startswith("eval") else cfg.oracle
        one = judge_request(section, lens)
        s["cost"] = None if one["cost"] is None else one["cost"] * s["requests"]
        s["input_tokens"] = one["input_tokens"] * s["requests"]
        s["output_tokens"] = one["output_tokens"] * s["requests"]
        s["h100_s"] = s["cpu_s"] = judge_seconds(section, s["requests"], one["latency_s"])
        return
    if params is None:
        s["h100_s"] = s["cpu_s"] = None
        return
    gpus = max(1, s["gpus"])
    scale = params / CPU_RATES["params"]
    if s["kind"] == "generation":
        per_prompt = s["sequences"] // max(1, s["prompts"])
        if backend == "hf":  # one process, generation.batch_size prompts x n samples a step
            rate = decode_tokens_per_s(params, dtype, backend, 1, lens["prompt"] + lens["completion"],
                                       cfg.generation.batch_size * per_prompt)
        else:
            rate = decode_tokens_per_s(params, dtype, backend, tp, lens["prompt"] + lens["completion"])
            rate *= max(1, gpus // tp)  # replicas
        s["h100_s"] = s["tokens"] / rate
        cpu_rate = CPU_RATES["hf_tokens" if backend == "hf" else "vllm_tokens"] / scale
        s["cpu_s"] = s["tokens"] / cpu_rate
    elif s["kind"] == "scoring":
        s["h100_s"] = s["flops"] / (gpus * H100["peak_flops"][dtype] * H100["score_mfu"])
        s["cpu_s"] = s["flops"] / CPU_RATES["score_flops"]
    else:
        recompute = 4 / 3 if cfg.training.gradient_checkpointing else 1.0
        peak = H100["peak_flops"]["bfloat16" if cfg.training.mixed_precision == "bf16" else "float32"]
        s["h100_s"] = s["flops"] * recompute / (gpus * peak * H100["train_mfu"])
        s["cpu_s"] = s["flops"] / CPU_RATES["train_flops"]


def plan(cfg, run_dir: str | None = None) -> dict:
    """The whole run: per-round counts and estimates, the last round's stages, totals."""
    params, params_from = model_params(cfg.model.policy)
    rounds = []
    for r in range(cfg.loop.rounds):
        stages = round_stages(cfg, r, params)
        rounds.append({**round_counts(cfg, r), "stages": stages, **_round_totals(stages)})
    lens = lengths(cfg)
    eval_ref = {**next(s for s in round_stages(cfg, 0, params) if s["stage"] == "eval (generate)"),
                "stage": "eval_reference"}  # run-level: the SFT model's eval completions, once
    if OmegaConf.select(cfg, "eval.reference", default="sft") == "dataset":  # the data's own references
        eval_ref.update(sequences=0, tokens=0, flops=0.0, h100_s=0.0, cpu_s=0.0)
    gpus = stage_gpus(cfg)
    total_h100 = _sum([rd["h100_s"] for rd in rounds] + [eval_ref["h100_s"]])
    total_cost = _sum([rd["cost"] for rd in rounds])
    return {
        "name": cfg.name, "run_dir": run_dir, "policy": cfg.model.policy, "params": params,
        "params_from": params_from, "lengths": lens, "gpus": gpus, "rounds": rounds, "eval_reference": eval_ref,
        "weights": weight_figures(cfg, params, zero_stage(cfg.launcher.accelerate_config)),
        "totals": {
            "labels": sum(rd["labels"] for rd in rounds),
            "judge_requests": sum(rd["requests"] for rd in rounds),
            "judge_cost": total_cost,
            "generated_tokens": sum(rd["generated_tokens"] for rd in rounds) + eval_ref["tokens"],
            "flops": _sum([rd["flops"] for rd in rounds] + [eval_ref["flops"]]),
            "h100_s": total_h100,
            "gpu_hours": None if total_h100 is None else total_h100 * gpus["held"] / 3600,
            "cpu_s": _sum([rd["cpu_s"] for rd in rounds] + [eval_ref["cpu_s"]]),
        },
    }


def _round_totals(stages: list[dict]) -> dict:
    h100 = [s for s in stages if s.get("h100_s") is not None]
    bound = max(h100, key=lambda s: s["h100_s"])["stage"] if len(h100) == len(stages) else None
    return {
        "generated_tokens": sum(s["tokens"] for s in stages if s["kind"] == "generation"),
        "scored_tokens": sum(s["tokens"] for s in stages if s["kind"] == "scoring"),
        "train_flops": next(s["flops"] for s in stages if s["kind"] == "training"),
        "flops": _sum([s["flops"] for s in stages if s["kind"] not in ("judge", "acquisition")]),
        "requests": sum(s["requests"] for s in stages if s["kind"] == "judge"),
        "cost": _sum([s["cost"] for s in stages if s["kind"] == "judge"]),
        "h100_s": _sum([s["h100_s"] for s in stages]), "cpu_s": _sum([s["cpu_s"] for s in stages]),
        "bound": bound,
    }


def _sum(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def fmt_count(x: float | None) -> str:
    """1234567 -> '1.23M'; None -> '?'."""
    if x is None:
        return "?"
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}" if x != int(x) else str(int(x))


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_dollars(x: float | None) -> str:
    return "?" if x is None else f"${x:,.2f}"


def prompt_supply(cfg) -> dict:
    """Whether the pools fit the data, from its size before cleaning (data.source_rows; None when it
    cannot be known here): the training prompts that leaves at most, the draws of one round, and the
    distinct prompts a run without data.reuse_prompts consumes (counts.prompts_consumed)."""
    rows, how = source_rows(cfg)
    return {"rows": rows, "how": how, "train_at_most": None if rows is None else rows - cfg.data.n_eval,
            "per_round": counts.round_counts(cfg, 0).pool_prompts, "total": counts.prompts_consumed(cfg),
            "reuse": bool(cfg.data.reuse_prompts)}


def check_prompt_supply(cfg, supply: dict | None = None) -> str:
    """The dry run's line on the prompt supply; ConfigError (naming the key) when the pools cannot fit."""
    s = supply or prompt_supply(cfg)
    d, a, rounds = cfg.data, cfg.acquisition, cfg.loop.rounds
    source = f"data.source={d.source}"
    if s["rows"] is None:
        return (f"prompts: the size of {source} is unknown here ({s['how']}); the prompts stage checks the "
                f"{s['per_round']} prompts a round draws when it runs")
    train = s["train_at_most"]
    where = f"{source} holds at most {s['rows']:,} rows ({s['how']})"
    if train < 1:
        raise ConfigError(f"config key 'data.n_eval': {where}, and data.n_eval={d.n_eval} leaves no "
                          f"training prompts; lower data.n_eval")
    head = f"prompts: {where}: at most {train:,} training prompts after data.n_eval={d.n_eval}"
    reuse = "; or set data.reuse_prompts=true to cycle through the prompts, as the paper's loader did"
    if s["reuse"]:
        passes = -(-s["per_round"] // train)
        return (f"{head}; data.reuse_prompts: a round draws {s['per_round']:,} by cycling through them "
                f"(at least {passes} pass{'es' if passes > 1 else ''}), repeats allowed within and across rounds")
    if s["per_round"] > train:
        raise ConfigError(
            f"config key 'acquisition.labels_per_round': {a.function} acquisition draws {s['per_round']:,} "
            f"prompts per round (M={a.labels_per_round}, f_p={a.prompt_factor}, f_g={a.pair_factor}) but "
            f"{where}, which leaves at most {train:,} training prompts after data.n_eval={d.n_eval}; lower "
            f"acquisition.labels_per_round or the over-sampling factors, use a larger prompt pool{reuse}")
    if s["total"] > train:
        raise ConfigError(
            f"config key 'loop.rounds': without prompt reuse, round r draws its {s['per_round']:,} prompts from "
            f"those no earlier round acquired, so {rounds} rounds need {s['per_round']:,} + {rounds - 1} x "
            f"{a.labels_per_round} = {s['total']:,} distinct training prompts, but {where}, which leaves at most "
            f"{train:,} after data.n_eval={d.n_eval}; use fewer rounds or labels per round{reuse}")
    return (f"{head}; the run draws {s['per_round']:,} a round and {s['total']:,} distinct over {rounds} "
            f"rounds: fits unless cleaning drops more than {train - s['total']:,} rows")


def describe(cfg, run_dir: str) -> str:
    """What `apo-dist run --dry-run` prints: the resolved run, its plan and the assumptions.

    Touches nothing: the run directory is only looked at, vLLM is not imported (`auto` is reported as
    configured, with whether a vllm package is installed), no oracle is created, no data is downloaded.
    Raises ConfigError when the pools cannot fit the data (check_prompt_supply).
    """
    from importlib.util import find_spec

    backend = cfg.generation.backend
    if backend == "auto":
        found = "installed" if find_spec("vllm") else "not installed"
        backend = f"auto (resolved at start: vllm where it imports and supports the device, else hf; vllm {found})"
    else:
        backend += " (set in the config)"
    state = Path(run_dir) / "state.json"
    where = ("exists: the run would resume after its done stages" if state.exists()
             else "exists but holds no run" if Path(run_dir).exists() else "would be created")
    o = cfg.oracle
    oracle = (f"llm_judge {o.model} at {o.base_url or 'api.openai.com'}, key from ${o.api_key_env}"
              if o.kind == "llm_judge" else o.kind)
    head = [f"dry run of {cfg.name}: config valid; nothing started (no model, GPU, API or run directory touched)",
            f"run directory: {run_dir} ({where})",
            f"generation backend: {backend}",
            f"oracle: {oracle}; eval judge: {'same' if cfg.eval.oracle is None else cfg.eval.oracle.kind}; "
            f"eval reference: {OmegaConf.select(cfg, 'eval.reference', default='sft')}",
            check_prompt_supply(cfg)]
    return "\n".join(head) + "\n" + format_plan(plan(cfg, run_dir), cfg)


def format_plan(p: dict, cfg) -> str:
    """The dry-run text: what the run would do, per round and per stage, with its assumptions."""
    a, lens, g = cfg.acquisition, p["lengths"], p["gpus"]
    params = f"{fmt_count(p['params']).replace('G', 'B')} parameters ({p['params_from']})" if p["params"] else \
        "parameter count unknown (FLOPs and times not estimated; use a known name or a local folder)"
    features = (f", k={a.feature_dim}, s^2={a.prior_variance}, f_d={a.diversity_factor}"
                if counts.uses_features(cfg) else "")
    lines = [
        f"policy {p['policy']}: {params}",
        f"acquisition {a.function}: M={a.labels_per_round}, f_p={a.prompt_factor}, f_g={a.pair_factor}, "
        f"N={cfg.scoring.entropy_samples}{features}; {cfg.loop.rounds} rounds; training init {cfg.training.init}, "
        f"{cfg.training.epochs} epochs, batch {cfg.training.batch_size}",
        f"lengths: prompt ~{lens['prompt']:.0f} tokens, completion <= {lens['completion']:.0f} tokens",
        f"GPUs: generation {g['generation']}, scoring {g['scoring']}, training {g['training']}; held {g['held']}",
        "",
        "| round | pool prompts | entropy samples | candidate pairs | labels | train pairs | pair-epochs "
        "| generated tok | scored tok | train FLOPs | judge requests | judge cost | H100 est. | CPU est. | bound by |",
        "|" + "---:|" * 14 + "---|",
    ]
    for rd in p["rounds"]:
        lines.append(
            f"| {rd['round']} | {rd['pool_prompts']} | {rd['entropy_samples']} | {rd['candidate_pairs']} "
            f"| {rd['labels']} | {rd['train_pairs']} | {rd['pair_epochs']} | {fmt_count(rd['generated_tokens'])} "
            f"| {fmt_count(rd['scored_tokens'])} | {fmt_count(rd['train_flops'])} | {rd['requests']} "
            f"| {fmt_dollars(rd['cost'])} | {fmt_seconds(rd['h100_s'])} | {fmt_seconds(rd['cpu_s'])} "
            f"| {rd['bound'] or '?'} |")
    last = p["rounds"][-1]
    ref = p["eval_reference"]
    once = (f"generates {ref['sequences']} SFT completions once, H100 est. {fmt_seconds(ref['h100_s'])}"
            if ref["sequences"] else "takes the dataset's references")
    lines += ["", f"stages of round {last['round']} (the last; before round 0, eval_reference {once}):", ""]
    lines += stage_table(last["stages"])
    lines += ["", *weights_table(p["weights"])]
    t = p["totals"]
    gpu_hours = "?" if t["gpu_hours"] is None else f"{t['gpu_hours']:.1f}"
    lines += [
        "",
        f"run total: {t['labels']} labels, {t['judge_requests']} judge requests ({fmt_dollars(t['judge_cost'])}), "
        f"{fmt_count(t['generated_tokens'])} generated tokens, {fmt_count(t['flops'])} FLOPs; "
        f"H100 est. {fmt_seconds(t['h100_s'])} x {g['held']} GPUs = {gpu_hours} GPU-hours; "
        f"this CPU est. {fmt_seconds(t['cpu_s'])}",
        "",
        "assumptions (estimates, not measurements):",
        *[f"- {x}" for x in ASSUMPTIONS],
    ]
    return "\n".join(lines)


SHARDING = {None: "no DeepSpeed: each rank holds all of it", 0: "ZeRO-0: each rank holds all of it",
            1: "ZeRO-1: the optimizer state sharded over the {} ranks",
            2: "ZeRO-2: gradients and optimizer state sharded over the {} ranks",
            3: "ZeRO-3: weights, gradients and optimizer state sharded over the {} ranks"}


def weights_cells(f: dict, full: dict) -> tuple[str, ...]:
    """A weight_figures entry as table cells: trainable params (share of the full model's), optimizer
    state, bytes per training rank, bytes synced per round, sync time."""
    share = "" if f is full else f" ({f['trainable'] / full['trainable']:.2%})"
    seconds = fmt_seconds(f["sync_s"]) if f["sync_s"] >= 1 else f"{f['sync_s']:.2g} s"
    return (fmt_count(f["trainable"]).replace("G", "B") + share, fmt_bytes(f["optimizer_bytes"]),
            fmt_bytes(f["rank_bytes"]), fmt_bytes(f["sync_bytes"]), seconds)


def weights_table(w: dict) -> list[str]:
    """Markdown: the training state per rank and the weight sync of a round (weight_figures), full
    fine-tuning and, with training.lora, the adapter; then the adapter's parameters by projection."""
    lines = [f"training state per rank and weight sync per round (weights {'bf16' if w['width'] == 2 else 'fp32'}, "
             f"AdamW state fp32; {SHARDING[w['zero']].format(w['ranks'])}; activations not counted):", ""]
    if w["full"] is None:
        return lines + ["- parameter count unknown: no training state or sync estimated"]
    lines += ["| training | trainable params | optimizer state | per training rank | synced per round | sync time |",
              "|---|---:|---:|---:|---:|---:|"]
    rows = [("full fine-tuning", w["full"], "the policy")]
    a = w["adapter"]
    name = a and f"LoRA r={a['rank']} ({', '.join(a['targets'])})"
    if w["lora"]:
        rows.append((name, w["lora"], "the adapter"))
    for label, f, what in rows:
        trainable, optimizer, per_rank, synced, seconds = weights_cells(f, w["full"])
        lines.append(f"| {label} | {trainable} | {optimizer} | {per_rank} | {synced} ({what}) | {seconds} |")
    if a and a["params"] is None:
        lines += ["", f"{name}: {a['note']}"]
    elif a:
        modules = ", ".join(f"{m} {fmt_count(n)}" for m, n in a["modules"].items())
        lines += ["", f"{name}: {modules}; r (in + out) per projection and layer ({a['note']})"]
    return lines


def stage_table(stages: list[dict]) -> list[str]:
    """Markdown rows: one per stage with its work, GPUs, FLOPs and estimated times."""
    rows = ["| stage | work | GPUs | FLOPs | H100 est. | CPU est. |", "|---|---|---:|---:|---:|---:|"]
    for s in stages:
        if s["kind"] == "judge":
            work = (f"{s['requests']} requests, {fmt_count(s['input_tokens'])} in + "
                    f"{fmt_count(s['output_tokens'])} out tokens, {fmt_dollars(s['cost'])}")
        elif s["kind"] == "acquisition":
            work = (f"{fmt_count(s['candidates'])} candidates, {fmt_count(s['history'])} labelled pairs, "
                    f"{fmt_count(s['ops'])} numpy ops, {fmt_bytes(s['feature_bytes'])} of features")
        else:
            work = f"{fmt_count(s['sequences'])} sequences, {fmt_count(s['tokens'])} tokens"
        flops = "-" if s["kind"] in ("judge", "acquisition") else fmt_count(s["flops"])
        rows.append(f"| {s['stage']} | {work} | {s['gpus']} | {flops} "
                    f"| {fmt_seconds(s['h100_s'])} | {fmt_seconds(s['cpu_s'])} |")
    return rows


# docs/scaling.md: policies of nominal size (parameters read from the name) and pool multiples.
SCALING_POLICIES = {"1B": "meta-llama/Llama-3.2-1B", "7B": "meta-llama/Llama-2-7b-hf",
                    "70B": "meta-llama/Llama-2-70b-hf"}
SCALING_LORA = ["training.lora.rank=16"]  # the LoRA table's adapter when the config trains full weights


def layout(params: float) -> dict:
    """A heterogeneous allocation for a policy of `params` on 8-GPU H100 nodes.

    vLLM tensor parallel size: the smallest power of 2 holding the bf16 weights in half of the GPUs'
    memory (the rest is KV cache). ZeRO-3 ranks: 16 bytes per parameter (bf16 weights and gradients,
    fp32 master weights and Adam moments) in 75% of the memory, rounded up to a power of two of whole
    nodes (so that ranks divide the effective batch). As many generation nodes (vLLM servers) as
    trainer nodes (scoring and training ranks).
    """
    mem, per_node = H100["memory_bytes"], H100["gpus_per_node"]
    tp = 1
    while 2 * params > 0.5 * mem * tp:
        tp *= 2
    state = sum(state_bytes(0.0, params, 2).values())  # full fine-tuning in bf16: 16 bytes a parameter
    nodes = 2 ** math.ceil(math.log2(math.ceil(gpus_for_state(state) / per_node)))
    return {"tp": tp, "servers": nodes * per_node // tp, "ranks": nodes * per_node, "nodes": 2 * nodes}


def gpus_for_state(state: float) -> int:
    """H100s whose memory, 75% of it, holds `state` bytes of training state sharded over them (ZeRO-3)."""
    return math.ceil(state / (0.75 * H100["memory_bytes"]))


def scaling_overrides(size: str, scale: int, cfg) -> list[str]:
    """Config overrides for one row of docs/scaling.md (policy, labels per round, the layout).

    The micro-batch shrinks where needed so that micro-batch x ranks divides the effective batch."""
    params, _ = model_params(SCALING_POLICIES[size])
    lay = layout(params)
    micro = max(1, min(cfg.training.micro_batch_size, cfg.training.batch_size // lay["ranks"]))
    return [f"model.policy={SCALING_POLICIES[size]}", f"acquisition.labels_per_round={cfg.acquisition.labels_per_round * scale}",
            f"training.micro_batch_size={micro}",
            "generation.backend=vllm_server", f"generation.servers.num_local={lay['servers']}",
            f"generation.vllm.tensor_parallel_size={lay['tp']}", f"launcher.scoring_processes={lay['ranks']}",
            f"launcher.training_processes={lay['ranks']}"]


def scaling_rows(path: str, sizes=("1B", "7B", "70B"), scales=(1, 10, 100), overrides=()) -> list[dict]:
    """One row per policy size x pool multiple: the config at `path` with M scaled (f_p, f_g kept)."""
    base = load_config(path, list(overrides))
    rows = []
    for size in sizes:
        for scale in scales:
            extra = scaling_overrides(size, scale, base)
            cfg = load_config(path, [*overrides, *extra])
            p = plan(cfg)
            first, last = p["rounds"][0], p["rounds"][-1]
            judge = cfg.oracle
            lat = JUDGE["latency_s"][judge.answer]
            lora = cfg if cfg.training.lora.rank else load_config(path, [*overrides, *extra, *SCALING_LORA])
            rows.append({"size": size, "scale": scale, "overrides": extra, "layout": layout(p["params"]),
                         "params": p["params"], "gpus": p["gpus"], "first": first, "last": last,
                         "weights": weight_figures(lora, p["params"], zero=3),  # the layout's ZeRO-3 ranks
                         "judge_rate_per_s": judge.max_concurrency / lat if judge.kind == "llm_judge" else None})
    return rows


def format_scaling(rows: list[dict], path: str) -> str:
    """The three tables of docs/scaling.md: work per round, time per stage, judge load and cost."""
    out = ["| policy | pool | pool prompts | entropy samples | generated tok | scoring FLOPs "
           "| train FLOPs r=0 / last | vLLM servers x TP | scoring = ZeRO-3 ranks | nodes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        f, last, lay = row["first"], row["last"], row["layout"]
        scoring = _sum(s["flops"] for s in last["stages"] if s["kind"] == "scoring")
        out.append(f"| {row['size']} | {row['scale']}x | {fmt_count(f['pool_prompts'])} "
                   f"| {fmt_count(f['entropy_samples'])} | {fmt_count(last['generated_tokens'])} "
                   f"| {fmt_count(scoring)} | {fmt_count(f['train_flops'])} / {fmt_count(last['train_flops'])} "
                   f"| {lay['servers']} x {lay['tp']} | {lay['ranks']} | {lay['nodes']} |")
    names = [s["stage"] for s in rows[0]["last"]["stages"]]
    out += ["", f"H100 estimate per stage, last round ({rows[0]['last']['round']}); then the round times "
                "(first / last round) and the stage that bounds the last round:", "",
            "| policy | pool | " + " | ".join(names) + " | round r=0 | round last | bound by |",
            "|---|---:|" + "---:|" * (len(names) + 2) + "---|"]
    for row in rows:
        last = row["last"]
        out.append(f"| {row['size']} | {row['scale']}x | "
                   + " | ".join(fmt_seconds(s["h100_s"]) for s in last["stages"])
                   + f" | {fmt_seconds(row['first']['h100_s'])} | {fmt_seconds(last['h100_s'])} | {last['bound']} |")
    out += ["", "Judge per round (labels + eval): requests, peak request rate while labelling, cost; "
                "GPU-hours of the last round (all GPUs held):", "",
            "| policy | pool | label requests | eval requests | peak req/s | mean req/min over the round "
            "| cost per round | GPU-hours (last round) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        last = row["last"]
        labels = next(s for s in last["stages"] if s["stage"] == "labels")
        evals = next(s for s in last["stages"] if s["stage"] == "eval (judge)")
        rate = "?" if row["judge_rate_per_s"] is None else f"{row['judge_rate_per_s']:.1f}"
        out.append(f"| {row['size']} | {row['scale']}x | {labels['requests']} | {evals['requests']} | {rate} "
                   f"| {last['requests'] / last['h100_s'] * 60:.0f} | {fmt_dollars(last['cost'])} "
                   f"| {last['h100_s'] * row['gpus']['held'] / 3600:.1f} |")
    return "\n".join(out + ["", *scaling_weights_table(rows)])


def scaling_weights_table(rows: list[dict]) -> list[str]:
    """docs/scaling.md's training state and weight sync, full fine-tuning beside LoRA, once per policy
    (they do not depend on the pool): ZeRO-3 over the layout's ranks, bf16 weights."""
    first = rows[0]["weights"]["adapter"]
    out = [f"Training state and weight sync per round, full fine-tuning beside LoRA (r = {first['rank']} on "
           f"{', '.join(first['targets'])}), bf16 weights sharded by ZeRO-3 over the layout's ranks; the GPUs "
           "the state needs (75% of 80 GB each); the sync beside the last round at the smallest pool:", "",
           "| policy | training | trainable params | optimizer state | per GPU | GPUs needed | synced per round "
           "| sync time | last round |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["scale"] != rows[0]["scale"]:
            continue
        w = row["weights"]
        for label, f in (("full", w["full"]), (f"LoRA r={w['adapter']['rank']}", w["lora"])):
            if f is None:  # an adapter the plan cannot count
                out.append(f"| {row['size']} | {label} | {w['adapter']['note']} |" + " |" * 6)
                continue
            trainable, optimizer, per_rank, synced, seconds = weights_cells(f, w["full"])
            out.append(f"| {row['size']} | {label} | {trainable} | {optimizer} | {per_rank} "
                       f"| {gpus_for_state(f['rank_bytes'] * w['ranks'])} | {synced} | {seconds} "
                       f"| {fmt_seconds(row['last']['h100_s'])} |")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m apo_dist.plan scaling CONFIG [key=value ...]`: the tables of docs/scaling.md."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "scaling":
        print("usage: python -m apo_dist.plan scaling CONFIG [key=value ...]", file=sys.stderr)
        return 2
    print(format_scaling(scaling_rows(argv[1], overrides=argv[2:]), argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
