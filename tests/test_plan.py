"""The run plan (plan.py): counts against hand-computed numbers and the selection code, and dry runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apo_dist import acquisition, plan
from apo_dist.cli import main
from apo_dist.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# A llama-shaped config.json: 100 * 64 embeddings (tied) + 2 layers of (4 * 64 * 64 attention + 3 * 64 * 128 MLP)
TINY_PARAMS = 100 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128)

SMALL = """
name: small
model: {{policy: {policy}}}
data: {{source: movie_reviews, prompt_min_tokens: 8, prompt_max_tokens: 12, n_eval: 10}}
generation: {{max_new_tokens: 6}}
scoring: {{entropy_samples: 2}}
acquisition: {{function: hybrid, labels_per_round: 4, prompt_factor: 2, pair_factor: 3}}
oracle:
  kind: llm_judge
  model: judge
  prices: {{judge: {{input: 10.0, output: 30.0}}}}
training: {{epochs: 5, batch_size: 4, micro_batch_size: 4, init: sft}}
loop: {{rounds: 3}}
"""


@pytest.fixture
def small(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True}))
    path = tmp_path / "small.yaml"
    path.write_text(SMALL.format(policy=model))
    return path


def test_hybrid_counts_by_hand(small):
    cfg = load_config(small)
    r0, r1, r2 = (plan.round_counts(cfg, r) for r in range(3))
    assert r0["pool_prompts"] == 24  # f_p * f_g * M = 2 * 3 * 4
    assert r0["entropy_samples"] == r0["entropy_scored"] == 48  # N = 2 per pool prompt
    assert r0["pair_prompts"] == 12 and r0["pair_completions"] == 24  # top f_g * M prompts, one pair each
    assert r0["reference_scored"] == 0 and r1["reference_scored"] == 24  # round 0: policy is the reference
    assert (r0["labels"], r0["label_requests"], r0["eval_requests"]) == (4, 4, 10)
    k = plan.round_counts(load_config(small, ["eval.samples_per_prompt=3", "eval.temperature=1", "eval.kl_samples=2"]), 0)
    assert (k["eval_completions"], k["eval_requests"], k["kl_samples"]) == (30, 30, 20)
    assert [r["train_pairs"] for r in (r0, r1, r2)] == [4, 8, 12]  # init sft: all labels so far
    assert r2["pair_epochs"] == 60 and r2["train_steps"] == 15  # ceil(12 / 4) * 5 epochs


def test_tokens_flops_and_cost_by_hand(small):
    p = plan.plan(load_config(small))
    assert p["params"] == TINY_PARAMS and "config.json" in p["params_from"]
    assert p["lengths"] == {"prompt": 10.0, "completion": 6.0}
    r0, r1, r2 = p["rounds"]
    # entropy samples, pairs, eval, and the eval's KL samples (eval.kl_samples = 1 per eval prompt)
    assert r0["generated_tokens"] == 48 * 6 + 24 * 6 + 10 * 6 + 10 * 6
    kl_scored = 2 * 10 * 16  # the KL samples under the policy and the SFT model
    assert r0["scored_tokens"] == (48 + 24) * 16 + kl_scored and r1["scored_tokens"] == (48 + 48) * 16 + kl_scored
    assert r2["train_flops"] == 6 * TINY_PARAMS * 60 * 2 * 16  # pair-epochs x 2 sequences x 16 tokens
    one = (150 + 10 + 2 * 6) * 10 / 1e6 + 40 * 30 / 1e6  # judge template + prompt + 2 completions in, 40 out
    labels = next(s for s in r0["stages"] if s["stage"] == "labels")
    assert labels["cost"] == pytest.approx(4 * one)
    assert r0["requests"] == 14 and r0["cost"] == pytest.approx(14 * one)
    assert p["totals"]["judge_cost"] == pytest.approx(42 * one)
    assert [s["stage"] for s in r0["stages"]] == ["entropy_samples", "entropy", "samples", "scores", "labels",
                                                  "train", "eval (generate)", "eval (KL samples)",
                                                  "eval (KL scoring)", "eval (judge)"]
    assert all(s["h100_s"] > 0 for s in r0["stages"]) and r0["bound"] in {s["stage"] for s in r0["stages"]}


@pytest.mark.parametrize("function, pool, pairs, samples", [
    ("random", 4, 4, 0), ("entropy", 8, 4, 16), ("certainty", 12, 12, 0), ("uncertainty", 12, 12, 0),
    ("hybrid", 24, 12, 48)])
def test_counts_per_function_match_the_selection_code(small, function, pool, pairs, samples):
    cfg = load_config(small, [f"acquisition.function={function}"])
    c = plan.round_counts(cfg, 0)
    assert (c["pool_prompts"], c["pair_prompts"], c["entropy_samples"]) == (pool, pairs, samples)
    table = pd.DataFrame({"prompt_id": range(pool), "entropy": np.random.default_rng(0).random(pool)})
    chosen = acquisition.select_prompts(table, function, c["pair_prompts"], np.random.default_rng(0))
    assert chosen["selected"].sum() == c["pair_prompts"]


@pytest.mark.parametrize("function, ops", [
    # n = 12 candidates (f_g M), h = 8 labels of rounds 0 and 1, k = 8, M = 4; fit h (2 k^2 + 60) per Newton
    # step (10 for the posterior, 1 for the design matrix), z^T cov z 2 n k^2, then the selection
    ("epistemic", 10 * 8 * 188 + 2 * 12 * 64 + 12 * 64 * 60),  # 64 quadrature nodes over n
    ("thompson", 10 * 8 * 188 + 2 * 12 * 64 + 4 * 12 * (16 + 30)),  # M draws over n
    ("diverse", 8 * 188 + 2 * 12 * 64 + 4 * 12 * (16 + 10)),  # M greedy picks over n
    ("diverse_certainty", 8 * 188 + 2 * 8 * 64 + 4 * 8 * (16 + 10))])  # ... over the f_d M = 8 most certain
def test_feature_function_costs_by_hand(small, function, ops):
    cfg = load_config(small, [f"acquisition.function={function}", "acquisition.diversity_factor=2",
                              "acquisition.feature_dim=8"])
    r0, r2 = plan.round_counts(cfg, 0), plan.round_counts(cfg, 2)
    assert (r0["pool_prompts"], r0["pair_prompts"], r0["entropy_samples"]) == (12, 12, 0)  # f_g M, like certainty
    assert (r0["history_pairs"], r2["history_pairs"]) == (0, 8)
    assert r2["policy_scored"] == 2 * (12 + 8) and r2["reference_scored"] == 24  # labels: policy pass only
    assert r2["feature_bytes"] == 4 * 8 * 2 * (12 + 8)  # float32 features of scores and history
    p = plan.plan(cfg)
    last = p["rounds"][2]
    assert last["scored_tokens"] == (40 + 24) * 16 + 2 * 10 * 16  # + the eval's KL samples, twice
    acquired = next(s for s in last["stages"] if s["stage"] == "acquired")
    assert acquired["ops"] == r2["acquisition_ops"] == ops
    assert acquired["cpu_s"] == acquired["h100_s"] == pytest.approx(ops / plan.CPU_RATES["acquisition_ops"])
    assert "numpy ops" in "\n".join(plan.stage_table(last["stages"]))
    paper = plan.plan(load_config(small, ["acquisition.function=certainty"]))["rounds"][2]
    assert "acquired" not in [s["stage"] for s in paper["stages"]] and paper["scored_tokens"] == (24 + 24) * 16 + 2 * 10 * 16


def test_options_change_the_counts(small, tmp_path):
    # init previous continues from the last policy but, like sft, trains on every label so far
    assert plan.round_counts(load_config(small, ["training.init=previous"]), 2)["train_pairs"] == 12
    both = plan.round_counts(load_config(small, ["oracle.both_orders=true"]), 0)
    assert (both["label_requests"], both["eval_requests"]) == (8, 20)
    gen = load_config(small, ["scoring.entropy_from_generation=true"])
    assert plan.round_counts(gen, 0)["entropy_scored"] == 0
    other = tmp_path / "other"
    other.mkdir()
    assert plan.round_counts(load_config(small, [f"model.reference={other}"]), 0)["reference_scored"] == 24


def test_model_sizes():
    assert plan.model_params("gpt2-large") == (774e6, "known size")
    assert plan.model_params("EleutherAI/pythia-1.4b")[0] == 1.41e9
    assert plan.model_params("asset:smollm2-135m-instruct")[0] == 134.5e6
    assert plan.model_params("meta-llama/Llama-2-70b-hf") == (70e9, "from the size in its name")
    assert plan.model_params("meta-llama/Llama-3.2-1B")[0] == 1e9
    assert plan.model_params("my-org/policy") == (None, "unknown size")


def test_unknown_size_plans_counts_without_times(small):
    cfg = load_config(small, ["model.policy=my-org/policy"])
    p = plan.plan(cfg)
    assert p["rounds"][0]["pool_prompts"] == 24 and p["rounds"][0]["h100_s"] is None
    assert p["totals"]["judge_cost"] is not None  # judge cost needs no model size
    assert "parameter count unknown" in plan.format_plan(p, cfg)


def test_layout_for_scaling():
    assert plan.layout(1e9) == {"tp": 1, "servers": 8, "ranks": 8, "nodes": 2}
    assert plan.layout(70e9) == {"tp": 4, "servers": 8, "ranks": 32, "nodes": 8}  # 19 ranks for 1.12 TB -> 3 -> 4 nodes


def test_scaling_rows_are_dry_run_plans():
    path = str(CONFIGS / "paper_imdb.yaml")
    (row,) = plan.scaling_rows(path, sizes=("7B",), scales=(10,))
    assert row["first"]["pool_prompts"] == 10 * 128 * 8 * 32
    again = plan.plan(load_config(path, row["overrides"]))
    assert again["rounds"][-1]["h100_s"] == row["last"]["h100_s"]
    assert again["gpus"] == {"generation": 8, "scoring": 8, "training": 8, "held": 16}


@pytest.mark.parametrize("name, function, pool", [("paper_imdb", "hybrid", 32768), ("paper_tldr", "certainty", 2048)])
def test_paper_configs_dry_run(tmp_path, monkeypatch, capsys, name, function, pool):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(CONFIGS / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"dry run of {name}: config valid" in out
    assert f"run directory: runs/{name} (would be created)" in out
    assert f"acquisition {function}: M=128" in out and f"| 0 | {pool} |" in out
    assert "judge requests" in out and "GPU-hours" in out and "bound by" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_rejects_a_bad_config_and_imports_no_models(tmp_path):
    assert main(["run", str(CONFIGS / "paper_imdb.yaml"), "--dry-run", "acquisition.function=greedy"]) == 2
    code = ("import sys; from apo_dist.cli import main; "
            f"assert main(['run', {str(CONFIGS / 'paper_imdb.yaml')!r}, '--dry-run', '--run-dir', {str(tmp_path / 'r')!r}]) == 0; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "r").exists()


def test_scaling_layouts_divide_the_effective_batch():
    path = str(CONFIGS / "paper_imdb.yaml")
    for row in plan.scaling_rows(path, scales=(1,)):
        cfg = load_config(path, row["overrides"])
        assert cfg.training.batch_size % (cfg.training.micro_batch_size * cfg.launcher.training_processes) == 0


def test_dry_run_checks_the_pool_against_the_data(tmp_path, capsys):
    imdb = str(CONFIGS / "paper_imdb.yaml")
    assert main(["run", imdb, "--dry-run", "data.reuse_prompts=false"]) == 2  # 32,768 a round > 23,976
    err = capsys.readouterr().err
    assert "config key 'acquisition.labels_per_round'" in err and "at most 23,976 training prompts" in err
    assert "data.reuse_prompts=true" in err
    assert main(["run", imdb, "--dry-run"]) == 0
    assert "a round draws 32,768 by cycling through them" in capsys.readouterr().out

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(50)))
    small = ["data.source=file", f"data.path={path}", "data.n_eval=10", "acquisition.function=random",
             "acquisition.labels_per_round=8"]
    assert main(["run", imdb, "--dry-run", *small, "data.reuse_prompts=false", "loop.rounds=5"]) == 0
    assert "the run draws 8 a round and 40 distinct over 5 rounds: fits" in capsys.readouterr().out
    assert main(["run", imdb, "--dry-run", *small, "data.reuse_prompts=false", "loop.rounds=6"]) == 2
    err = capsys.readouterr().err
    assert "config key 'loop.rounds'" in err and "8 + 5 x 8 = 48 distinct" in err and "data.reuse_prompts=true" in err
    assert main(["run", imdb, "--dry-run", *small, "loop.rounds=6"]) == 0  # reuse on
    assert main(["run", imdb, "--dry-run", *small, "data.n_eval=50"]) == 2
    assert "config key 'data.n_eval'" in capsys.readouterr().err

    other = tmp_path / "p.txt"
    other.write_text("a\nb\n")
    assert main(["run", imdb, "--dry-run", *small[:-1], f"data.path={other}", "data.reuse_prompts=false"]) == 0
    assert "the size of data.source=file is unknown here" in capsys.readouterr().out
    assert main(["run", imdb, "--dry-run", "data.source=movie_reviews", f"assets_dir={tmp_path / 'none'}",
                 "data.reuse_prompts=false", "data.n_eval=100", "acquisition.labels_per_round=2"]) == 0
    assert "holds at most 10,605 rows (the packaged asset's known size; not cached here)" in capsys.readouterr().out
    assert main(["run", imdb, "--dry-run", "data.source=tldr", "data.reuse_prompts=false",
                 "eval.reference=sft"]) == 0
    assert "holds at most 116,722 rows" in capsys.readouterr().out


# ---- LoRA (training.lora): adapter parameters, training state per rank, weight sync ----

def zero_config(tmp_path, stage: int) -> str:
    """An accelerate config asking DeepSpeed for ZeRO `stage` (launch/accelerate/zero3.yaml's layout)."""
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: {stage}\n")
    return str(path)


def test_lora_adapter_params_by_hand(small):
    # hidden 64, intermediate 128, 2 layers, 2 heads of 32 (no GQA): A [r, in] + B [out, r] per projection
    qkvo = plan.lora_adapter(load_config(small, ["training.lora.rank=4"]))
    assert qkvo["modules"] == {"q_proj": 4 * (64 + 64) * 2, "k_proj": 4 * (64 + 64) * 2,
                               "v_proj": 4 * (64 + 64) * 2, "o_proj": 4 * (64 + 64) * 2}
    assert qkvo["params"] == 4096 and "config.json" in qkvo["note"]
    mlp = plan.lora_adapter(load_config(small, ["training.lora.rank=4",
                                                "training.lora.target_modules=[gate_proj,up_proj,down_proj]"]))
    assert mlp["params"] == 3 * 4 * (64 + 128) * 2
    assert plan.lora_adapter(load_config(small)) is None  # rank 0: full fine-tuning
    # Llama-2-70B (grouped-query attention: 8 kv heads of 128), r = 16 on q, k, v, o: 80 layers of
    # 16 (8192 + 8192) twice (q, o) and 16 (8192 + 1024) twice (k, v)
    big = plan.lora_adapter(load_config(small, ["model.policy=meta-llama/Llama-2-70b-hf", "training.lora.rank=16"]))
    assert big["params"] == 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024)) == 65_536_000


@pytest.mark.parametrize("heads, kv_heads, targets", [
    (2, 2, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (4, 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),  # GQA
    (4, 1, ["v_proj", "down_proj"])])
def test_lora_adapter_params_match_peft(tmp_path, heads, kv_heads, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16)
    config.save_pretrained(tmp_path)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    trainable, _ = model.get_nb_trainable_parameters()
    cfg = load_config(CONFIGS / "quickstart.yaml", [f"model.policy={tmp_path}", "training.lora.rank=8",
                                                     f"training.lora.target_modules=[{','.join(targets)}]"])
    assert plan.lora_adapter(cfg)["params"] == trainable


def test_lora_adapter_of_the_tiny_model_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from apo_dist.models import load_model

    cfg = load_config(CONFIGS / "quickstart.yaml", [f"model.policy={tiny_model_dir}", "training.lora.rank=8"])
    peft_model = get_peft_model(load_model(str(tiny_model_dir), device="cpu"),
                                LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg.training.lora.target_modules)))
    assert plan.lora_adapter(cfg)["params"] == peft_model.get_nb_trainable_parameters()[0] == 8 * 256 * 4 * 2


def test_lora_unknown_targets_or_shape_are_a_note(small, tmp_path, capsys):
    odd = load_config(small, ["training.lora.rank=4", "training.lora.target_modules=[q_proj,c_attn]"])
    a = plan.lora_adapter(odd)
    assert a["params"] is None and "training.lora.target_modules c_attn not among the projections" in a["note"]
    gpt2 = plan.lora_adapter(load_config(small, ["model.policy=gpt2-large", "training.lora.rank=4"]))
    assert gpt2["params"] is None and "adapter size unknown" in gpt2["note"] and "not a known model" in gpt2["note"]
    w = plan.plan(odd)["weights"]
    assert w["lora"] is None and w["full"]["trainable"] == TINY_PARAMS  # the full figures still stand
    assert main(["run", str(small), "--dry-run", "--run-dir", str(tmp_path / "r"), "training.lora.rank=4",
                 "training.lora.target_modules=[q_proj,c_attn]"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4 (q_proj, c_attn): adapter size unknown: training.lora.target_modules c_attn" in out
    assert "| full fine-tuning |" in out and "| LoRA r=4" not in out


def test_training_state_and_sync_by_hand(small, tmp_path):
    P, A = TINY_PARAMS, 4096  # the model; the r = 4 q, k, v, o adapter above
    # one process, fp32: weights, gradients and two Adam moments in fp32 (16 bytes a trained parameter)
    w = plan.plan(load_config(small, ["training.lora.rank=4"]))["weights"]
    assert (w["zero"], w["width"], w["ranks"]) == (None, 4, 1)
    assert w["full"] == {"trainable": P, "optimizer_bytes": 8 * P, "rank_bytes": 16 * P, "sync_bytes": 4 * P,
                         "sync_s": pytest.approx(2 * 4 * P / 2e9)}
    assert w["lora"] == {"trainable": A, "optimizer_bytes": 8 * A, "rank_bytes": 4 * P + 16 * A,
                         "sync_bytes": 4 * A, "sync_s": pytest.approx(2 * 4 * A / 2e9)}
    two = ["training.lora.rank=4", "training.mixed_precision=bf16", "launcher.training_processes=2",
           "training.micro_batch_size=2"]
    # DeepSpeed bf16: bf16 weights and gradients, fp32 master weights + moments (12 bytes); ZeRO-3 shards it all
    w3 = plan.plan(load_config(small, [*two, f"launcher.accelerate_config={zero_config(tmp_path, 3)}"]))["weights"]
    assert (w3["zero"], w3["width"], w3["ranks"]) == (3, 2, 2)
    assert w3["full"]["rank_bytes"] == (2 * P + 2 * P + 12 * P) / 2 and w3["full"]["optimizer_bytes"] == 12 * P
    assert w3["lora"]["rank_bytes"] == (2 * P + 2 * A + 2 * A + 12 * A) / 2 and w3["lora"]["sync_bytes"] == 2 * A
    # ZeRO-2 keeps the weights whole on every rank and shards gradients and optimizer state
    w2 = plan.plan(load_config(small, [*two, f"launcher.accelerate_config={zero_config(tmp_path, 2)}"]))["weights"]
    assert w2["full"]["rank_bytes"] == 2 * P + (2 * P + 12 * P) / 2
    assert w2["lora"]["rank_bytes"] == 2 * (P + A) + (2 * A + 12 * A) / 2
    # without DeepSpeed, bf16 mixed precision autocasts fp32 weights: nothing changes from fp32
    ddp = plan.plan(load_config(small, two))["weights"]
    assert (ddp["width"], ddp["lora"]["rank_bytes"]) == (4, 4 * P + 16 * A)


def test_zero_stage_from_a_deepspeed_config_file(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    acc = tmp_path / "acc.yaml"
    acc.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n")
    assert plan.zero_stage(str(acc)) == 2
    assert plan.zero_stage(str(ROOT / "launch" / "accelerate" / "zero3.yaml")) == 3
    assert plan.zero_stage(str(ROOT / "launch" / "accelerate" / "ddp.yaml")) is None
    assert plan.zero_stage("") is None


def test_dry_run_prints_full_and_lora_state(small, tmp_path, capsys):
    assert main(["run", str(small), "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    # 88,320 parameters: 8 bytes each of Adam moments (690 KiB), 16 in all (1.35 MiB), 4 synced (345 KiB)
    assert "| full fine-tuning | 88.3k | 690 KiB | 1.35 MiB | 345 KiB (the policy) |" in out and "| LoRA" not in out
    assert main(["run", str(small), "--dry-run", "--run-dir", str(tmp_path / "r"), "training.lora.rank=4"]) == 0
    out = capsys.readouterr().out
    # 4,096 adapter parameters: 32 KiB of moments; 4 x 88,320 frozen + 16 x 4,096 = 409 KiB; 16 KiB synced
    assert ("| LoRA r=4 (q_proj, k_proj, v_proj, o_proj) | 4.1k (4.64%) | 32 KiB | 409 KiB "
            "| 16 KiB (the adapter) |") in out
    assert "q_proj 1.02k, k_proj 1.02k, v_proj 1.02k, o_proj 1.02k" in out


def test_scaling_rows_count_lora_beside_full_fine_tuning():
    path = str(CONFIGS / "paper_imdb.yaml")
    seven, seventy = plan.scaling_rows(path, sizes=("7B", "70B"), scales=(1,))
    adapter7 = 32 * 16 * 4 * (4096 + 4096)  # r = 16 on q, k, v, o; no GQA
    w = seven["weights"]
    assert (w["zero"], w["width"], w["ranks"]) == (3, 2, 8)
    assert w["full"]["rank_bytes"] == 16 * 7e9 / 8 and w["full"]["sync_bytes"] == 2 * 7e9
    assert w["lora"]["trainable"] == adapter7 and w["lora"]["rank_bytes"] == (2 * 7e9 + 16 * adapter7) / 8
    assert w["lora"]["sync_bytes"] == 2 * adapter7 and w["lora"]["optimizer_bytes"] == 12 * adapter7
    w = seventy["weights"]
    assert w["lora"]["trainable"] == 65_536_000 and w["full"]["sync_s"] == pytest.approx(2 * 140e9 / 2e9)
    assert plan.gpus_for_state(w["full"]["rank_bytes"] * 32) == 19  # 1.12 TB of state
    assert plan.gpus_for_state(w["lora"]["rank_bytes"] * 32) == 3  # 140 GB of frozen bf16 weights
    table = "\n".join(plan.scaling_weights_table([seven, seventy]))
    assert "| 70B | LoRA r=16 | 65.5M (0.09%) | 750 MiB | 4.11 GiB | 3 | 125 MiB | 0.13 s |" in table
    assert "| 70B | full | 70B | 782 GiB | 32.6 GiB | 19 | 130 GiB | 2.3 min |" in table
