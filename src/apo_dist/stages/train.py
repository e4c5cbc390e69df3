"""Training: DPO on every label so far, from the SFT weights (the paper) or the last policy."""
from __future__ import annotations

import json

import pandas as pd

from ..context import RunContext
from ..faults import fault_point
from ..training import train_dpo


def train(ctx: RunContext, r: int) -> tuple[dict, dict]:
    """policy (an HF checkpoint, written by rank 0 inside train_dpo; with training.lora a LoRA adapter
    on the SFT model) and train_log (one line per step).

    With LoRA, init=sft starts every round from a fresh adapter; init=previous continues the last
    round's adapter (round 0's previous policy is the SFT model itself: a fresh adapter)."""
    cfg, rd = ctx.cfg, ctx.rd
    pairs = pd.concat([rd.table("labels", q) for q in range(r + 1)], ignore_index=True)
    init = ctx.sft_path if cfg.training.init == "sft" else ctx.policy_path(r)
    ctx.release_model()  # free memory before training
    tensorboard = str(rd.root / "tensorboard" / rd.round_dir(r).name) if cfg.loop.tensorboard else None
    # A checkpoint is reused only by a restart on the same labels and starting weights.
    resume_key = json.dumps([init, [rd.manifest_digest(rd.round_dir(q), "labels") for q in range(r + 1)]])
    result = train_dpo(pairs, init, rd.path("policy", r), cfg.training, seed=ctx.seed(r, "train"),
                       progress=ctx.progress, tensorboard_dir=tensorboard,
                       checkpoint_dir=rd.round_dir(r) / "train_checkpoint", resume_key=resume_key,
                       on_step=lambda step: fault_point(r, "train", f"step{step}"), stop_file=rd.stop_path)
    if ctx.worker:
        ctx.log_sharding(f"{init} (training)", result.sharding)
    last = result.history[-1]
    return {"train_log": result.history}, {
        "pairs": len(pairs), "steps": result.steps, "trainable_params": result.trainable_params,
        "train_seconds": round(result.seconds, 2),
        "pairs_per_second": round(len(pairs) * cfg.training.epochs / result.seconds, 3),
        "final_loss": last["loss"], "final_reward_accuracy": last["reward_accuracy"]}
