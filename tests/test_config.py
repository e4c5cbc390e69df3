"""load_config validation, pool-size checks and resume diffs (DESIGN.md section 2 for the counts)."""

from pathlib import Path

import pytest

from apo_dist.config import ConfigError, changed_keys, load_config
from apo_dist.counts import check_pool_size

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
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


# labels_per_round = M = 8, f_p = 2, f_g = 2 in tiny_overrides; rules from DESIGN.md section 2:
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



# Paper settings from DESIGN.md section 2: M = 128, f_p / f_g = 8/32 (IMDB), 4/16 (TL;DR),
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
