"""Multi-process plumbing shared by scoring and training: process group, sharding, ZeRO-3 models.

Both stages run unchanged in one process or under `accelerate launch` (DDP or DeepSpeed ZeRO,
one node or many). Without CUDA the process group uses gloo, so the same launch works on CPUs.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch


def init_distributed(timeout_s: float = 600):
    """The process group for this process (a no-op state when not launched distributed).

    Collective operations time out after `timeout_s`, so a dead rank fails the stage instead of
    hanging it. Must run before any `Accelerator` is made.
    """
    from accelerate import PartialState

    if deepspeed_enabled():
        import deepspeed.ops

        # The shared-memory comm op compiles for a minute on first use and only helps on one node.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cpu = not torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return PartialState(cpu=cpu)
    timeout = timedelta(seconds=timeout_s)
    if deepspeed_enabled():  # DeepSpeed makes the group itself; on CPUs it must be told gloo
        return PartialState(backend="gloo" if cpu else None, timeout=timeout)
    return PartialState(cpu=cpu, timeout=timeout)  # DDP; Accelerate picks gloo on CPUs


def exit_rank() -> NoReturn:
    """End a rank whose work is done: wait for every rank, take the process group down and leave
    (exit 0) without the interpreter's teardown. Left to the teardown, gloo's and DeepSpeed's native
    threads can abort a finished rank (SIGABRT, "terminate called without an active exception"),
    failing a stage whose outputs are all written."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def deepspeed_enabled() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def zero_stage() -> int:
    """The ZeRO stage the launch asked for (0 when DeepSpeed is off)."""
    if not deepspeed_enabled():
        return 0
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "None":
        return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
    return 0


def shard_by_tokens(lengths: np.ndarray, world: int) -> list[np.ndarray]:
    """Split row indices into `world` shards of near-equal total tokens (longest first, to the
    lightest shard). Each shard is returned sorted by length, ready for length-bucketed batches."""
    loads = np.zeros(world)
    shards: list[list[int]] = [[] for _ in range(world)]
    for i in np.argsort(-lengths, kind="stable"):
        k = int(np.argmin(loads))
        shards[k].append(int(i))
        loads[k] += lengths[i]
    return [np.array(sorted(s, key=lambda i: (lengths[i], i)), dtype=np.int64) for s in shards]


def zero3_inference_model(path: str, dtype: str, world: int):
    """Load a frozen model in `dtype` (a models.DTYPES name) partitioned across ranks with ZeRO-3
    (parameters gathered per layer during the forward pass). Every rank must call forward the same
    number of times. An adapter folder gives its base model with the adapter attached, both
    partitioned (models.load_model). DeepSpeed places it; it must agree with devices.process_device."""
    import deepspeed

    from .devices import check_placement
    from .models import load_model
    from transformers.integrations import HfDeepSpeedConfig

    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": 1, "train_batch_size": world,
              "bf16": {"enabled": dtype == "bfloat16"}}
    keep = HfDeepSpeedConfig(config)  # noqa: F841 -- makes from_pretrained load partitioned
    model = load_model(path, dtype)  # an adapter's own weights are partitioned by deepspeed.initialize
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return check_placement(engine.module, f"the ZeRO-3 inference model {path}")


def sharding_report(model) -> dict:
    """How much of `model` this rank holds: evidence that ZeRO-3 partitioned it."""
    params = list(model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    materialised = sum(p.numel() for p in params)
    return {"full_numel": int(full), "local_numel": int(local), "materialised_numel": int(materialised)}


def load_training_model(path: str):
    """The fp32 model at `path`, to train under the Accelerator made before it.

    Under ZeRO-3 it is built partitioned (in accelerate's zero3 init context, whatever the launch's
    zero3_init_flag): from_pretrained creates each layer inside deepspeed.zero.Init, so a rank
    allocates only its share, and rank 0 copies the checkpoint in layer by layer. Otherwise the
    full model, on the CPU: accelerator.prepare places it."""
    from .models import load_model

    if zero_stage() != 3:
        return load_model(path, "float32", device="cpu")
    from accelerate.state import AcceleratorState

    with AcceleratorState().deepspeed_plugin.zero3_init_context_manager(enable=True):
        return load_model(path, "float32")  # on devices.process_device, where DeepSpeed keeps the partitions
