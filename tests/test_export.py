"""`apo-dist export-labels --format preference`: a label store filled through the real store API by
real oracles, exported as prompt/chosen/rejected pairs, loaded with `datasets`, checked against the
store and the oracles, and trained on for one DPO step on the tiny model."""

import math

import pandas as pd
import pytest
import torch

from apo_dist.cli import main
from apo_dist.config import TrainingConfig
from apo_dist.oracles.custom import CustomOracle
from apo_dist.oracles.sentiment import SentimentOracle
from apo_dist.oracles.store import open_store

# (prompt, a, b) for the sentiment oracle: a wins, b wins, a tie (neither side has a sentiment), a wins
SENTIMENT = [("The movie was", " great and wonderful", " terrible and boring"),
             ("The film was", " awful", " brilliant"),
             ("The plot was", " the cast", " the script"),
             ("The acting", " was good", " was bad")]
# for length_share: soft answers 0.6 and 2/9, a soft tie, and an unlabelable pair
SOFT = [("p", " long one", " short"), ("p", " x", " longer"), ("p", " same", " SAME"), ("p", " what?", " ok")]


def length_share(prompts, a, b):
    """A soft labeller: P(a preferred) = a's share of the two lengths; None (unlabelable) for a question."""
    return [None if "?" in x + y else len(x) / (len(x) + len(y)) for x, y in zip(a, b)]


def fill(location) -> str:
    """The label store at `location`, answered by the sentiment oracle and by the soft custom labeller."""
    s = open_store(location)
    for oracle, pairs in ((SentimentOracle(), SENTIMENT), (CustomOracle("tests.test_export:length_share"), SOFT)):
        s.label(oracle, *map(list, zip(*pairs)), progress=False)
    s.close()
    return str(location)


@pytest.fixture
def store(tmp_path) -> str:
    return fill(tmp_path / "labels.sqlite")


def stored(path) -> pd.DataFrame:
    s = open_store(path, readonly=True)
    table = s.export()
    s.close()
    return table.set_index("key")


def load(path, tmp_path):
    from datasets import load_dataset

    kind = "parquet" if path.suffix == ".parquet" else "json"
    return load_dataset(kind, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf_cache"))


def test_preference_export_has_the_preferred_side_as_chosen(store_location, tmp_path, capsys):
    store = fill(store_location)  # SQLite and PostgreSQL
    out = tmp_path / "export" / "pairs.parquet"
    assert main(["export-labels", store, str(out), "--format", "preference"]) == 0
    assert capsys.readouterr().out.strip() == f"5 preference pairs -> {out} (left out: 1 unlabelable, 2 ties)"
    data = load(out, tmp_path)
    assert data.column_names == ["prompt", "chosen", "rejected", "p_chosen", "oracle", "key"]
    rows = data.to_pandas()
    table = stored(store)
    for row in rows.itertuples():
        label = table.loc[row.key, "label"]  # P(the store's first preferred)
        assert table.loc[row.key, "status"] == "ok" and label != 0.5
        first, second = table.loc[row.key, "first"], table.loc[row.key, "second"]
        assert (row.chosen, row.rejected) == ((first, second) if label > 0.5 else (second, first))
        assert row.p_chosen == pytest.approx(max(label, 1 - label)) and row.p_chosen > 0.5
        assert row.oracle == table.loc[row.key, "oracle"] and row.prompt == table.loc[row.key, "prompt"]
    # against the oracles themselves: VADER scores chosen higher; the labeller's share of lengths
    oracle = SentimentOracle()
    sentiment = rows[rows["oracle"] == oracle.identity]
    assert len(sentiment) == 3 and (sentiment["p_chosen"] == 1.0).all()
    assert all(oracle.score(r.prompt + r.chosen) > oracle.score(r.prompt + r.rejected) for r in sentiment.itertuples())
    soft = rows[rows["oracle"] != oracle.identity].set_index("chosen")
    assert soft["rejected"].to_dict() == {" long one": " short", " longer": " x"}
    assert soft["p_chosen"].to_dict() == pytest.approx({" long one": 9 / 15, " longer": 7 / 9})


def test_keep_ties_as_json_lines(store, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["export-labels", str(store), str(out), "--format", "preference", "--keep-ties"]) == 0
    assert capsys.readouterr().out.strip() == f"7 preference pairs -> {out} (left out: 1 unlabelable)"
    rows = load(out, tmp_path).to_pandas()
    ties = rows[rows["p_chosen"] == 0.5]
    assert sorted(zip(ties["chosen"], ties["rejected"])) == [(" SAME", " same"), (" the cast", " the script")]
    assert (ties["chosen"] < ties["rejected"]).all()  # the store's canonical order


def test_raw_export_stays_the_default_in_both_formats(store, tmp_path, capsys):
    assert main(["export-labels", str(store), str(tmp_path / "raw.parquet")]) == 0
    assert main(["export-labels", str(store), str(tmp_path / "raw.jsonl"), "--format", "raw"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"8 answers -> {tmp_path / 'raw.parquet'}",
                                                    f"8 answers -> {tmp_path / 'raw.jsonl'}"]
    parquet, jsonl = pd.read_parquet(tmp_path / "raw.parquet"), load(tmp_path / "raw.jsonl", tmp_path).to_pandas()
    assert list(parquet["key"]) == list(jsonl["key"]) == list(stored(store).index)
    assert sorted(parquet["status"]) == ["ok"] * 7 + ["unlabelable"]


@pytest.mark.parametrize("args, message", [
    (["--format", "dpo"], "--format dpo: one of raw, preference"),
    (["--keep-ties"], "--keep-ties goes with --format preference"),
])
def test_bad_options_are_one_line(store, tmp_path, capsys, args, message):
    out = tmp_path / "pairs.parquet"
    assert main(["export-labels", str(store), str(out), *args]) == 2
    assert capsys.readouterr().err.splitlines() == [message] and not out.exists()


def test_bad_output_or_store_is_one_line(store, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    assert main(["export-labels", str(store), str(csv), "--format", "preference"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{csv}: the output must end in .parquet or .jsonl (Parquet or JSON lines)"]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    under_a_file = blocker / "pairs.parquet"
    assert main(["export-labels", str(store), str(under_a_file), "--format", "preference"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{under_a_file}: cannot write (")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    assert main(["export-labels", str(junk), str(tmp_path / "x.parquet"), "--format", "preference"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{junk}: not an apo-dist label store")
    assert not (tmp_path / "x.parquet").exists() and blocker.read_text() == "not a folder"


def test_one_dpo_step_on_the_exported_pairs(store, tmp_path, tiny_model_dir, tiny_tokenizer):
    """The loaded data set, tokenized with the tiny tokenizer, is what train_dpo trains on (label 1:
    chosen preferred), with reference log-probs of the tiny model."""
    from safetensors.torch import load_file

    from apo_dist.models import load_model
    from apo_dist.scoring import sequence_logprobs
    from apo_dist.training import train_dpo

    out = tmp_path / "pairs.parquet"
    assert main(["export-labels", str(store), str(out), "--format", "preference"]) == 0
    data = load(out, tmp_path)
    prompts = [tiny_tokenizer(p)["input_ids"] for p in data["prompt"]]
    chosen = [tiny_tokenizer(c, add_special_tokens=False)["input_ids"] for c in data["chosen"]]
    rejected = [tiny_tokenizer(r, add_special_tokens=False)["input_ids"] for r in data["rejected"]]
    n, pad = len(data), tiny_tokenizer.pad_token_id
    ref = sequence_logprobs(load_model(str(tiny_model_dir), device="cpu"), prompts + prompts, chosen + rejected, pad,
                            progress=False)["logp"].values
    pairs = pd.DataFrame({"prompt_ids": prompts, "tokens_a": chosen, "tokens_b": rejected,
                          "ref_logp_a": ref[:n], "ref_logp_b": ref[n:], "label": 1.0})
    tcfg = TrainingConfig(beta=0.1, lr=1e-2, epochs=1, batch_size=n, micro_batch_size=n)
    result = train_dpo(pairs, str(tiny_model_dir), tmp_path / "policy", tcfg, seed=0, progress=False)
    assert result.steps == 1 and math.isfinite(result.history[0]["loss"])
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "policy" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
