"""Device placement is decided in one place (devices.process_device): every model-acquiring path puts
its model there, and every stage that uses a model records where it sat in its metrics line."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from apo_dist import devices
from apo_dist.config import load_config
from apo_dist.loop import run
from apo_dist.rundir import RunDir

CONFIG = Path(__file__).parent.parent / "configs" / "test_tiny.yaml"
ACCELERATE = Path(__file__).parent.parent / "launch" / "accelerate"
MODEL_STAGES = {"eval_reference", "entropy_samples", "entropy", "samples", "scores", "train", "eval"}


def test_process_device_decision(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.process_device() == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.process_device() == torch.device("cpu")  # a CPU launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK")
    assert devices.process_device() == torch.device("cuda", 0)  # the coordinator: first visible GPU
    for rank, index in (("0", 0), ("2", 2), ("5", 1)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert devices.process_device() == torch.device("cuda", index)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible per process
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.process_device() == torch.device("cuda", 0)


def stage_devices(run_dir: Path) -> dict[str, object]:
    return {(m["round"], m["stage"]): m.get("device") for m in RunDir(run_dir).read_metrics()}


def test_every_model_stage_records_the_process_device(tmp_path, tiny_overrides):
    cfg = load_config(CONFIG, [*tiny_overrides, "acquisition.function=hybrid", "loop.rounds=1"])
    run(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    found = stage_devices(tmp_path / "run")
    assert {stage for _, stage in found} >= MODEL_STAGES
    want = str(devices.process_device())
    for (r, stage), device in found.items():
        assert device == (want if stage in MODEL_STAGES else None), (r, stage, device)


def test_launched_stages_record_rank_zeros_device(tmp_path, tiny_overrides):
    cfg = load_config(CONFIG, [*tiny_overrides, "acquisition.function=hybrid", "loop.rounds=1",
                               "training.micro_batch_size=1", f"launcher.accelerate_config={ACCELERATE / 'cpu_2proc.yaml'}",
                               "launcher.scoring_processes=2", "launcher.training_processes=2"])
    run(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    found = stage_devices(tmp_path / "run")
    for stage in ("entropy", "scores", "train"):  # from <round>/logs/STAGE.metrics.json
        assert (tmp_path / "run" / "round_0000" / "logs" / f"{stage}.metrics.json").exists()
        assert found[(0, stage)] == str(devices.process_device()), stage


@pytest.fixture
def meta_device(monkeypatch):
    """process_device() redirected to the meta device, in apo_dist.devices and wherever a module of
    the package imported it by name: a path that places its model anywhere else lands on the CPU."""
    meta = torch.device("meta")
    original = devices.process_device
    for name, module in list(sys.modules.items()):
        if name.startswith("apo_dist") and getattr(module, "process_device", None) is original:
            monkeypatch.setattr(module, "process_device", lambda: meta)
    devices.take_noted()
    yield meta
    devices.take_noted()


def test_every_model_path_places_on_the_process_device(meta_device, tmp_path, tiny_model_dir, tiny_overrides):
    """No compute runs: the models are only loaded (onto meta) and their parameters inspected."""
    from apo_dist.context import RunContext
    from apo_dist.generation.backends import make_backend
    from apo_dist.oracles.reward_model import RewardModelOracle
    from apo_dist.training import setup_training

    cfg = load_config(CONFIG, tiny_overrides)
    ctx = RunContext(cfg, tmp_path / "run", progress=False)
    # generation (hf: the backend loads through ctx.model), scoring and evaluation
    assert make_backend(cfg.generation, cfg.model.dtype, ctx.model, ctx.tokenizer, tmp_path).load == ctx.model
    for dtype in (None, "float32", "bfloat16"):
        assert devices.model_device(ctx.model(str(tiny_model_dir), dtype)) == meta_device
    assert devices.take_noted() == "meta"

    oracle = RewardModelOracle(str(tiny_model_dir))
    assert devices.model_device(oracle._load()) == meta_device
    assert devices.take_noted() == "meta"

    # Accelerate places the policy on the CPU here: the check refuses a policy off process_device().
    with pytest.raises(RuntimeError, match=r"policy Accelerate prepared.*sits on cpu.*device is meta"):
        setup_training(str(tiny_model_dir), cfg.training, seed=0)
    # ZeRO-3 inference models are placed by DeepSpeed and checked the same way
    with pytest.raises(RuntimeError, match="sits on cpu"):
        devices.check_placement(torch.nn.Linear(2, 2), "a model")
