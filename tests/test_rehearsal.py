"""Full-count rehearsals (`apo-dist run CONFIG --rehearse`): the paper configs at their real counts on
stand-ins, every round's tables holding exactly what the plan (`--dry-run`) says."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from apo_dist import plan
from apo_dist.cli import main
from apo_dist.config import from_yaml_text, load_config
from apo_dist.rundir import RunDir

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KEPT = ["acquisition.function", "acquisition.labels_per_round", "acquisition.prompt_factor",
        "acquisition.pair_factor", "scoring.entropy_samples", "loop.rounds", "data.n_eval", "data.reuse_prompts",
        "training.batch_size", "training.init", "launcher.scoring_processes", "launcher.training_processes",
        "eval.reference"]
ROWS = ["pool_prompts", "entropy_samples", "entropy_scored", "pair_prompts", "pair_completions", "reference_scored",
        "labels", "label_requests", "train_pairs", "eval_completions", "eval_requests"]


@pytest.mark.parametrize("name, rounds, pool", [("paper_imdb", 6, 32768), ("paper_tldr", 4, 2048)])
def test_paper_config_rehearsal_has_the_planned_counts(tmp_path, monkeypatch, capsys, name, rounds, pool):
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    started = time.time()
    assert main(["run", str(CONFIGS / f"{name}.yaml"), "--rehearse", "--no-progress"]) == 0
    seconds = time.time() - started
    out = capsys.readouterr().out
    rd = RunDir(tmp_path / "runs" / f"{name}_rehearsal")
    original = load_config(CONFIGS / f"{name}.yaml")
    cfg = from_yaml_text(rd.config_path.read_text())
    for key in KEPT:  # every count as configured
        assert OmegaConf.select(cfg, key) == OmegaConf.select(original, key), key
    assert cfg.loop.rounds == rounds and cfg.oracle.kind == "sentiment" and cfg.eval.oracle is None
    assert cfg.generation.backend == "hf" and cfg.training.epochs == 1 and cfg.model.dtype == "float32"
    assert rd.read_state()["status"] == "done"
    metrics = {(m["round"], m["stage"]): m for m in rd.read_metrics()}
    for r in range(rounds):
        p, planned = plan.round_counts(cfg, r), plan.round_counts(original, r)
        assert {k: p[k] for k in ROWS} == {k: planned[k] for k in ROWS}  # epochs (and train steps) differ
        pool_table = rd.table("pool", r)
        assert len(pool_table) == p["pool_prompts"] == pool and pool_table["prompt_id"].is_unique
        if p["entropy_samples"]:
            assert len(rd.table("entropy_samples", r)) == p["entropy_samples"]
        assert int(rd.table("entropy", r)["selected"].sum()) == p["pair_prompts"]
        assert len(rd.table("samples", r)) == p["pair_completions"]
        assert len(rd.table("scores", r)) == p["candidate_pairs"]
        assert len(rd.table("acquired", r)) == len(rd.table("labels", r)) == p["labels"]
        assert metrics[(r, "train")]["pairs"] == p["train_pairs"] and metrics[(r, "train")]["steps"] == p["train_steps"]
        assert len(rd.table("eval_samples", r)) == p["eval_completions"]
    if cfg.eval.reference == "dataset":  # synthetic prompts carry references
        assert rd.table("eval_reference")["finish_reason"].eq("reference").all()
    assert f"rehearsal of {name}: the plan (--dry-run) beside what was measured" in out
    assert f"counts: all {rounds * 10} as planned, pool prompt ids unique" in out
    assert "label store:" in out and "peak memory" in out and "| total |" in out
    print(f"{name} rehearsal: {seconds:.0f} s")


def test_rehearsal_of_an_infeasible_config_fails_before_building(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(CONFIGS / "paper_imdb.yaml"), "--rehearse", "data.reuse_prompts=false"]) == 2
    assert "config key 'acquisition.labels_per_round'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
