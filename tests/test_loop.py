"""End to end: the coordinator on a tiny model, kills at every stage, corrupted outputs, resume rules.

Runs are executed in forked child processes so that a SIGKILL (the APO_DIST_FAULT hook) kills
only the child, exactly as `kill -9` would kill `apo-dist run`.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from apo_dist.cli import main

CONFIG = str(Path(__file__).parent.parent / "configs" / "test_tiny.yaml")
STAGES = ["pool", "entropy_samples", "entropy", "samples", "scores", "acquired", "labels", "train", "eval"]


def _child(args: list[str], fault: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    if fault:
        os.environ["APO_DIST_FAULT"] = fault
    os._exit(main(args))


def run_cli(run_dir: Path, overrides: list[str], fault: str | None = None) -> int:
    """Run `apo-dist run` in a forked child; returns its exit code (-9 when killed)."""
    proc = mp.get_context("fork").Process(
        target=_child, args=(["run", CONFIG, "--run-dir", str(run_dir), "--no-progress", *overrides], fault))
    proc.start()
    proc.join(600)
    return proc.exitcode


def all_labels(run_dir: Path) -> pd.DataFrame:
    tables = [pd.read_parquet(p).assign(round=p.parent.name) for p in sorted(run_dir.glob("round_*/labels.parquet"))]
    return pd.concat(tables, ignore_index=True)[["round", "prompt_id", "completion_a", "completion_b", "label"]]


def request_counts(run_dir: Path) -> dict[str, int]:
    with sqlite3.connect(run_dir / "labels.sqlite") as db:
        return dict(db.execute("SELECT key, COUNT(*) FROM requests GROUP BY key").fetchall())


def eval_results(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("round_*/eval.json"))]


@pytest.fixture(scope="module")
def hybrid(tiny_overrides) -> list[str]:
    return [*tiny_overrides, "acquisition.function=hybrid"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, hybrid) -> Path:
    """One uninterrupted hybrid run that the interrupted ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(run_dir, hybrid) == 0
    return run_dir


def test_run_writes_every_table_report_and_plot(reference_run):
    for r in (0, 1):
        rd = reference_run / f"round_{r:04d}"
        for name in ("pool.parquet", "entropy_samples.parquet", "entropy.parquet", "samples.parquet",
                     "scores.parquet", "acquired.parquet", "labels.parquet", "eval.json"):
            assert (rd / name).exists(), name
        assert (rd / "policy" / "model.safetensors").exists()
    labels = all_labels(reference_run)
    assert len(labels) == 16 and labels["prompt_id"].is_unique  # 8 per round, no prompt acquired twice
    results = eval_results(reference_run)
    assert [e["labels"] for e in results] == [8, 16]
    assert all(0 <= e["win_rate"] <= 1 and e["n"] == 24 for e in results)
    assert (reference_run / "report.md").read_text().count("\n| ") >= 2
    assert (reference_run / "winrate.png").stat().st_size > 1000
    assert set(request_counts(reference_run).values()) == {1}
    stages = [(m["round"], m["stage"]) for m in map(json.loads, (reference_run / "metrics.jsonl").read_text().splitlines())]
    assert stages[:2] == [("run", "prompts"), ("run", "eval_reference")]
    assert [s for r, s in stages if r == 1] == STAGES


def test_entropy_selection_feeds_pair_generation(reference_run):
    rd = reference_run / "round_0001"
    entropy = pd.read_parquet(rd / "entropy.parquet")
    # hybrid: f_p * f_g * M = 2 * 2 * 8 prompts, the top f_g * M = 16 by entropy get a pair each
    assert len(entropy) == 32 and entropy["selected"].sum() == 16
    threshold = entropy.loc[entropy["selected"], "entropy"].min()
    assert (entropy.loc[~entropy["selected"], "entropy"] <= threshold).all()
    scores = pd.read_parquet(rd / "scores.parquet")
    assert set(scores["prompt_id"]) == set(entropy.loc[entropy["selected"], "prompt_id"])
    acquired = pd.read_parquet(rd / "acquired.parquet")
    assert acquired["certainty"].min() >= scores["certainty"].nlargest(8).min() - 1e-12


def test_rerun_of_finished_run_is_a_no_op(reference_run, hybrid):
    before = request_counts(reference_run)
    manifests = {p: p.read_text() for p in reference_run.rglob(".*.manifest.json")}
    assert run_cli(reference_run, hybrid) == 0
    assert request_counts(reference_run) == before
    assert {p: p.read_text() for p in reference_run.rglob(".*.manifest.json")} == manifests


@pytest.mark.parametrize("fault", [f"1:{s}:start" for s in STAGES] + ["run:prompts:end", "0:samples:end",
                                   "0:labels:mid", "1:labels:mid", "1:train:end", "1:eval:end"])
def test_killed_run_resumes_to_same_labels_without_repeated_requests(tmp_path, hybrid, reference_run, fault):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, hybrid, fault=fault) == -9
    assert run_cli(run_dir, hybrid) == 0
    pd.testing.assert_frame_equal(all_labels(run_dir), all_labels(reference_run))
    counts = request_counts(run_dir)
    assert set(counts.values()) == {1}, "an oracle request was repeated"
    assert set(counts) == set(request_counts(reference_run))
    assert [e["win_rate"] for e in eval_results(run_dir)] == [e["win_rate"] for e in eval_results(reference_run)]


@pytest.mark.parametrize("damage", ["truncate_scores", "edit_manifest", "delete_policy_file"])
def test_damaged_stage_output_is_detected_and_redone(tmp_path, hybrid, reference_run, damage, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    rd = run_dir / "round_0000"
    if damage == "truncate_scores":
        data = (rd / "scores.parquet").read_bytes()
        (rd / "scores.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "edit_manifest":
        path = rd / ".acquired.manifest.json"
        manifest = json.loads(path.read_text())
        manifest["files"]["acquired.parquet"]["sha256"] = "0" * 64
        path.write_text(json.dumps(manifest))
    else:
        (rd / "policy" / "model.safetensors").unlink()
    before = (run_dir / "metrics.jsonl").read_text().count("\n")
    assert run_cli(run_dir, hybrid) == 0
    redone = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[before:]]
    first = {"truncate_scores": "scores", "edit_manifest": "acquired", "delete_policy_file": "train"}[damage]
    assert (redone[0]["round"], redone[0]["stage"]) == (0, first)
    pd.testing.assert_frame_equal(all_labels(run_dir), all_labels(reference_run))
    assert set(request_counts(run_dir).values()) == {1}
    pd.read_parquet(rd / "scores.parquet")  # readable again


@pytest.mark.parametrize("change", ["seed=1", "training.beta=0.3"])
def test_resume_with_result_changing_config_is_refused(tmp_path, hybrid, reference_run, change, capfd):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    assert run_cli(run_dir, [*hybrid, change]) == 3
    err = capfd.readouterr().err
    assert "refusing to resume" in err and change.split("=")[0] in err


def test_more_rounds_extend_a_finished_run(tmp_path, hybrid, reference_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    assert run_cli(run_dir, [*hybrid, "loop.rounds=3"]) == 0
    assert [e["labels"] for e in eval_results(run_dir)] == [8, 16, 24]
    pd.testing.assert_frame_equal(all_labels(run_dir).iloc[:16], all_labels(reference_run))


@pytest.mark.parametrize("function", ["random", "entropy", "certainty", "uncertainty"])
def test_each_acquisition_function_runs_end_to_end(tmp_path, tiny_overrides, function):
    run_dir = tmp_path / "run"
    extra = ["loop.tensorboard=true", "training.init=previous"] if function == "random" else []
    assert run_cli(run_dir, [*tiny_overrides, f"acquisition.function={function}", "loop.rounds=1", *extra]) == 0
    assert len(all_labels(run_dir)) == 8
    assert (run_dir / "round_0000" / "entropy_samples.parquet").exists() == (function == "entropy")
    assert any(run_dir.glob("tensorboard/**/events.out.tfevents.*")) == (function == "random")


def test_status_and_report_commands(reference_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "| 1 | 16 |" in (run_dir / "report.md").read_text()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    n = sum(request_counts(run_dir).values())  # label and eval comparisons
    assert "status: done" in out and "round 1: labels 16" in out and f"{n} answers, {n} oracle requests" in out
    assert main(["status", str(tmp_path / "nothing")]) == 1


def test_train_log_has_one_record_per_step(reference_run):
    lines = (reference_run / "round_0001" / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4  # 16 pairs, batch 4, 1 epoch
    assert {"loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin"} <= set(records[0])
