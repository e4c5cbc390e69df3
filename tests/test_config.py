"""load_config validation, pool-size checks and resume diffs (the paper, section 4, for the counts)."""

from pathlib import Path

import pytest

import json

from omegaconf import OmegaConf

from apo_dist.config import (AcquisitionFunction, ConfigError, DType, changed_keys, from_yaml_text, load_config,
                             resumable_keys, to_yaml)
from apo_dist.counts import check_pool_size

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG = CONFIGS / "test_tiny.yaml"
TINY = CONFIGS / "test_tiny.yaml"


def load(tiny_overrides, *extra):
    return load_config(TINY, [*tiny_overrides, *extra])


def config_error(tiny_overrides, *extra) -> str:
    with pytest.raises(ConfigError) as e:
        load(tiny_overrides, *extra)
    return str(e.value)


def test_tiny_config_loads(tiny_overrides, tiny_model_dir):
    cfg = load(tiny_overrides)
    assert cfg.name == "test_tiny"
    assert cfg.model.policy == str(tiny_model_dir)
    assert cfg.acquisition.labels_per_round == 8
    assert cfg.training.micro_batch_size == 2


def test_name_defaults_to_file_stem_and_override_wins(tmp_path, tiny_overrides):
    path = tmp_path / "my_experiment.yaml"
    path.write_text("seed: 3\n")
    assert load_config(path, tiny_overrides).name == "my_experiment"
    assert load_config(path, [*tiny_overrides, "name=seed3"]).name == "seed3"


def test_config_is_read_only(tiny_overrides):
    cfg = load(tiny_overrides)
    with pytest.raises(Exception):
        cfg.seed = 5


@pytest.mark.parametrize("extra, expected", [
    (["foo=1"], ["'foo'", "allowed keys", "training", "acquisition"]),
    (["training.betaa=0.1"], ["'training.betaa'", "beta", "micro_batch_size", "epochs"]),
    (["training.epochs=abc"], ["'training.epochs'", "abc", "Integer"]),
    (["training.beta=0"], ["'training.beta'", "> 0"]),
    (["training.beta=-0.1"], ["'training.beta'", "> 0"]),
    (["training.lr=0"], ["'training.lr'", "> 0"]),
    (["acquisition.function=bald"], ["'acquisition.function'", "bald", "random", "hybrid", "certainty"]),
    (["training.batch_size=5", "training.micro_batch_size=2"],
     ["'training.batch_size'", "multiple of training.micro_batch_size"]),
    (["model.policy=/nonexistent"], ["'model.policy'", "not found", "/nonexistent"]),
    (["model.policy=asset:nope"], ["'model.policy'", "unknown asset 'nope'", "known:"]),
    (["model.reference=/nonexistent"], ["'model.reference'", "not found"]),
    (["data.path=/nonexistent/prompts.jsonl"], ["'data.path'", "not found"]),
    (["generation.pair_temperature=0"], ["'generation.pair_temperature'", "> 0"]),
    (["generation.entropy_temperature=-1"], ["'generation.entropy_temperature'", "> 0"]),
    (["eval.temperature=-0.5"], ["'eval.temperature'", ">= 0"]),
    (["oracle.temperature=-0.1"], ["'oracle.temperature'", ">= 0"]),
    (["oracle.api_key_env=sk-abc123"], ["'oracle.api_key_env'", "NAME of an environment variable"]),
    (["oracle.kind=llm_judge", "oracle.model=gpt", "oracle.api_key_env=sk-abc123"],
     ["'oracle.api_key_env'", "NAME of an environment variable"]),
    (["oracle.kind=llm_judge"], ["'oracle.model'", "required"]),
])
def test_bad_values_name_key_and_allowed(tiny_overrides, extra, expected):
    message = config_error(tiny_overrides, *extra)
    for part in expected:
        assert part in message, (part, message)


def test_file_source_needs_a_path(tiny_overrides):
    without_path = [o for o in tiny_overrides if not o.startswith("data.path=")]
    message = config_error(without_path)
    assert "'data.path'" in message and "required when data.source=file" in message


def test_override_without_equals(tiny_overrides):
    message = config_error(tiny_overrides, "training.beta")
    assert "'training.beta'" in message and "key=value" in message


def test_missing_policy_is_reported():
    with pytest.raises(ConfigError, match="model.policy"):
        load_config(TINY, [])


# labels_per_round = M = 8, f_p = 2, f_g = 2 in tiny_overrides; rules of counts.round_counts:
# random M, entropy f_p*M, certainty/uncertainty f_g*M, hybrid f_p*f_g*M candidate prompts.
@pytest.mark.parametrize("function, factors, need", [
    ("random", (2, 2), 8),
    ("entropy", (3, 2), 24),
    ("certainty", (2, 5), 40),
    ("uncertainty", (2, 5), 40),
    ("hybrid", (3, 5), 120),
])
def test_check_pool_size(tiny_overrides, function, factors, need):
    f_p, f_g = factors
    cfg = load(tiny_overrides, f"acquisition.function={function}",
               f"acquisition.prompt_factor={f_p}", f"acquisition.pair_factor={f_g}")
    check_pool_size(cfg, need)  # exactly enough
    with pytest.raises(ConfigError) as e:
        check_pool_size(cfg, need - 1)
    assert "acquisition.labels_per_round" in str(e.value)
    assert str(need) in str(e.value)


def test_changed_keys(tiny_overrides):
    old = load(tiny_overrides)
    assert changed_keys(old, load(tiny_overrides)) == []
    assert changed_keys(old, load(tiny_overrides, "seed=1")) == [("seed", 0, 1)]
    assert changed_keys(old, load(tiny_overrides, "training.beta=0.5")) == [("training.beta", 0.1, 0.5)]
    assert changed_keys(old, load(tiny_overrides, "loop.rounds=7", "scoring.batch_size=3")) == []
    both = changed_keys(old, load(tiny_overrides, "loop.rounds=7", "training.lr=0.01"))
    assert [k for k, _, _ in both] == ["training.lr"]
    # whole resumable sections, list values included; choices come back as plain strings
    assert changed_keys(old, load(tiny_overrides, "slurm.extra=[--constraint=h100]", "launcher.executor=local",
                                  "generation.servers.urls=[http://a:8000/v1]", "oracle.timeout=5")) == []
    diff = changed_keys(old, load(tiny_overrides, "acquisition.function=hybrid", "slurm.time=1:00:00"))
    assert diff == [("acquisition.function", "random", "hybrid")] and type(diff[0][2]) is str


# The keys that may change on resume: those config.py listed before they were declared with the fields, and
# generation.servers.max_restarts (added since; a restart limit changes no result).
RESUMABLE_BEFORE = {
    "assets_dir", "loop.rounds", "loop.tensorboard", "loop.num_threads", "scoring.batch_size",
    "training.checkpoint_every_steps",
    *(f"launcher.{k}" for k in ("accelerate_config", "scoring_processes", "training_processes",
                                "collective_timeout_s", "executor")),
    *(f"generation.servers.{k}" for k in ("urls", "num_local", "model", "concurrency", "max_retries",
                                          "request_timeout", "startup_timeout", "max_restarts")),
    *(f"slurm.{k}" for k in ("partition", "account", "qos", "time", "nodes", "gpus_per_node", "cpus_per_task",
                             "mem", "generation_nodes", "servers_per_node", "generation_gpus_per_node",
                             "signal_seconds", "setup", "python", "array_parallel", "extra")),
    *(f"{section}.{k}" for section in ("oracle", "eval.oracle")
      for k in ("base_url", "api_key_env", "max_concurrency", "requests_per_minute", "tokens_per_minute", "timeout",
                "max_retries", "batch_size", "max_labels", "max_cost")),
}


def test_resumable_keys_are_the_ones_listed_before():
    assert resumable_keys() == RESUMABLE_BEFORE


@pytest.mark.parametrize("key, allowed", [
    ("model.dtype", "float32, bfloat16, float16"),
    ("data.source", "movie_reviews, imdb, tldr, file, fortunes"),
    ("generation.backend", "hf, vllm, vllm_server, auto"),
    ("generation.vllm.dtype", "float32, bfloat16, float16"),
    ("scoring.entropy_estimator", "mc, token"),
    ("acquisition.function", "random, entropy, certainty, uncertainty, hybrid, epistemic, thompson, diverse, "
                             "diverse_certainty"),
    ("oracle.kind", "sentiment, llm_judge, reward_model, custom, readability"),
    ("oracle.noise", "none, bradley_terry"),
    ("oracle.task", "sentiment, summary, helpfulness"),
    ("oracle.answer", "text, logprob"),
    ("eval.oracle.kind", "sentiment, llm_judge, reward_model, custom, readability"),
    ("eval.oracle.answer", "text, logprob"),
    ("training.init", "sft, previous"),
    ("training.mixed_precision", "no, bf16"),
    ("eval.reference", "sft, dataset"),
    ("launcher.executor", "auto, local, slurm"),
])
def test_bad_choice_names_key_and_allowed_values(tiny_overrides, key, allowed):
    assert config_error(tiny_overrides, f"{key}=bogus") == f"config key '{key}': got 'bogus', allowed: {allowed}"


def test_choices_are_strings_everywhere(tiny_overrides, tmp_path):
    cfg = load(tiny_overrides, "acquisition.function=hybrid", "model.dtype=bfloat16", "training.mixed_precision=bf16")
    a = cfg.acquisition.function
    assert a is AcquisitionFunction.hybrid and a == "hybrid" and a in ("entropy", "hybrid") and f"{a}" == "hybrid"
    assert {"hybrid": 1}[a] == 1 and {DType.bfloat16: 2}["bfloat16"] == 2
    assert cfg.generation.vllm.dtype is None  # null = model.dtype
    text = to_yaml(cfg)
    assert "function: hybrid\n" in text and "mixed_precision: bf16\n" in text and "!!" not in text
    assert OmegaConf.create(text).acquisition.function == "hybrid"  # plain YAML, readable without the schema
    back = from_yaml_text(text)
    assert back.acquisition.function is AcquisitionFunction.hybrid and changed_keys(cfg, back) == []
    assert to_yaml(back) == text
    values = OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(json.dumps(values))["acquisition"]["function"] == "hybrid"
    assert json.dumps({"noise": cfg.oracle.noise}) == '{"noise": "none"}'  # oracle identities hash the same
    # a config written before generation.vllm.dtype was a choice ("" = model.dtype) reads as unchanged
    old = from_yaml_text(text.replace("  dtype: null\n", "  dtype: ''\n"))
    assert old.generation.vllm.dtype is None and changed_keys(old, cfg) == []
    path = tmp_path / "old.yaml"
    path.write_text("generation:\n  vllm:\n    dtype: ''\n")
    assert load_config(path, tiny_overrides).generation.vllm.dtype is None
    assert load(tiny_overrides, "generation.vllm.dtype=float16").generation.vllm.dtype == "float16"



# Paper settings (Muldrew et al. 2024, section 5): M = 128, f_p / f_g = 8/32 (IMDB), 4/16 (TL;DR),
# beta 0.2, lr 1e-6, 50 / 70 epochs, effective batch 64, pairs at T = 0.7, eval at T = 0.25.
@pytest.mark.parametrize("name, function, f_p, f_g, epochs, labels", [
    ("paper_imdb", "hybrid", 8, 32, 50, 768),
    ("paper_tldr", "certainty", 4, 16, 70, 512),
])
def test_paper_configs_validate(name, function, f_p, f_g, epochs, labels):
    cfg = load_config(CONFIGS / f"{name}.yaml", [])
    assert cfg.name == name
    a, t = cfg.acquisition, cfg.training
    assert (a.function, a.labels_per_round, a.prompt_factor, a.pair_factor) == (function, 128, f_p, f_g)
    assert (t.beta, t.lr, t.epochs, t.batch_size, t.init) == (0.2, 1e-6, epochs, 64, "sft")
    assert (cfg.generation.pair_temperature, cfg.eval.temperature) == (0.7, 0.25)
    assert cfg.loop.rounds * a.labels_per_round == labels


def test_missing_or_broken_config_file_is_one_clear_line(tmp_path, capsys):
    from apo_dist.cli import main

    assert main(["run", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"config error: config file not found: {tmp_path / 'missing.yaml'}"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {policy: [unclosed\n")
    assert main(["run", str(broken), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {broken} is not valid YAML") and "Traceback" not in err


def test_batch_divisibility_across_ranks_is_refused_before_any_compute(tiny_overrides, tmp_path, capsys):
    from apo_dist.cli import main

    bad = [*tiny_overrides, "training.batch_size=8", "training.micro_batch_size=8", "launcher.training_processes=2"]
    with pytest.raises(ConfigError, match=r"training.batch_size.*8 x 2 = 16"):
        load_config(CONFIG, bad)
    assert main(["run", str(CONFIG), "--dry-run", "--run-dir", str(tmp_path / "run"), *bad]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_export_labels_of_a_file_that_is_no_store_is_one_line(tmp_path, capsys):
    from apo_dist.cli import main

    junk = tmp_path / "labels.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    assert main(["export-labels", str(junk), str(tmp_path / "out.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{junk}: not an apo-dist label store") and "Traceback" not in err
    assert junk.read_bytes() == b"this is not a database" * 100 and not (tmp_path / "out.parquet").exists()


def test_malformed_data_row_is_one_line(tiny_overrides, tmp_path, capsys):
    from apo_dist.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"text": "a good film"}\n{"text": "unclosed\n')
    code = main(["run", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--no-progress", *tiny_overrides,
                 f"data.path={data}"])
    err = capsys.readouterr().err
    assert code == 2 and "data error:" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["file", "someone's folder", "broken config.yaml"])
def test_a_run_directory_that_is_not_one_is_refused_untouched(case, tiny_overrides, tmp_path, capsys):
    from apo_dist.cli import main

    run_dir = tmp_path / "run"
    if case == "file":
        run_dir.write_text("notes\n")
    else:
        run_dir.mkdir()
        (run_dir / ("notes.txt" if case == "someone's folder" else "config.yaml")).write_text("model: [unclosed\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["run", str(CONFIG), "--run-dir", str(run_dir), "--no-progress", *tiny_overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"run directory: {run_dir}") and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case, kind", [("missing.jsonl", "config"), ("a folder.jsonl", "config"),
                                        ("not text.jsonl", "data"), ("not json.json", "data"),
                                        ("not parquet.parquet", "data")])
def test_an_unreadable_data_file_is_one_line(case, kind, tiny_overrides, tmp_path, capsys):
    from apo_dist.cli import main

    data = tmp_path / case.replace(" ", "_")
    if case.startswith("a folder"):
        data.mkdir()
    elif not case.startswith("missing"):
        data.write_bytes(bytes(range(256)) * 4)
    code = main(["run", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--no-progress", *tiny_overrides,
                 f"data.path={data}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"{kind} error:") and str(data) in err
    assert "Traceback" not in err
