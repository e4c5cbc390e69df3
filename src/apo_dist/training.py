"""DPO training on Accelerate, from stored reference log-probs (no reference model in memory).

Each labelled pair carries the reference log-probs of both completions (computed once by the
scoring stage) and `label` = P(a preferred). The loss is DPO's, written for soft labels so that
ties (label 0.5) and probabilistic oracles need no special case:

    z    = beta * ((logpi(a) - logref(a)) - (logpi(b) - logref(b)))
    loss = -(label * log sigmoid(z) + (1 - label) * log sigmoid(-z))

For label 1 this is exactly -log sigmoid(beta * (chosen margin - rejected margin)).

`train_dpo` reads top to bottom: `setup_training` (Accelerator, DeepSpeed settings, model,
optimizer, tokenizer), `train_steps` (epochs of optimizer steps with checkpoints, resume and
stop requests), `save_policy` (the consolidated Hugging Face checkpoint).

With `training.lora.rank > 0` the policy is a LoRA adapter (peft) on the frozen starting model:
AdamW updates the adapter only, and the saved policy is the adapter folder (README, "training.lora").
"""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .devices import check_placement, note
from .distributed import deepspeed_enabled, init_distributed, load_training_model, sharding_report
from .models import adapter_base, completion_logprobs, is_adapter, load_model, load_tokenizer
from .rundir import atomic_write_text


class TrainingStopped(RuntimeError):
    """A stop was requested; the state after the last step is checkpointed for the resume."""


def dpo_loss(policy_a: torch.Tensor, policy_b: torch.Tensor, ref_a: torch.Tensor,
             ref_b: torch.Tensor, label: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of both sides."""
    reward_a = beta * (policy_a - ref_a)
    reward_b = beta * (policy_b - ref_b)
    z = reward_a - reward_b
    loss = -(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z))
    return {"loss": loss, "reward_a": reward_a, "reward_b": reward_b, "margin": z}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict]  # one record per optimizer step
    sharding: dict  # this rank's share of the policy's parameters (distributed.sharding_report)
    trainable_params: int  # parameters the optimizer updates (the adapter's alone under LoRA)


@dataclass
class StepStats:
    """Sums over the pairs of one optimizer step. The reward sums count only decided pairs (label
    not 0.5), with "chosen" the preferred side; `correct` counts those whose chosen reward is higher.

    Summed over micro-batches and all-reduced over ranks as one float32 tensor in field order.
    """
    loss_sum: float = 0.0
    correct: float = 0.0
    decided: float = 0.0
    chosen_reward_sum: float = 0.0
    rejected_reward_sum: float = 0.0
    margin_sum: float = 0.0

    @classmethod
    def of(cls, out: dict[str, torch.Tensor], label: torch.Tensor) -> StepStats:
        """The sums over one micro-batch, from `dpo_loss`'s output and the labels."""
        decided = label != 0.5
        a_wins = label > 0.5
        ra, rb = out["reward_a"].detach().cpu(), out["reward_b"].detach().cpu()
        chosen, rejected = torch.where(a_wins, ra, rb), torch.where(a_wins, rb, ra)
        return cls(loss_sum=out["loss"].detach().sum().item(),
                   correct=((chosen > rejected) & decided).sum().item(),
                   decided=decided.sum().item(),
                   chosen_reward_sum=chosen[decided].sum().item(),
                   rejected_reward_sum=rejected[decided].sum().item(),
                   margin_sum=(chosen - rejected)[decided].sum().item())

    @staticmethod
    def zeros() -> torch.Tensor:
        return torch.zeros(len(fields(StepStats)))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float32)

    @classmethod
    def from_tensor(cls, sums: torch.Tensor) -> StepStats:
        return cls(*sums.tolist())

    def means(self, pairs: int) -> dict[str, float]:
        """The history record's metrics: loss per pair, reward statistics per decided pair."""
        decided = max(self.decided, 1)
        return {"loss": self.loss_sum / pairs, "reward_accuracy": self.correct / decided,
                "chosen_reward": self.chosen_reward_sum / decided,
                "rejected_reward": self.rejected_reward_sum / decided, "margin": self.margin_sum / decided}


def gradient_accumulation(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that the effective batch is `batch_size` on any world size."""
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ValueError(f"training.batch_size={batch_size} is not divisible by micro_batch_size "
                         f"({micro_batch_size}) x processes ({world_size}); choose values that divide it")
    return batch_size // per_step


def train_dpo(pairs: pd.DataFrame, init_path: str, out_dir: Path, tcfg, seed: int,
              pad_id: int | None = None, progress: bool = True, tensorboard_dir: str | None = None,
              checkpoint_dir: Path | None = None, resume_key: str = "",
              on_step: Callable[[int], None] | None = None, stop_file: Path | None = None) -> TrainResult:
    """Train a policy from `init_path` on `pairs` and save an HF checkpoint to `out_dir` (with
    `tcfg.lora.rank > 0`, an adapter: see `setup_training` and `save_policy`).

    `pairs` needs prompt_ids, tokens_a, tokens_b, ref_logp_a, ref_logp_b and label. Runs as is in
    one process or under `accelerate launch` (DDP, ZeRO-2, ZeRO-3). With `checkpoint_dir` and
    `tcfg.checkpoint_every_steps`, model (LoRA: adapter) and optimizer state are saved every that
    many steps and a restarted call with the same `resume_key` continues from the last one. When
    `stop_file` appears (on any rank), every rank checkpoints after the current step and raises
    TrainingStopped.
    """
    setup = setup_training(init_path, tcfg, seed, tensorboard_dir)
    pad_id = setup.tokenizer.pad_token_id if pad_id is None else pad_id
    history = _resume(setup.accelerator, checkpoint_dir, resume_key, adapter_only=tcfg.lora.rank > 0)
    start = time.time()
    train_steps(setup, pairs, tcfg, seed, pad_id, history, progress=progress, log=bool(tensorboard_dir),
                checkpoint_dir=checkpoint_dir, resume_key=resume_key, on_step=on_step, stop_file=stop_file)
    drop_optimizer_state(setup)
    save_policy(setup, out_dir, checkpoint_dir, tcfg.lora)
    if tensorboard_dir:
        setup.accelerator.end_training()
    return TrainResult(steps=len(history), seconds=time.time() - start, history=history, sharding=setup.sharding,
                       trainable_params=setup.trainable_params)


# ---- setup ----

@dataclass
class TrainingSetup:
    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module  # prepared (DDP / DeepSpeed engine)
    optimizer: Any  # prepared AdamW
    tokenizer: Any
    accum: int  # micro-batches per optimizer step on each rank
    sharding: dict
    trainable_params: int


def setup_training(init_path: str, tcfg, seed: int, tensorboard_dir: str | None = None) -> TrainingSetup:
    """The Accelerator (DeepSpeed settings from `tcfg` when launched with a DeepSpeed config),
    the fp32 policy loaded from `init_path`, and its AdamW optimizer, prepared for this world.
    Accelerate places the policy; it must land on devices.process_device (else RuntimeError).

    With `tcfg.lora.rank > 0` the full model (`init_path`, or the base of the adapter folder
    `init_path`) is frozen and carries a LoRA adapter, the only parameters the optimizer sees:
    `init_path`'s adapter when it is one (continued), else a fresh one (`with_adapter`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if is_adapter(init_path) and not tcfg.lora.rank:
        raise ValueError(f"{init_path} is a LoRA adapter: training from it needs training.lora.rank > 0")
    base_path = adapter_base(init_path) if is_adapter(init_path) else init_path
    state = init_distributed()
    accum = gradient_accumulation(tcfg.batch_size, tcfg.micro_batch_size, state.num_processes)
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=tcfg.mixed_precision,
                              log_with="tensorboard" if tensorboard_dir else None,
                              project_dir=tensorboard_dir)
    if accelerator.state.deepspeed_plugin is not None:
        _configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, tcfg, base_path)
    set_seed(seed)
    tokenizer = load_tokenizer(init_path)
    model = load_training_model(base_path)  # accelerator.prepare places it
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if tcfg.lora.rank:
        model = with_adapter(model, init_path, base_path, tcfg.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)  # before ZeRO-3 partitions them
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    note(check_placement(model, f"the policy Accelerate prepared for training (accelerator.device {accelerator.device})"))
    sharding = sharding_report(model)
    if tensorboard_dir:
        accelerator.init_trackers("dpo")
    return TrainingSetup(accelerator, model, optimizer, tokenizer, accum, sharding, trainable_params)


def with_adapter(model, init_path: str, base_path: str, lora):
    """`model` (the full model at `base_path`) frozen, with a trainable LoRA adapter: the one saved
    at `init_path` when that is an adapter folder, else a fresh one from the `training.lora` settings
    (B = 0, so that the policy starts equal to `model`). The adapter records `base_path`, absolute,
    as its base model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if is_adapter(init_path):
        model = PeftModel.from_pretrained(model, init_path, is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return model


def _configure_deepspeed(ds: dict, tcfg, model_path: str) -> None:
    """Fill the DeepSpeed config in place from `tcfg` (bucket sizes from the full model at `model_path`)."""
    from transformers import AutoConfig

    ds["train_micro_batch_size_per_gpu"] = tcfg.micro_batch_size
    ds["gradient_clipping"] = tcfg.max_grad_norm
    ds["zero_allow_untested_optimizer"] = True
    # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32); size them to the model
    # the way Accelerate's "auto" does, unless the config file sets them.
    hidden = AutoConfig.from_pretrained(model_path).hidden_size
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("reduce_bucket_size", hidden * hidden)
    if zero.get("stage") == 3:
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)
        # DeepSpeed's defaults (1e9 elements) size the optimizer step's temporaries to the rank's whole
        # partition and keep every gathered layer from forward to backward (benchmarks/README.md);
        # not for LoRA, where the limits break DeepSpeed's prefetch trace after a resume.
        zero.setdefault("sub_group_size", hidden * hidden)
        if not tcfg.lora.rank:
            zero.setdefault("stage3_max_live_parameters", hidden * hidden)
            zero.setdefault("stage3_max_reuse_distance", hidden * hidden)


# ---- the training loop ----

def train_steps(setup: TrainingSetup, pairs: pd.DataFrame, tcfg, seed: int, pad_id: int, history: list[dict],
                progress: bool = True, log: bool = False, checkpoint_dir: Path | None = None,
                resume_key: str = "", on_step: Callable[[int], None] | None = None,
                stop_file: Path | None = None) -> None:
    """`tcfg.epochs` epochs of optimizer steps over `pairs`, appending one record per step to `history`.

    Each epoch visits the pairs in a fresh order drawn from `seed`; the last batch of an epoch may
    be short. Steps already in `history` (restored by `_resume`) are skipped. After each step: the
    tracker log (`log`), the periodic checkpoint, `on_step(steps done)`, then the stop request.
    """
    accelerator = setup.accelerator
    adapter_only = tcfg.lora.rank > 0  # a LoRA run checkpoints its adapter, not the frozen base
    n = len(pairs)
    steps_per_epoch = math.ceil(n / tcfg.batch_size)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps_per_epoch * tcfg.epochs, initial=len(history), desc="train",
               disable=not progress or accelerator.process_index != 0, unit="step")
    setup.model.train()
    for epoch in range(tcfg.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for step in range(steps_per_epoch):
            if epoch * steps_per_epoch + step < len(history):
                continue  # done before a restart
            batch_rows = order[step * tcfg.batch_size: (step + 1) * tcfg.batch_size]
            stats = _optimizer_step(setup, pairs, batch_rows, tcfg, pad_id)
            record = {"epoch": epoch, "step": len(history), **stats.means(len(batch_rows))}
            history.append(record)
            if log:
                accelerator.log({f"train/{k}": v for k, v in record.items()}, step=record["step"])
            if checkpoint_dir and tcfg.checkpoint_every_steps and len(history) % tcfg.checkpoint_every_steps == 0:
                _checkpoint(setup, checkpoint_dir, resume_key, history, adapter_only)
            if on_step:
                on_step(len(history))
            if checkpoint_dir and stop_file is not None and _any_rank(accelerator, stop_file.exists()):
                _checkpoint(setup, checkpoint_dir, resume_key, history, adapter_only)
                raise TrainingStopped(f"training stopped after step {len(history)}; checkpoint in {checkpoint_dir}")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['reward_accuracy']:.2f}")
    bar.close()


def _optimizer_step(setup: TrainingSetup, pairs: pd.DataFrame, batch_rows: list[int], tcfg,
                    pad_id: int) -> StepStats:
    """One optimizer step on the effective batch `batch_rows` (row positions in `pairs`), split in
    micro-batches dealt round-robin to the ranks; returns its stats summed over all ranks.

    Every rank runs `setup.accum` micro-steps, even in a short last batch: those with no rows left
    contribute a zero loss, so that every rank reaches the synchronising step together.
    """
    accelerator, model, optimizer, accum = setup.accelerator, setup.model, setup.optimizer, setup.accum
    world = accelerator.num_processes
    micro = [batch_rows[i: i + tcfg.micro_batch_size] for i in range(0, len(batch_rows), tcfg.micro_batch_size)]
    mine = micro[accelerator.process_index::world]
    sums = StepStats.zeros()
    for i in range(accum):
        rows = pairs.iloc[mine[i]] if i < len(mine) else pairs.iloc[[]]
        with accelerator.accumulate(model):
            # Every pair of the effective batch weighs the same: backward() divides by accum and
            # DDP averages over ranks, which this scaling undoes.
            if len(rows):
                out = _micro_step(model, rows, pad_id, tcfg.beta)
                loss = out["loss"].sum() * world * accum / len(batch_rows)
            else:
                loss = _zero_loss(model)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if len(rows):
            sums += StepStats.of(out, torch.tensor(rows["label"].values, dtype=torch.float32)).as_tensor()
    return StepStats.from_tensor(accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu())


def _micro_step(model, rows: pd.DataFrame, pad_id: int, beta: float) -> dict[str, torch.Tensor]:
    """One forward pass over both completions of every pair in `rows`."""
    prompts = list(rows["prompt_ids"])
    completions = list(rows["tokens_a"]) + list(rows["tokens_b"])
    logp, _, _ = completion_logprobs(model, prompts + prompts, completions, pad_id)
    k = len(rows)
    device = logp.device
    as_tensor = lambda col: torch.tensor(rows[col].values, dtype=torch.float32, device=device)  # noqa: E731
    return dpo_loss(logp[:k], logp[k:], as_tensor("ref_logp_a"), as_tensor("ref_logp_b"),
                    as_tensor("label"), beta)


def _zero_loss(model) -> torch.Tensor:
    """A loss of 0 that still touches every parameter (keeps ranks in step under DDP)."""
    return sum(p.sum() * 0.0 for p in model.parameters())


# ---- checkpoints, resume, stop requests ----

def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any: ranks must agree on where to stop."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


def _checkpoint(setup: TrainingSetup, checkpoint_dir: Path, resume_key: str, history: list[dict],
                adapter_only: bool) -> None:
    """Save the training state to a new folder, then point progress.json at it (atomic). The state
    is the model's, the optimizer's and the random generators'; with `adapter_only` (a LoRA run) the
    model's is its trainable parameters alone (the adapter): `_resume` takes the frozen base from
    the model as `setup_training` loaded it."""
    accelerator = setup.accelerator
    name = f"step_{len(history):06d}"
    _save_state(accelerator, setup.model, checkpoint_dir / name, adapter_only)
    if accelerator.is_main_process:
        # Not atomic_write_json, which sorts keys: the restored records go into train_log.jsonl as they
        # were, so that a resumed stage writes the same bytes as an uninterrupted one.
        atomic_write_text(checkpoint_dir / "progress.json",
                          json.dumps({"key": resume_key, "state": name, "history": history}) + "\n")
        for old in checkpoint_dir.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator, checkpoint_dir: Path | None, resume_key: str, adapter_only: bool) -> list[dict]:
    """History of the steps already done by an interrupted run with the same key, state restored
    (with `adapter_only`, from a LoRA run's checkpoint: the adapter into the freshly loaded model)."""
    progress = checkpoint_dir / "progress.json" if checkpoint_dir else None
    if progress is None or not progress.exists():
        return []
    saved = json.loads(progress.read_text())
    if saved["key"] != resume_key:
        return []
    _load_state(accelerator, checkpoint_dir / saved["state"], adapter_only)
    return saved["history"]


def _save_state(accelerator, model, folder: Path, adapter_only: bool) -> None:
    """`accelerator.save_state` to `folder` (`model`: the prepared model); with `adapter_only`, of the
    model's parameters only the trainable ones: the state dict Accelerate or DeepSpeed saves is cut
    down by `_keep_trainable`, and DeepSpeed is told not to add its copy of the frozen ones."""
    from accelerate.utils import DistributedType

    if not adapter_only:
        accelerator.save_state(str(folder))
        return
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    with _registered(accelerator.unwrap_model(model).register_state_dict_post_hook, _keep_trainable):
        accelerator.save_state(str(folder), **({"exclude_frozen_parameters": True} if deepspeed else {}))


def _load_state(accelerator, folder: Path, adapter_only: bool) -> None:
    """`accelerator.load_state` from a `_save_state` folder; with `adapter_only`, its trainable
    parameters go into the model as loaded, frozen base untouched, through `_load_trainable` (the
    DeepSpeed engine's custom_load_fn, else `_load_trainable_files`)."""
    from accelerate.utils import DistributedType

    if not adapter_only:
        accelerator.load_state(str(folder))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(str(folder), custom_load_fn=_load_trainable)
    else:
        with _registered(accelerator.register_load_state_pre_hook, _load_trainable_files):
            accelerator.load_state(str(folder))


@contextmanager
def _registered(register: Callable, hook: Callable):
    """`hook` registered by `register` (which returns a removable handle) for the context's duration."""
    handle = register(hook)
    try:
        yield
    finally:
        handle.remove()


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _keep_trainable(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state-dict post-hook: the entries of `module` in `state_dict` (names from `prefix` on) cut down
    to its trainable parameters, in place. DeepSpeed's exclude_frozen_parameters alone would keep a
    frozen parameter's second name (a tied output embedding)."""
    keep = {prefix + name for name in _trainable_names(module)}
    for name in [name for name in state_dict if name.startswith(prefix) and name not in keep]:
        del state_dict[name]


def _load_trainable_files(models: list, input_dir: str) -> None:
    """Accelerate's load pre-hook for the model file `_keep_trainable` cut down: loads it into the one
    prepared model (`_load_trainable`), then empties `models` so that Accelerate does not load it
    again, strictly."""
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    (model,) = models  # train_dpo prepares one model
    _load_trainable(src=load_file(Path(input_dir) / SAFE_WEIGHTS_NAME), dst=model)
    models.clear()


def _load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load the state dict `src`, which must hold every trainable parameter of `dst` and nothing `dst`
    lacks, into `dst`; the parameters it leaves out (the frozen ones) keep their values. Raises
    RuntimeError, before loading anything, when `src` does not fit."""
    missing = _trainable_names(dst) - src.keys()
    unexpected = src.keys() - dst.state_dict().keys()
    if missing or unexpected:
        raise RuntimeError(f"the checkpoint does not fit the model being trained: trainable parameters missing "
                           f"{sorted(missing)}, names the model lacks {sorted(unexpected)}")
    dst.load_state_dict(src, strict=False)  # missing keys: the frozen parameters alone (checked above)


# ---- saving ----

def drop_optimizer_state(setup: TrainingSetup) -> None:
    """Free AdamW's moments once training is done, before `save_policy` gathers the full weights
    (on rank 0 under ZeRO-3): the two need not be held at once. `setup.optimizer` cannot step after."""
    optimizer = setup.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer
        optimizer = optimizer.optimizer
    optimizer.state.clear()


def save_policy(setup: TrainingSetup, out_dir: Path, checkpoint_dir: Path | None = None, lora=None) -> None:
    """Save the trained policy (consolidated from all ranks) and its tokenizer as a Hugging Face
    folder: written to `out_dir`.tmp and renamed, so `out_dir` exists only when complete. The
    mid-training checkpoints in `checkpoint_dir` are then of no use and are removed.

    A LoRA policy (`lora`: the training.lora settings, rank > 0) is saved as its adapter alone
    (peft's adapter_config.json and adapter_model.safetensors); with lora.save_merged,
    `out_dir`/merged also holds the adapter merged into its base model (`save_merged`)."""
    accelerator = setup.accelerator
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(setup.model)
    adapter = lora is not None and lora.rank > 0
    # Collective under ZeRO-3: every rank gathers, the main process writes.
    state_dict = adapter_state_dict(model) if adapter else accelerator.get_state_dict(setup.model)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        # A LoRA policy never saves base weights, whatever its target modules (save_embedding_layers).
        extra = {"save_embedding_layers": False} if adapter else {}
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **extra)
        setup.tokenizer.save_pretrained(tmp)
        if adapter and lora.save_merged:
            save_merged(tmp, tmp / "merged", setup.tokenizer)
        tmp.rename(out_dir)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's parameters of the peft `model` by state-dict name, full values on the CPU:
    under ZeRO-3 gathered from every rank's partition (every rank must call it)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with _gathered(list(trainable.values())):
        return {name: p.detach().cpu().clone() for name, p in trainable.items()}


def _gathered(params: list[torch.Tensor]):
    """A context in which ZeRO-3-partitioned `params` hold their full values (else a no-op)."""
    if not deepspeed_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)  # a no-op for parameters ZeRO-3 does not manage


def save_merged(adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """The adapter at `adapter_dir` merged into its base model, saved as a full float32 HF checkpoint
    (with `tokenizer`) in `out_dir`: loadable without peft, by transformers and vLLM."""
    merged = load_model(str(adapter_dir), "float32", device="cpu").merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
