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


# ---- training.lora: the saved adapter beside the plan's count ----

@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    from apo_dist.rehearsal import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("stand_in") / "policy", seed=0, max_positions=64)


def test_saved_policy_counts_a_peft_adapter_and_full_weights(stand_in, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from apo_dist.rehearsal import mismatches, saved_policy

    cfg = load_config(CONFIGS / "paper_tldr.yaml", [f"model.policy={stand_in}", "training.lora.rank=4",
                                                     "training.lora.target_modules=[q_proj,v_proj,down_proj]"])
    p = plan.plan(cfg)
    model = AutoModelForCausalLM.from_pretrained(stand_in)
    full = saved_policy(stand_in)
    assert not full["adapter"] and full["params"] == model.num_parameters()  # tied embeddings stored once
    assert mismatches(p, {"rounds": [], "policy": full}) == [f"policy {stand_in}: full weights, not a LoRA adapter"]
    for rank, expected in ((4, []), (2, [f"adapter params: {p['weights']['adapter']['params'] // 2:,.0f} "
                                         f"(plan {p['weights']['adapter']['params']:,.0f})"])):
        folder = tmp_path / f"adapter_r{rank}"
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(stand_in),
                                    LoraConfig(r=rank, target_modules=["q_proj", "v_proj", "down_proj"]))
        peft_model.save_pretrained(folder)
        saved = saved_policy(folder)
        assert saved["adapter"] and saved["params"] == peft_model.get_nb_trainable_parameters()[0]
        assert saved["bytes"] == (folder / "adapter_model.safetensors").stat().st_size
        assert mismatches(p, {"rounds": [], "policy": saved}) == expected


def test_lora_rehearsal_saves_adapters_of_the_planned_size(tmp_path, monkeypatch, capsys):
    from apo_dist.rehearsal import saved_policy

    monkeypatch.chdir(tmp_path)
    lora = ["training.lora.rank=8", "training.lora.target_modules=[q_proj,v_proj,gate_proj]", "loop.rounds=2",
            "data.n_eval=128", "data.reuse_prompts=false"]  # 2 rounds on ~2,300 synthetic prompts: quicker
    assert main(["run", str(CONFIGS / "paper_tldr.yaml"), "--rehearse", "--no-progress", *lora]) == 0
    out = capsys.readouterr().out
    rd = RunDir(tmp_path / "runs" / "paper_tldr_rehearsal")
    cfg = from_yaml_text(rd.config_path.read_text())
    adapter = plan.lora_adapter(cfg)["params"]
    assert adapter == 8 * ((32 + 32) + (32 + 32) + (32 + 64))  # the stand-in's one layer: hidden 32, MLP 64
    for r in range(2):
        saved = saved_policy(rd.path("policy", r))
        assert saved["adapter"] and saved["params"] == adapter
    assert "training.lora rank 8 on q_proj, v_proj, gate_proj (of the stand-in)" in out
    assert "| LoRA r=8 (q_proj, v_proj, gate_proj) | 1.79k" in out
    assert f"saved policy of round 1: a LoRA adapter, {adapter:,.0f} parameters" in out
    assert "counts: all 20 as planned, the LoRA adapter's parameters, pool prompt ids unique" in out
