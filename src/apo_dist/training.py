"""DPO training on Accelerate, from stored reference log-probs (no reference model in memory).

Each labelled pair carries the reference log-probs of both completions (computed once by the
scoring stage) and `label` = P(a preferred). The loss is DPO's, written for soft labels so that
ties (label 0.5) and probabilistic oracles need no special case:

    z    = beta * ((logpi(a) - logref(a)) - (logpi(b) - logref(b)))
    loss = -(label * log sigmoid(z) + (1 - label) * log sigmoid(-z))

For label 1 this is exactly -log sigmoid(beta * (chosen margin - rejected margin)).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .distributed import init_distributed, sharding_report
from .models import completion_logprobs, load_model, load_tokenizer
from .rundir import atomic_write_json


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
    """Train a policy from `init_path` on `pairs` and save an HF checkpoint to `out_dir`.

    `pairs` needs prompt_ids, tokens_a, tokens_b, ref_logp_a, ref_logp_b and label. Runs as is in
    one process or under `accelerate launch` (DDP, ZeRO-2, ZeRO-3). With `checkpoint_dir` and
    `tcfg.checkpoint_every_steps`, model and optimizer state are saved every that many steps and a
    restarted call with the same `resume_key` continues from the last one. When `stop_file` appears
    (on any rank), every rank checkpoints after the current step and raises TrainingStopped.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    state = init_distributed()
    accum = gradient_accumulation(tcfg.batch_size, tcfg.micro_batch_size, state.num_processes)
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=tcfg.mixed_precision,
                              log_with="tensorboard" if tensorboard_dir else None,
                              project_dir=tensorboard_dir)
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = tcfg.micro_batch_size
        ds["gradient_clipping"] = tcfg.max_grad_norm
        ds["zero_allow_untested_optimizer"] = True
        # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32); size them to the model
        # the way Accelerate's "auto" does, unless the config file sets them.
        hidden = AutoConfig.from_pretrained(init_path).hidden_size
        zero = ds.setdefault("zero_optimization", {})
        zero.setdefault("reduce_bucket_size", hidden * hidden)
        if zero.get("stage") == 3:
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)
    set_seed(seed)
    tokenizer = load_tokenizer(init_path)
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    model = load_model(init_path, "float32")
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    sharding = sharding_report(model)
    if tensorboard_dir:
        accelerator.init_trackers("dpo")

    n = len(pairs)
    rank, world = accelerator.process_index, accelerator.num_processes
    steps_per_epoch = math.ceil(n / tcfg.batch_size)
    history = _resume(accelerator, checkpoint_dir, resume_key)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(total=steps_per_epoch * tcfg.epochs, initial=len(history), desc="train",
               disable=not progress or rank != 0, unit="step")
    model.train()
    for epoch in range(tcfg.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for step in range(steps_per_epoch):
            if epoch * steps_per_epoch + step < len(history):
                continue  # done before a restart
            batch_rows = order[step * tcfg.batch_size: (step + 1) * tcfg.batch_size]
            micro = [batch_rows[i: i + tcfg.micro_batch_size]
                     for i in range(0, len(batch_rows), tcfg.micro_batch_size)]
            mine = micro[rank::world]
            stats = torch.zeros(6)  # loss, correct, decided, chosen reward, rejected reward, margin (sums)
            for i in range(accum):
                rows = pairs.iloc[mine[i]] if i < len(mine) else pairs.iloc[[]]
                with accelerator.accumulate(model):
                    # Every pair of the effective batch weighs the same: backward() divides by
                    # accum and DDP averages over ranks, which this scaling undoes. A rank with no
                    # rows left in a short last batch still joins the step with a zero loss.
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
                    stats += _batch_stats(out, torch.tensor(rows["label"].values, dtype=torch.float32))
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu().tolist()
            decided = max(stats[2], 1)
            record = {"epoch": epoch, "step": len(history), "loss": stats[0] / len(batch_rows),
                      "reward_accuracy": stats[1] / decided, "chosen_reward": stats[3] / decided,
                      "rejected_reward": stats[4] / decided, "margin": stats[5] / decided}
            history.append(record)
            if tensorboard_dir:
                accelerator.log({f"train/{k}": v for k, v in record.items()}, step=record["step"])
            if checkpoint_dir and tcfg.checkpoint_every_steps and len(history) % tcfg.checkpoint_every_steps == 0:
                _checkpoint(accelerator, checkpoint_dir, resume_key, history)
            if on_step:
                on_step(len(history))
            if checkpoint_dir and stop_file is not None and _any_rank(accelerator, stop_file.exists()):
                _checkpoint(accelerator, checkpoint_dir, resume_key, history)
                raise TrainingStopped(f"training stopped after step {len(history)}; checkpoint in {checkpoint_dir}")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['reward_accuracy']:.2f}")
    bar.close()
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # consolidated (gathered) under ZeRO-3
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out_dir)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    if tensorboard_dir:
        accelerator.end_training()
    return TrainResult(steps=len(history), seconds=time.time() - start, history=history, sharding=sharding)


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any: ranks must agree on where to stop."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


def _checkpoint(accelerator, checkpoint_dir: Path, resume_key: str, history: list[dict]) -> None:
    """Save model + optimizer state to a new folder, then point progress.json at it (atomic)."""
    name = f"step_{len(history):06d}"
    accelerator.save_state(str(checkpoint_dir / name))
    if accelerator.is_main_process:
        atomic_write_json(checkpoint_dir / "progress.json", {"key": resume_key, "state": name, "history": history})
        for old in checkpoint_dir.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator, checkpoint_dir: Path | None, resume_key: str) -> list[dict]:
    """History of the steps already done by an interrupted run with the same key, state restored."""
    progress = checkpoint_dir / "progress.json" if checkpoint_dir else None
    if progress is None or not progress.exists():
        return []
    saved = json.loads(progress.read_text())
    if saved["key"] != resume_key:
        return []
    accelerator.load_state(str(checkpoint_dir / saved["state"]))
    return saved["history"]


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


def _batch_stats(out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs with a decided label (not 0.5): see the `stats` columns in train_dpo."""
    decided = label != 0.5
    a_wins = label > 0.5
    ra, rb = out["reward_a"].detach().cpu(), out["reward_b"].detach().cpu()
    chosen, rejected = torch.where(a_wins, ra, rb), torch.where(a_wins, rb, ra)
    return torch.tensor([out["loss"].detach().sum().item(), ((chosen > rejected) & decided).sum().item(),
                         decided.sum().item(), chosen[decided].sum().item(), rejected[decided].sum().item(),
                         (chosen - rejected)[decided].sum().item()])


def _zero_loss(model) -> torch.Tensor:
    """A loss of 0 that still touches every parameter (keeps ranks in step under DDP)."""
    return sum(p.sum() * 0.0 for p in model.parameters())
