"""LoRA adapters (training.lora) end to end on the tiny model: training in one process, under
2-rank DDP and under ZeRO-2/3, what the policy folder holds, the merged checkpoint, the mid-training
checkpoints (the adapter without its base) and resume, init, and the reference as the policy with
its adapter disabled."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from apo_dist.config import LoraSettings, TrainingConfig, load_config
from apo_dist.context import RunContext
from apo_dist.models import completion_logprobs, is_adapter, load_model
from apo_dist.scoring import sequence_logprobs
from apo_dist.training import TrainingStopped, dpo_loss, train_dpo, with_adapter

from .test_distributed import ACCELERATE, LAUNCHES
from .test_loop import CONFIG, all_labels, run_cli
from .test_training import random_pairs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraSettings(rank=8, alpha=16.0, target_modules=TARGETS)
TCFG = TrainingConfig(beta=0.1, lr=1e-2, epochs=4, batch_size=4, micro_batch_size=2, lora=LORA)


def with_settings(tcfg: TrainingConfig, **changes) -> TrainingConfig:
    return TrainingConfig(**{**vars(tcfg), **changes})


def logprobs(model, pairs: pd.DataFrame, pad_id: int) -> np.ndarray:
    """[2n] log-probs of the pairs' a-completions, then their b-completions."""
    return sequence_logprobs(model, list(pairs["prompt_ids"]) * 2, list(pairs["tokens_a"]) + list(pairs["tokens_b"]),
                             pad_id, progress=False)["logp"].to_numpy()


def pair_samples(pairs: pd.DataFrame) -> pd.DataFrame:
    """The rows `logprobs` scores, as a samples table (prompt_ids, token_ids) for RunContext.logprobs."""
    return pd.DataFrame({"prompt_ids": list(pairs["prompt_ids"]) * 2,
                         "token_ids": list(pairs["tokens_a"]) + list(pairs["tokens_b"])})


def adapter_tensors(policy: Path) -> dict[str, torch.Tensor]:
    return load_file(policy / "adapter_model.safetensors")


def expected_trainable(model, rank: int) -> int:
    """r * (in + out) for every targeted Linear of `model`."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TARGETS)


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tiny_tokenizer):
    return random_pairs(load_model(str(tiny_model_dir)), tiny_tokenizer.pad_token_id, len(tiny_tokenizer))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pairs, tmp_path_factory):
    """One LoRA training from the SFT model (a fresh adapter), with the merged checkpoint."""
    out = tmp_path_factory.mktemp("lora") / "policy"
    tcfg = with_settings(TCFG, lora=LoraSettings(**{**vars(LORA), "save_merged": True}))
    result = train_dpo(pairs, str(tiny_model_dir), out, tcfg, seed=0, progress=False,
                       checkpoint_dir=out.parent / "checkpoint", resume_key="k")
    return out, result


def test_lora_starts_at_the_reference_and_learns(trained, tiny_model_dir):
    _, result = trained
    history = result.history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter: B = 0
    assert abs(history[0]["margin"]) < 1e-6
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["reward_accuracy"] == 1.0
    base = load_model(str(tiny_model_dir))
    assert result.trainable_params == expected_trainable(base, LORA.rank)
    assert result.trainable_params < sum(p.numel() for p in base.parameters()) / 5


def test_policy_folder_holds_the_adapter_alone(trained, tiny_model_dir):
    out, _ = trained
    assert is_adapter(out) and not out.with_name(out.name + ".tmp").exists()
    assert not (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out.parent / "checkpoint").exists()  # mid-training checkpoints removed once saved
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16.0, sorted(TARGETS))
    tensors = adapter_tensors(out)
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in tensors.items())  # trained: B moved from 0
    size = (out / "adapter_model.safetensors").stat().st_size
    assert size < (Path(tiny_model_dir) / "model.safetensors").stat().st_size / 5


def test_merged_checkpoint_scores_like_the_adapter(trained, pairs, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out, _ = trained
    pad = tiny_tokenizer.pad_token_id
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # a plain checkpoint: no peft involved
    assert not is_adapter(out / "merged") and (out / "merged" / "tokenizer.json").exists()
    adapter = logprobs(load_model(str(out)), pairs, pad)
    np.testing.assert_allclose(logprobs(merged, pairs, pad), adapter, atol=1e-4)
    assert np.abs(adapter - logprobs(load_model(str(tiny_model_dir)), pairs, pad)).max() > 1e-2


def test_reference_is_the_policy_with_its_adapter_disabled(trained, pairs, tiny_model_dir, tiny_tokenizer,
                                                           tiny_overrides, tmp_path, monkeypatch):
    """RunContext scores the SFT model with the held LoRA policy's adapter disabled (no second load),
    and still loads any other model asked for (model.reference, here the merged policy)."""
    from apo_dist import context

    out, _ = trained
    loaded = []
    monkeypatch.setattr(context, "load_model", lambda path, *a, **k: loaded.append(path) or load_model(path, *a, **k))
    ctx = RunContext(load_config(CONFIG, [*tiny_overrides, "training.lora.rank=8"]), tmp_path / "run", progress=False)
    samples = pair_samples(pairs)
    policy = ctx.logprobs(str(out), samples)["logp"].to_numpy()
    reference = ctx.logprobs(ctx.sft_path, samples)["logp"].to_numpy()
    assert loaded == [str(out)]
    sft = logprobs(load_model(str(tiny_model_dir)), pairs, tiny_tokenizer.pad_token_id)
    np.testing.assert_array_equal(reference, sft)
    np.testing.assert_allclose(policy, logprobs(load_model(str(out)), pairs, tiny_tokenizer.pad_token_id), rtol=1e-6)
    assert np.abs(policy - reference).max() > 1e-2
    other = ctx.logprobs(str(out / "merged"), samples)["logp"].to_numpy()
    assert loaded == [str(out), str(out / "merged")]
    np.testing.assert_allclose(other, policy, atol=1e-4)


def test_in_bf16_the_reference_and_a_fresh_adapter_score_as_the_sft_model(trained, pairs, tiny_model_dir,
                                                                           tiny_tokenizer, tiny_overrides, tmp_path):
    """Under training.mixed_precision=bf16 (fp32 weights, bf16 autocast) the scorer's reference (the
    held policy with its adapter disabled) and a fresh adapter (the trainer's first step) give the SFT
    model's log-probs exactly, so the first step's DPO margin is 0 as in full fine-tuning."""
    out, _ = trained
    pad = tiny_tokenizer.pad_token_id
    ctx = RunContext(load_config(CONFIG, [*tiny_overrides, "training.lora.rank=8", "training.mixed_precision=bf16"]),
                     tmp_path / "run", progress=False)
    samples = pair_samples(pairs)
    ctx.logprobs(str(out), samples)  # the policy is held
    reference = ctx.logprobs(ctx.sft_path, samples)["logp"].to_numpy()
    sft = load_model(str(tiny_model_dir))
    fp32 = logprobs(sft, pairs, pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = logprobs(sft, pairs, pad)
        fresh = logprobs(with_adapter(load_model(str(tiny_model_dir)), str(tiny_model_dir), str(tiny_model_dir), LORA),
                         pairs, pad)
    assert np.abs(bf16 - fp32).max() > 1e-3  # the precision matters
    np.testing.assert_array_equal(reference, bf16)
    np.testing.assert_array_equal(fresh, bf16)


def tensor_numel(obj) -> int:
    """Elements of the floating-point tensors in `obj` (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() if obj.is_floating_point() else 0
    if isinstance(obj, dict):
        return sum(tensor_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_numel(v) for v in obj)
    return 0


def checkpoint_numel(folder: Path) -> int:
    """Elements of the floating-point tensors in every file under `folder`: the safetensors files and
    the torch pickles (.bin, .pt, .pkl) of Accelerate's and DeepSpeed's checkpoints."""
    files = [f for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pkl")]
    assert files, folder
    return sum(tensor_numel(load_file(f) if f.suffix == ".safetensors" else
                            torch.load(f, map_location="cpu", weights_only=False)) for f in files)


def assert_adapter_only(state: Path, adapter: int) -> None:
    """The checkpoint `state` holds the values of an adapter of `adapter` parameters and AdamW's two
    moments of them (under ZeRO-2 a fourth copy: the module's, beside the optimizer's float32 master),
    plus step counts; a copy of the frozen base (11 x the tiny model's rank-8 adapter) does not fit."""
    assert 3 * adapter <= checkpoint_numel(state) <= 4 * adapter + 64


def checkpoint_state(checkpoint: Path) -> Path:
    """The folder of the state that `checkpoint`/progress.json points at."""
    return checkpoint / json.loads((checkpoint / "progress.json").read_text())["state"]


@pytest.fixture(scope="module")
def stopped(pairs, tiny_model_dir, tmp_path_factory) -> Path:
    """The checkpoint folder of the one-process training of `trained` (TCFG), stopped after step 3."""
    folder = tmp_path_factory.mktemp("stopped")
    stop = folder / "stop"
    with pytest.raises(TrainingStopped):
        train_dpo(pairs, str(tiny_model_dir), folder / "policy", TCFG, seed=0, progress=False,
                  checkpoint_dir=folder / "checkpoint", resume_key="k",
                  on_step=lambda step: step == 3 and stop.touch(), stop_file=stop)
    assert len(json.loads((folder / "checkpoint" / "progress.json").read_text())["history"]) == 3
    return folder / "checkpoint"


def test_lora_checkpoint_holds_the_adapter_not_the_base(stopped, tiny_model_dir):
    """The model file of a LoRA training's checkpoint holds the adapter's tensors alone, and the whole
    checkpoint the adapter, AdamW's two moments of it and its step counts: nothing of the frozen base."""
    adapter = expected_trainable(load_model(str(tiny_model_dir)), LORA.rank)
    model = load_file(checkpoint_state(stopped) / "model.safetensors")
    assert model and all("lora_A" in k or "lora_B" in k for k in model)
    assert sum(t.numel() for t in model.values()) == adapter
    assert checkpoint_numel(stopped) == 3 * adapter + len(model)  # + AdamW's step count per tensor


def test_stopped_then_resumed_training_ends_with_the_same_adapter(trained, stopped, pairs, tiny_model_dir, tmp_path):
    """Resumed from the checkpoint after step 3 (base from the SFT model, adapter and optimizer from
    the checkpoint): the same steps and adapter as the uninterrupted training."""
    out, result = trained
    checkpoint = shutil.copytree(stopped, tmp_path / "checkpoint")
    again = tmp_path / "policy"
    steps = []
    resumed = train_dpo(pairs, str(tiny_model_dir), again, TCFG, seed=0, progress=False, checkpoint_dir=checkpoint,
                        resume_key="k", on_step=steps.append, stop_file=tmp_path / "stop")
    assert steps == list(range(4, len(result.history) + 1))  # resumed, not started again
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in result.history]
    a, b = adapter_tensors(out), adapter_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_that_lacks_an_adapter_tensor(stopped, pairs, tiny_model_dir, tmp_path):
    """A checkpoint whose model file lost one of the adapter's tensors fails the resume, naming it
    (loading the rest would silently train on from that tensor's fresh value)."""
    checkpoint = shutil.copytree(stopped, tmp_path / "checkpoint")
    model_file = checkpoint_state(checkpoint) / "model.safetensors"
    tensors = load_file(model_file)
    lost = sorted(k for k in tensors if "lora_B" in k)[0]
    save_file({k: v for k, v in tensors.items() if k != lost}, model_file)
    with pytest.raises(RuntimeError, match=re.escape(lost)):
        train_dpo(pairs, str(tiny_model_dir), tmp_path / "policy", TCFG, seed=0, progress=False,
                  checkpoint_dir=checkpoint, resume_key="k")


STOP_AND_RESUME = """
import json, os, pickle, shutil, sys
from pathlib import Path
from apo_dist.distributed import exit_rank
from apo_dist.training import TrainingStopped, train_dpo

model, out = sys.argv[1], Path(sys.argv[2])
pairs, tcfg = pickle.loads((out / "inputs.pkl").read_bytes())
stop = out / "stop"
try:
    train_dpo(pairs, model, out / "policy", tcfg, seed=0, progress=False, checkpoint_dir=out / "checkpoint",
              resume_key="k", on_step=lambda step: step == 3 and stop.touch(), stop_file=stop)
    raise SystemExit("not stopped")
except TrainingStopped:
    pass
if int(os.environ["RANK"]) == 0:
    shutil.copytree(out / "checkpoint", out / "stopped")  # save_policy removes the checkpoint
steps = []
train_dpo(pairs, model, out / "policy", tcfg, seed=0, progress=False, checkpoint_dir=out / "checkpoint", resume_key="k",
          on_step=steps.append)
(out / f"resumed_steps_{os.environ['RANK']}.json").write_text(json.dumps(steps))
exit_rank()
"""


@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_launched_lora_training_stops_and_resumes_from_its_adapter(launch, trained, pairs, tiny_model_dir, tmp_path):
    """2 DDP or ZeRO-2 ranks stopped after step 3, then resumed in the same processes: the
    checkpoint holds the adapter and its optimizer state alone, and the adapter ends as in the
    uninterrupted one-process training."""
    config = {"ddp": "cpu_2proc.yaml", "zero2": "zero2.yaml"}[launch]
    (tmp_path / "inputs.pkl").write_bytes(pickle.dumps((pairs, TCFG)))
    (tmp_path / "train.py").write_text(STOP_AND_RESUME)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    if launch == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # as the coordinator launches DDP on CPUs (cluster/local.py)
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
                          "--num_processes", "2", "--num_cpu_threads_per_process", "1", "--dynamo_backend", "no",
                          "--mixed_precision", "no", str(tmp_path / "train.py"), str(tiny_model_dir), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed_steps = list(range(4, len(trained[1].history) + 1))  # resumed, not started again
    assert [json.loads((tmp_path / f"resumed_steps_{rank}.json").read_text()) for rank in (0, 1)] == [resumed_steps] * 2
    assert_adapter_only(checkpoint_state(tmp_path / "stopped"), expected_trainable(load_model(str(tiny_model_dir)), 8))
    a, b = adapter_tensors(trained[0]), adapter_tensors(tmp_path / "policy")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3, msg=f"{launch} {k}")


def test_init_previous_continues_the_adapter(trained, pairs, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Training from an adapter folder continues that adapter: its first step's loss is the trained
    adapter's on the first batch, and the new adapter is still on the SFT model."""
    out, _ = trained
    tcfg = with_settings(TCFG, epochs=1)
    result = train_dpo(pairs, str(out), tmp_path / "next", tcfg, seed=1, progress=False)
    first = pairs.iloc[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))[:4].tolist()]
    logp, _, _ = completion_logprobs(load_model(str(out)), list(first["prompt_ids"]) * 2,
                                     list(first["tokens_a"]) + list(first["tokens_b"]), tiny_tokenizer.pad_token_id)
    as_tensor = lambda col: torch.tensor(first[col].values, dtype=torch.float32)  # noqa: E731
    loss = dpo_loss(logp[:4], logp[4:], as_tensor("ref_logp_a"), as_tensor("ref_logp_b"), as_tensor("label"),
                    tcfg.beta)["loss"].mean().item()
    assert loss < math.log(2) - 0.05
    assert result.history[0]["loss"] == pytest.approx(loss, rel=1e-5)
    config = json.loads((tmp_path / "next" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert not (tmp_path / "next" / "merged").exists()  # save_merged is off here


# ---- whole runs: one process, ZeRO-3 and DDP launches (generation.backend=hf) ----

def longer_completion(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
    """A labeller that decides nearly every pair (the sentiment oracle ties most of the tiny
    model's): the longer text wins."""
    return [0.5 if len(x) == len(y) else float(len(x) > len(y)) for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def base(tiny_overrides) -> list[str]:
    # micro batch 1 x 2 ranks x accumulation 2 = the effective batch of 4 in every launch
    return [*tiny_overrides, "acquisition.function=certainty", "training.micro_batch_size=1", "training.lr=1e-2",
            "oracle.kind=custom", "oracle.function=tests.test_lora:longer_completion", "generation.backend=hf",
            "training.lora.rank=8", f"training.lora.target_modules=[{','.join(TARGETS)}]"]


def run(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    assert run_cli(run_dir, overrides) == 0, (run_dir / "round_0000" / "logs")
    return run_dir


def train_log(run_dir: Path, r: int) -> list[dict]:
    return [json.loads(x) for x in (run_dir / f"round_{r:04d}" / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, base) -> Path:
    return run(tmp_path_factory, "single", base)


def test_lora_run_in_one_process(single, tiny_model_dir, tiny_tokenizer):
    """Two rounds: each round's policy is an adapter trained from a fresh one (init=sft), and round 1
    scores its reference (the SFT model) with that adapter disabled."""
    for r in (0, 1):
        policy = single / f"round_{r:04d}" / "policy"
        assert is_adapter(policy) and not (policy / "model.safetensors").exists()
        assert any("lora_B" in k and t.abs().max() > 0 for k, t in adapter_tensors(policy).items())
        first = train_log(single, r)[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(first["margin"]) < 1e-5
    metrics = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["stage"] == "train"]
    expected = expected_trainable(load_model(str(tiny_model_dir)), 8)
    assert [m["trainable_params"] for m in train] == [expected, expected]
    scores = pd.read_parquet(single / "round_0001" / "scores.parquet")
    sft = logprobs(load_model(str(tiny_model_dir)), scores, tiny_tokenizer.pad_token_id)
    n = len(scores)
    np.testing.assert_allclose(scores["ref_logp_a"], sft[:n], rtol=1e-6)
    np.testing.assert_allclose(scores["ref_logp_b"], sft[n:], rtol=1e-6)
    assert np.abs(scores["policy_logp_a"] - scores["ref_logp_a"]).max() > 1e-3
    evals = [json.loads((single / f"round_{r:04d}" / "eval.json").read_text()) for r in (0, 1)]
    assert all(0 <= e["win_rate"] <= 1 and e["kl"] > 0 for e in evals)


def sharding(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "logs" / f"sharding_rank_{rank}.jsonl").read_text().splitlines()]


def assert_same_scores(run_dir: Path, single: Path, r: int, what: str) -> None:
    a = pd.read_parquet(single / f"round_{r:04d}" / "scores.parquet")
    b = pd.read_parquet(run_dir / f"round_{r:04d}" / "scores.parquet")
    assert list(a["pair_id"]) == list(b["pair_id"])
    for col in ("policy_logp_a", "policy_logp_b", "ref_logp_a", "ref_logp_b"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, err_msg=f"{what} round {r} {col}")


def assert_same_adapter(run_dir: Path, single: Path, r: int, what: str) -> None:
    """The launched run saved the adapter alone, with the one-process run's values."""
    policy = run_dir / f"round_{r:04d}" / "policy"
    assert is_adapter(policy) and not (policy / "model.safetensors").exists()
    a = adapter_tensors(single / f"round_{r:04d}" / "policy")
    b = adapter_tensors(policy)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3, msg=f"{what} round {r} {k}")


def test_zero3_lora_run_matches_one_process(tmp_path_factory, base, single, tiny_model_dir):
    """Scoring and training both as 2 ZeRO-3 ranks, round 1's training killed after step 2 and
    resumed from its checkpoint: the same scores, labels, losses and adapters (gathered, not the
    ranks' empty shards); the scoring ranks load each model once, the round-1 reference being the
    loaded policy with its adapter disabled."""
    overrides = [*base, *LAUNCHES["zero3"], "launcher.scoring_processes=2", "launcher.training_processes=2",
                 "training.checkpoint_every_steps=1"]
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    assert run_cli(run_dir, overrides, fault="1:train:step2") == 5  # both ranks killed: the stage failed
    checkpoint = run_dir / "round_0001" / "train_checkpoint"
    assert len(json.loads((checkpoint / "progress.json").read_text())["history"]) == 2
    assert_adapter_only(checkpoint_state(checkpoint), expected_trainable(load_model(str(tiny_model_dir)), 8))
    assert run_cli(run_dir, overrides) == 0
    for r in (0, 1):
        assert_same_scores(run_dir, single, r, "zero3")
        np.testing.assert_allclose([h["loss"] for h in train_log(run_dir, r)],
                                   [h["loss"] for h in train_log(single, r)], atol=2e-4)
        assert_same_adapter(run_dir, single, r, "zero3")
    pd.testing.assert_frame_equal(all_labels(run_dir), all_labels(single))
    adapter0 = str(run_dir / "round_0000" / "policy")
    for rank in (0, 1):
        reports = sharding(run_dir, rank)
        scoring = [x["model"] for x in reports if not x["model"].endswith("(training)")]
        assert scoring == [str(tiny_model_dir), adapter0]
        assert all(x["materialised_numel"] == 0 for x in reports)  # partitioned, adapter included


def test_ddp_lora_run_continues_the_previous_adapter(tmp_path_factory, base, single, tiny_model_dir):
    """Training as 2 DDP ranks with training.init=previous: round 0 (from the SFT model, as
    init=sft) matches the one-process run; round 1 trains on from round 0's adapter."""
    run_dir = run(tmp_path_factory, "ddp", [*base, *LAUNCHES["ddp"], "launcher.training_processes=2",
                                            "training.init=previous"])
    assert_same_scores(run_dir, single, 0, "ddp")
    np.testing.assert_allclose([h["loss"] for h in train_log(run_dir, 0)],
                               [h["loss"] for h in train_log(single, 0)], atol=2e-4)
    assert_same_adapter(run_dir, single, 0, "ddp")
    assert_same_scores(run_dir, single, 1, "ddp")  # round 1 samples and scores with round 0's adapter
    adapter0 = run_dir / "round_0000" / "policy"
    training = [x["model"] for x in sharding(run_dir, 0) if x["model"].endswith("(training)")]
    assert training == [f"{tiny_model_dir} (training)", f"{adapter0} (training)"]
    adapter1 = run_dir / "round_0001" / "policy"
    assert json.loads((adapter1 / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(tiny_model_dir).resolve())
    a, b = adapter_tensors(adapter0), adapter_tensors(adapter1)
    assert any(not torch.equal(a[k], b[k]) for k in a)

