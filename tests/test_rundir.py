"""Stage manifests detect every kind of damage; atomic writes leave no debris; metrics survive a cut line."""

import json
import os

import pandas as pd
import pytest

from apo_dist.rundir import RunDir, atomic_write_json, read_table, write_table

INPUTS = {"samples": "abc123"}


@pytest.fixture
def stage(tmp_path):
    """A finished stage with a parquet table and a checkpoint folder, and its manifest."""
    run = RunDir(tmp_path / "run")
    scope = run.round_dir(0)
    write_table(scope / "pairs.parquet", pd.DataFrame({"x": range(50), "y": [f"row {i}" for i in range(50)]}))
    (scope / "policy").mkdir()
    (scope / "policy" / "weights.bin").write_bytes(b"\x01" * 64)
    (scope / "policy" / "config.json").write_text("{}")
    run.write_manifest(scope, "train", ["pairs.parquet", "policy"], INPUTS)
    return run, scope


def test_intact_stage_is_done(stage):
    run, scope = stage
    assert run.check_manifest(scope, "train", INPUTS) is None
    assert len(read_table(scope / "pairs.parquet")) == 50
    assert run.check_manifest(scope, "score", INPUTS) == "not done"


def test_truncated_parquet(stage):
    run, scope = stage
    path = scope / "pairs.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reason = run.check_manifest(scope, "train", INPUTS)
    assert "pairs.parquet" in reason and "bytes" in reason


def test_same_size_corruption(stage):
    run, scope = stage
    (scope / "policy" / "weights.bin").write_bytes(b"\x02" * 64)
    assert "does not match its manifest hash" in run.check_manifest(scope, "train", INPUTS)


def test_edited_manifest_hash(stage):
    run, scope = stage
    path = run.manifest_path(scope, "train")
    manifest = json.loads(path.read_text())
    manifest["files"]["pairs.parquet"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    assert "pairs.parquet does not match its manifest hash" == run.check_manifest(scope, "train", INPUTS)


def test_unreadable_manifest(stage):
    run, scope = stage
    run.manifest_path(scope, "train").write_text('{"files": ')
    assert run.check_manifest(scope, "train", INPUTS) == "manifest unreadable"


@pytest.mark.parametrize("victim, expected", [("pairs.parquet", "output pairs.parquet missing"),
                                              ("policy/weights.bin", "output files differ")])
def test_missing_file(stage, victim, expected):
    run, scope = stage
    (scope / victim).unlink()
    assert expected in run.check_manifest(scope, "train", INPUTS)


def test_extra_file_in_output_folder(stage):
    run, scope = stage
    (scope / "policy" / "stray.bin").write_bytes(b"x")
    assert "output files differ" in run.check_manifest(scope, "train", INPUTS)


def test_changed_input_digest(stage):
    run, scope = stage
    assert "inputs changed" in run.check_manifest(scope, "train", {"samples": "def456"})
    assert "inputs changed" in run.check_manifest(scope, "train", {})


def test_manifest_digest_tracks_contents(stage):
    run, scope = stage
    before = run.manifest_digest(scope, "train")
    assert run.write_manifest(scope, "train", ["pairs.parquet", "policy"], INPUTS) == before
    (scope / "policy" / "config.json").write_text('{"a": 1}')
    assert run.write_manifest(scope, "train", ["pairs.parquet", "policy"], INPUTS) != before


def test_write_manifest_requires_outputs(stage):
    run, scope = stage
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        run.write_manifest(scope, "eval", ["absent.parquet"], INPUTS)


def test_atomic_write_json_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    atomic_write_json(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 2}
    assert os.listdir(tmp_path) == ["state.json"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"round": 3})
    assert os.listdir(tmp_path) == ["state.json"]
    assert json.loads(path.read_text()) == {"round": 2}


def test_read_metrics_tolerates_cut_last_line(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    run.log_metrics({"round": 0, "win_rate": 0.5})
    run.log_metrics({"round": 1, "win_rate": 0.6})
    text = run.metrics_path.read_text()
    run.metrics_path.write_text(text[:-10])  # a crash cut the second record
    rows = run.read_metrics()
    assert [(r["round"], r["win_rate"]) for r in rows] == [(0, 0.5)]


def test_state_updates_merge(tmp_path):
    run = RunDir(tmp_path)
    run.update_state(round=0, stage="score")
    run.update_state(stage="train")
    state = run.read_state()
    assert (state["round"], state["stage"]) == (0, "train") and "updated" in state
