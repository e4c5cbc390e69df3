"""Prompt pools: read a source, clean it, and split it into disjoint train and eval prompts.

Every row read gets `prompt_id` = its position in the source, so ids are stable and unique.
Cleaning drops, in this order and counting each: rows whose bytes are not valid UTF-8,
rows without a reference text (only when eval.reference=dataset reads one per row),
empty or whitespace-only prompts, prompts over `data.max_prompt_tokens` tokens, and repeats
of an earlier prompt.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .assets import cache_dir, ensure_fortunes, ensure_movie_reviews

log = logging.getLogger("apo_dist.data")

# source -> (hub name, prompt column, reference column: "" = none); tldr's label is the human summary
HUB_DATASETS = {"imdb": ("imdb", "text", ""), "tldr": ("CarperAI/openai_summarize_tldr", "prompt", "label")}
PREFIX_SOURCES = ("movie_reviews", "imdb", "fortunes")  # prompts are the first k tokens of each text
PACKAGED_SOURCES = {"movie_reviews": ensure_movie_reviews, "fortunes": ensure_fortunes}  # offline assets (assets.py)
# Rows of each source's train split before cleaning, for plans made without reading it: IMDB's
# 25,000 train reviews, and CarperAI/openai_summarize_tldr's train split (116,722 rows, its dataset card).
HUB_TRAIN_ROWS = {"imdb": 25_000, "tldr": 116_722}
# Rows of the packaged assets: movie-review sentences (assets.MOVIE_REVIEWS), prose fortunes (assets.FORTUNES).
PACKAGED_ROWS = {"movie_reviews": 10_605, "fortunes": 12_273}


class DataError(ValueError):
    """The prompt source cannot be read or yields too few prompts."""


def load_prompts(cfg: DictConfig, tokenizer) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train, eval, report): prompt tables with columns prompt_id, prompt, and the cleaning counts.

    With eval.reference=dataset the tables also hold `reference`, each row's reference text."""
    d = cfg.data
    values = _read_source(cfg)
    report = {"read": len(values)}
    texts = {i: _as_text(v) for i, v in enumerate(values)}
    texts = _drop(texts, [t is None for t in texts.values()], report, "dropped_undecodable")
    references = None
    if cfg.eval.reference == "dataset":
        references = {i: _as_text(v) for i, v in enumerate(_read_references(cfg))}
        texts = _drop(texts, [not (references[i] or "").strip() for i in texts], report,
                      "dropped_no_reference")
    if d.source in PREFIX_SOURCES:
        texts = _prefixes(texts, tokenizer, d.prompt_min_tokens, d.prompt_max_tokens, cfg.seed)
    texts = _drop(texts, [not t.strip() for t in texts.values()], report, "dropped_empty")
    lengths = [len(ids) for ids in _token_ids(list(texts.values()), tokenizer)]
    texts = _drop(texts, [n > d.max_prompt_tokens for n in lengths], report, "dropped_overlong")
    texts = _drop(texts, _repeats(list(texts.values())), report, "dropped_duplicate")
    report["kept"] = len(texts)
    if len(texts) < d.n_eval + 1:
        raise DataError(
            f"data.source={d.source}: only {len(texts)} usable prompts remain of {report['read']} rows read "
            f"({_dropped(report)}), but data.n_eval={d.n_eval} needs at least {d.n_eval + 1} "
            f"(the eval prompts plus at least one training prompt)"
        )
    train, evaluation = _split(texts, d.n_eval, cfg.seed)
    if references is not None:
        for table in (train, evaluation):
            table["reference"] = [references[int(i)] for i in table["prompt_id"]]
    report["n_train"], report["n_eval"] = len(train), len(evaluation)
    log.info("prompts from %s: %s", d.source, ", ".join(f"{k} {v}" for k, v in report.items()))
    return train, evaluation, report


def _read_source(cfg: DictConfig) -> list:
    source = cfg.data.source
    if source in PACKAGED_SOURCES:
        return _read_file(PACKAGED_SOURCES[source](cache_dir(cfg.assets_dir)), "text")
    if source == "imdb":
        return [" ".join(t.replace("<br />", " ").split()) for t in _hub_texts(source, HUB_DATASETS[source][1])]
    if source == "tldr":
        return _hub_texts(source, HUB_DATASETS[source][1])
    return _read_file(Path(cfg.data.path).expanduser(), cfg.data.text_field)


def _read_references(cfg: DictConfig) -> list:
    """The reference text of every row, aligned with _read_source (config validation allows tldr, file)."""
    if cfg.data.source == "file":
        return _read_file(Path(cfg.data.path).expanduser(), cfg.data.reference_field, "data.reference_field")
    return _hub_texts(cfg.data.source, HUB_DATASETS[cfg.data.source][2])


def _hub_texts(source: str, field: str) -> list[str]:
    """The train split's `field` column of a Hugging Face hub dataset."""
    import datasets

    name = HUB_DATASETS[source][0]
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataError(
            f"data.source={source} loads {name!r} with datasets.load_dataset and needs internet access "
            f"to the Hugging Face hub; use data.source=movie_reviews or file offline "
            f"({type(e).__name__}: {e})"
        ) from e
    return list(rows[field])


def _read_file(path: Path, field: str, key: str = "data.text_field") -> list:
    """The `field` value (set by config `key`) of every row of a .jsonl, .json (list of objects) or .parquet file."""
    try:
        return _read_rows(path, field, key)
    except DataError:
        raise
    except (OSError, ValueError) as e:  # unreadable, not JSON, not parquet
        raise DataError(f"{path}: cannot be read as {path.suffix or 'a prompt file'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _read_rows(path: Path, field: str, key: str) -> list:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, field, key)
    if suffix == ".json":
        rows = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json prompt file must hold a list of objects")
        return [_field(row, field, f"{path} item {i}", key) for i, row in enumerate(rows)]
    if suffix == ".parquet":
        table = pd.read_parquet(path)
        if field not in table.columns:
            raise DataError(f"{path}: no column {field!r} (set {key}); columns: {', '.join(table.columns)}")
        return table[field].tolist()
    raise DataError(f"{path}: unsupported prompt file type {suffix!r}; use .jsonl, .json or .parquet")


def _read_jsonl(path: Path, field: str, key: str) -> list:
    values = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            values.append(line)  # left as bytes: counted as undecodable
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e})") from None
        values.append(_field(row, field, f"{path} line {number}", key))
    return values


def _field(row, field: str, where: str, key: str):
    if not isinstance(row, dict) or field not in row:
        raise DataError(f"{where}: no field {field!r} (set {key})")
    return row[field]


def _as_text(value) -> str | None:
    """The text of a row, or None when it is undecodable (invalid UTF-8, or holds U+FFFD)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if not isinstance(value, str):
        raise DataError(f"prompt texts must be strings, got {type(value).__name__}: {value!r:.80}")
    return None if "\ufffd" in value else value


def _drop(texts: dict[int, str], bad: list[bool], report: dict, key: str) -> dict[int, str]:
    report[key] = sum(bad)
    return {i: t for (i, t), b in zip(texts.items(), bad) if not b}


def _token_ids(texts: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _prefixes(texts: dict[int, str], tokenizer, low: int, high: int, seed: int) -> dict[int, str]:
    """The first k tokens of each text as text, k uniform in [low, high] and at most its length."""
    ks = np.random.default_rng([seed, 1]).integers(low, high + 1, size=len(texts))
    ids = _token_ids(list(texts.values()), tokenizer)
    return {i: _decode_prefix(row, int(k), tokenizer) for i, row, k in zip(texts, ids, ks)}


def _decode_prefix(ids: list[int], k: int, tokenizer) -> str:
    """Decode ids[:k], shortened while the cut splits a multi-byte character; no trailing space."""
    k = min(k, len(ids))
    while True:
        text = tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False)
        if k == 0 or "\ufffd" not in text:
            return text.rstrip()
        k -= 1


def _repeats(texts: list[str]) -> list[bool]:
    seen: set[str] = set()
    repeats = []
    for text in texts:
        key = text.strip()
        repeats.append(key in seen)
        seen.add(key)
    return repeats


def _split(texts: dict[int, str], n_eval: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shuffle with `seed`; the first n_eval prompts are the eval set, the rest the train pool."""
    ids = np.array(list(texts), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(ids))
    return _table(np.sort(ids[order[n_eval:]]), texts), _table(np.sort(ids[order[:n_eval]]), texts)


def _table(ids: np.ndarray, texts: dict[int, str]) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ids, "prompt": [texts[int(i)] for i in ids]})


def _dropped(report: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in report.items() if k.startswith("dropped_"))


def id_stride(max_prompt_id: int) -> int:
    """The power of ten above every prompt id: draw k of a prompt reused in a pool gets id k * stride + id."""
    return 10 ** len(str(max(int(max_prompt_id), 0)))


def cycle_prompts(train: pd.DataFrame, n: int, rng: np.random.Generator, stride: int) -> pd.DataFrame:
    """`n` draws from `train` (data.reuse_prompts): pass k over the prompts is a fresh permutation
    from `rng`, repeated until n are drawn, as a cycled data loader does. Each draw is its own row:
    prompt_id = k * stride + the prompt's id (stride > every id), which stays in source_prompt_id.
    Sorted by prompt_id."""
    if len(train) == 0:
        raise DataError("no training prompts to draw from")
    passes = -(-n // len(train))
    order = np.concatenate([rng.permutation(len(train)) for _ in range(passes)])[:n]
    drawn = train.iloc[order].reset_index(drop=True)
    source = drawn["prompt_id"].to_numpy(dtype=np.int64)
    if len(source) and source.max() >= stride:
        raise ValueError(f"id stride {stride} is not above every prompt id (max {source.max()})")
    drawn.insert(0, "source_prompt_id", source)
    drawn["prompt_id"] = np.arange(n, dtype=np.int64) // len(train) * stride + source
    return drawn.sort_values("prompt_id", kind="stable").reset_index(drop=True)


def source_rows(cfg: DictConfig) -> tuple[int | None, str]:
    """(rows, where the number comes from) of the prompt source before cleaning, without a download:
    a file's rows counted, a packaged asset's counted when cached (else its known size), the
    hub sources' known train-split sizes. None when it cannot be known here. Cleaning (and, for
    prefix prompts, repeats among the prefixes) can only lower it."""
    d = cfg.data
    if d.source in HUB_TRAIN_ROWS:
        name = HUB_DATASETS[d.source][0]
        return HUB_TRAIN_ROWS[d.source], f"{name}'s train split, a known constant"
    if d.source in PACKAGED_ROWS:
        path = cache_dir(cfg.assets_dir) / "data" / d.source / f"{d.source}.jsonl"
        if path.is_file():
            return _count_rows(path), f"counted in the cached asset {path}"
        return PACKAGED_ROWS[d.source], "the packaged asset's known size; not cached here"
    path = Path(d.path).expanduser()
    try:
        return _count_rows(path), f"counted in {path}"
    except Exception as e:  # unreadable here: the prompts stage will say why
        return None, f"{path} could not be counted ({type(e).__name__}: {e})"


def _count_rows(path: Path) -> int:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if suffix == ".json":
        rows = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json prompt file must hold a list of objects")
        return len(rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    raise DataError(f"{path}: unsupported prompt file type {suffix!r}")
