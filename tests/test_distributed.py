"""Scoring and training as real 2-process `accelerate launch` jobs over gloo: DDP, ZeRO-2, ZeRO-3.

Each configuration runs the tiny model end to end once (module fixtures); the tests compare its
tables, training logs and checkpoints with the same run done in one process.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from apo_dist.distributed import shard_by_tokens

from .test_loop import all_labels, run_cli

ACCELERATE = Path(__file__).parent.parent / "launch" / "accelerate"
LAUNCHES = {
    "ddp": ["launcher.accelerate_config=" + str(ACCELERATE / "cpu_2proc.yaml")],
    "zero2": ["launcher.accelerate_config=" + str(ACCELERATE / "zero2.yaml")],
    "zero3": ["launcher.accelerate_config=" + str(ACCELERATE / "zero3.yaml")],
}


@pytest.fixture(scope="module")
def base(tiny_overrides) -> list[str]:
    # micro batch 1 x 2 ranks x accumulation 2 = the effective batch of 4 in every launch
    return [*tiny_overrides, "acquisition.function=certainty", "training.micro_batch_size=1",
            "loop.num_threads=1"]


def run(tmp_path_factory, base, name: str, extra: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    assert run_cli(run_dir, [*base, *extra]) == 0, (run_dir / "round_0000" / "logs")
    return run_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory, base) -> Path:
    return run(tmp_path_factory, base, "single", [])


@pytest.fixture(scope="module", params=list(LAUNCHES))
def launched(request, tmp_path_factory, base) -> tuple[str, Path]:
    name = request.param
    return name, run(tmp_path_factory, base, name, [*LAUNCHES[name], "launcher.scoring_processes=2",
                                                    "launcher.training_processes=2"])


def sharding(run_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run_dir / "logs").glob("sharding_rank_*.jsonl"))
            for line in p.read_text().splitlines()]


def test_shards_balance_tokens_not_rows():
    lengths = np.array([100, 1, 1, 1, 1, 1, 1, 1, 1, 1, 50, 50])
    shards = shard_by_tokens(lengths, 2)
    assert sorted(np.concatenate(shards).tolist()) == list(range(12))
    loads = [lengths[s].sum() for s in shards]
    assert abs(loads[0] - loads[1]) <= 1
    assert all(list(lengths[s]) == sorted(lengths[s]) for s in shards)  # length-bucketed order


def test_two_process_round_matches_one_process(launched, single):
    name, run_dir = launched
    for r in (0, 1):
        a = pd.read_parquet(single / f"round_{r:04d}" / "scores.parquet")
        b = pd.read_parquet(run_dir / f"round_{r:04d}" / "scores.parquet")
        assert list(a["pair_id"]) == list(b["pair_id"])  # merged back in the original row order
        for col in ("policy_logp_a", "policy_logp_b", "ref_logp_a", "ref_logp_b"):
            np.testing.assert_allclose(b[col], a[col], rtol=1e-4, err_msg=f"{name} {col}")
    # The same labels were bought, and training followed the same loss trajectory.
    pd.testing.assert_frame_equal(all_labels(run_dir), all_labels(single))
    for r in (0, 1):
        la = [json.loads(x)["loss"] for x in (single / f"round_{r:04d}" / "train_log.jsonl").read_text().splitlines()]
        lb = [json.loads(x)["loss"] for x in (run_dir / f"round_{r:04d}" / "train_log.jsonl").read_text().splitlines()]
        np.testing.assert_allclose(lb, la, atol=2e-4, err_msg=name)


def test_consolidated_checkpoint_loads_and_matches(launched, single):
    from transformers import AutoModelForCausalLM

    name, run_dir = launched
    ours = AutoModelForCausalLM.from_pretrained(run_dir / "round_0001" / "policy").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(single / "round_0001" / "policy").state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=2e-4, rtol=1e-3, msg=f"{name} {k}")


def test_stage_logs_are_in_the_round_folder(launched):
    name, run_dir = launched
    for stage in ("scores", "train"):
        log = (run_dir / "round_0001" / "logs" / f"{stage}.log").read_text()
        assert "apo_dist.cluster.worker" in log and "--num_processes 2" in log


def test_zero3_partitions_every_model(launched):
    name, run_dir = launched
    reports = sharding(run_dir)
    assert {r["world"] for r in reports} == {2}
    if name != "zero3":
        assert all(r["local_numel"] == r["full_numel"] for r in reports)  # replicated
        return
    training = [r for r in reports if r["model"].endswith("(training)")]
    scoring = [r for r in reports if not r["model"].endswith("(training)")]
    assert len({r["model"] for r in scoring}) == 2  # policy and reference (round 1)
    for r in training + scoring:
        assert r["materialised_numel"] == 0, r  # p.numel() == 0 on each rank
        assert abs(r["local_numel"] - r["full_numel"] / 2) <= 64 * 16, r  # half, up to per-tensor padding


def test_failing_rank_fails_the_stage_with_its_error(tmp_path, base, capfd):
    run_dir = tmp_path / "run"
    code = run_cli(run_dir, [*base, *LAUNCHES["ddp"], "launcher.training_processes=2", "loop.rounds=1",
                             "launcher.collective_timeout_s=60"], fault="0:train:step1@1")
    assert code == 5
    err = capfd.readouterr().err
    assert "stage failed" in err and "train" in err and "exitcode" in err


def test_killed_training_resumes_from_its_checkpoint(tmp_path, base, single):
    """Killed after step 3 of round 1 (checkpoints every 2 steps): resumes from step 2."""
    run_dir = tmp_path / "run"
    extra = ["training.checkpoint_every_steps=2"]
    assert run_cli(run_dir, [*base, *extra], fault="1:train:step3") == -9
    progress = json.loads((run_dir / "round_0001" / "train_checkpoint" / "progress.json").read_text())
    assert len(progress["history"]) == 2
    assert run_cli(run_dir, [*base, *extra]) == 0
    assert not (run_dir / "round_0001" / "train_checkpoint").exists()
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(run_dir / "round_0001" / "policy").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(single / "round_0001" / "policy").state_dict()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-4)
    log = [json.loads(x) for x in (run_dir / "round_0001" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == len((single / "round_0001" / "train_log.jsonl").read_text().splitlines())


LOAD_FOR_TRAINING = """
import json, sys
from pathlib import Path
import deepspeed
from accelerate import Accelerator
from apo_dist.distributed import exit_rank, init_distributed, load_training_model, sharding_report

init_distributed()
accelerator = Accelerator()
model = load_training_model(sys.argv[1])
report = sharding_report(model)
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    report["sums"] = {name: p.double().sum().item() for name, p in model.named_parameters()}
# a file per rank: two ranks printing long lines to one pipe can interleave them
Path(sys.argv[2], f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
exit_rank()
"""


def test_zero3_training_model_is_partitioned_from_the_load(tmp_path, tiny_model_dir):
    """Under ZeRO-3 the model to train is built partitioned, even when the launch turns
    zero3_init_flag off: right after the load no rank holds a parameter, each holds half, and the
    gathered parameters are the checkpoint's on every rank."""
    import subprocess
    import sys

    import yaml
    from transformers import AutoModelForCausalLM

    config = yaml.safe_load((ACCELERATE / "zero3.yaml").read_text())
    config["deepspeed_config"]["zero3_init_flag"] = False
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "load.py").write_text(LOAD_FOR_TRAINING)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
              "--num_processes", "2"]
    out = subprocess.run([*launch, str(tmp_path / "load.py"), str(tiny_model_dir), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    checkpoint = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = {name: p.double().sum().item() for name, p in checkpoint.named_parameters()}
    for r in reports:
        assert r["materialised_numel"] == 0, r
        assert abs(r["local_numel"] - r["full_numel"] / 2) <= 64 * 16, r
        assert r["sums"].keys() == expected.keys()
        np.testing.assert_allclose([r["sums"][k] for k in expected], list(expected.values()), rtol=1e-6, atol=1e-6)


def test_killed_zero3_training_resumes_to_the_same_policy(tmp_path, base, single):
    """ZeRO-3 ranks killed after step 2 of round 1 (checkpoints every step) resume from their
    checkpoint, with the memory limits on DeepSpeed's gathered parameters (training.py), and save
    the policy of the uninterrupted one-process run."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    overrides = [*base, *LAUNCHES["zero3"], "launcher.training_processes=2", "training.checkpoint_every_steps=1"]
    assert run_cli(run_dir, overrides, fault="1:train:step2") == 5  # both ranks killed: the stage failed
    assert run_cli(run_dir, overrides) == 0
    ours = AutoModelForCausalLM.from_pretrained(run_dir / "round_0001" / "policy").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(single / "round_0001" / "policy").state_dict()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=2e-4, rtol=1e-3, msg=k)
