"""Where this process's models live, decided in one place, and which devices a stage's models used.

Every model a stage uses is placed on `process_device()` (generation, scoring, evaluation, the
reward-model oracle) or checked against it where a library places it (Accelerate for training,
DeepSpeed for ZeRO-3 inference). `note` records the device a model's parameters actually sit on;
the engine collects the noted devices after each stage (`take_noted`) into its metrics line.
"""
from __future__ import annotations

import os

import torch

_noted: set[str] = set()


def process_device() -> torch.device:
    """This process's device: under `accelerate launch`/torchrun (LOCAL_RANK set) the local rank's GPU
    (modulo the visible GPUs, for one GPU per process), else the first visible GPU, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local_rank) % torch.cuda.device_count() if local_rank else 0)


def model_device(model) -> torch.device:
    """The device `model`'s parameters sit on (read from them; under ZeRO-3, this rank's partition)."""
    return next(model.parameters()).device


def note(model):
    """Record the device `model` sits on as used by the current stage; returns the model."""
    _noted.add(str(model_device(model)))
    return model


def take_noted() -> str | list[str] | None:
    """The devices noted since the last call (one as a string, several as a sorted list, none as
    None), forgetting them."""
    found = sorted(_noted)
    _noted.clear()
    return found[0] if len(found) == 1 else (found or None)


def check_placement(model, what: str):
    """Raise unless `model` sits on `process_device()` (where a library placed it); returns the model."""
    where, want = model_device(model), process_device()
    if where != want:
        raise RuntimeError(f"{what} sits on {where}, but this process's device is {want} "
                           f"(apo_dist.devices.process_device: LOCAL_RANK={os.environ.get('LOCAL_RANK')}, "
                           f"CUDA available: {torch.cuda.is_available()}); the launcher and the placement disagree")
    return model
