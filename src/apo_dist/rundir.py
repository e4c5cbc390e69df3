"""The run directory: atomic files, per-stage manifests, state.json and metrics.jsonl.

A stage is done when its manifest exists, every file it lists has the recorded size and sha256,
and the upstream manifests it was computed from are unchanged. Anything else means "redo".
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .errors import NotARunDir, RunBusy


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_table(path: Path, df: pd.DataFrame) -> None:
    """Write a parquet table atomically (a crash never leaves a half-written file under `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(path: Path) -> Iterable[Path]:
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file())
    elif path.exists():
        yield path


RUN = "run"  # the "round" of the run-level stages (prompts, eval_reference), whose files sit at the top

# Every file a stage writes, by name: the stages' declared outputs and their readers use these names.
RUN_FILES = {"prompts": "prompts.parquet", "eval_reference": "eval_reference.parquet"}
ROUND_FILES = {
    "pool": "pool.parquet",
    "entropy_samples": "entropy_samples.parquet",
    "entropy": "entropy.parquet",
    "samples": "samples.parquet",
    "scores": "scores.parquet",
    "history": "history.parquet",  # feature functions: earlier rounds' labelled pairs under this round's policy
    "acquired": "acquired.parquet",
    "labels": "labels.parquet",
    "policy": "policy",  # an HF checkpoint folder
    "train_log": "train_log.jsonl",
    "eval": "eval.json",
    "eval_samples": "eval_samples.parquet",
}


# What apo-dist may write into a run directory before its config.yaml: the lock, `submit`'s job
# scripts and logs (a heterogeneous job's server logs too), a rehearsal's stand-ins.
WRITTEN_BEFORE_CONFIG = {".lock", "slurm", "rehearsal"}


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def labels_db(self) -> Path:
        return self.root / "labels.sqlite"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def stop_path(self) -> Path:
        """Present while a stop is requested (SIGUSR1): every process of the run stops at its next safe point."""
        return self.root / "stop_requested"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def check_is_run(self) -> None:
        """Raise NotARunDir unless the root is absent, empty, or a run directory (it has config.yaml,
        or only what apo-dist writes there before it): a run never writes into someone's folder."""
        if self.root.exists() and not self.root.is_dir():
            raise NotARunDir(f"{self.root} is a file, not a run directory")
        if self.root.is_dir() and not self.config_path.exists():
            other = sorted(p.name for p in self.root.iterdir() if p.name not in WRITTEN_BEFORE_CONFIG)
            if other:
                raise NotARunDir(f"{self.root} is not an apo-dist run directory (no config.yaml; it holds "
                                 f"{', '.join(other[:3])}{' ...' if len(other) > 3 else ''}); use a new or empty --run-dir")

    @contextmanager
    def lock(self):
        """Hold the run's lock while the block runs: one coordinator (with the ranks it launches,
        which never take it) writes a run directory at a time. Raises RunBusy at once, naming the
        holder, when another process holds it.

        An exclusive fcntl.flock on <run>/.lock, which the kernel releases when the holder dies,
        even by SIGKILL, so a crashed run never leaves a stale lock behind; the file's content (the
        holder's pid, host and start time) only serves the message. On NFS, flock is emulated with
        POSIX byte-range locks through the lock manager (Linux >= 2.6.12): it still excludes
        coordinators on other hosts as long as lockd/NLM (or NFSv4 locking) works on that mount, and
        a lock whose holder's host crashed is released only when the server notices.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusy(f"{self.root} is in use by another coordinator ({self._lock_holder()}); "
                              f"wait for it to end or stop it, or use another --run-dir") from None
            since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # still held: nobody reads a finished holder
        finally:
            os.close(fd)  # releases the lock

    def _lock_holder(self) -> str:
        """The holder as "pid P on HOST since T", from the lock file (it may not have written it yet)."""
        for _ in range(20):
            try:
                h = json.loads(self.lock_path.read_text())
                return f"pid {h['pid']} on {h['host']} since {h['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return "holder unknown"

    def request_stop(self, why: str) -> None:
        """Ask every process of this run to stop at its next safe point (safe in a signal handler)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_path.write_text(why)

    def round_dir(self, r: int) -> Path:
        return self.root / f"round_{r:04d}"

    def scope(self, round_: int | str) -> Path:
        """The folder of a round's files (the run directory itself for RUN)."""
        return self.root if round_ == RUN else self.round_dir(int(round_))

    def path(self, name: str, round_: int | str = RUN) -> Path:
        """Where the output `name` (a key of RUN_FILES or ROUND_FILES) of `round_` lives."""
        return self.scope(round_) / (RUN_FILES if round_ == RUN else ROUND_FILES)[name]

    def table(self, name: str, round_: int | str = RUN) -> pd.DataFrame:
        return read_table(self.path(name, round_))

    def rounds(self) -> list[int]:
        return sorted(int(p.name.split("_")[1]) for p in self.root.glob("round_[0-9][0-9][0-9][0-9]"))

    # --- manifests -------------------------------------------------------------------------
    def manifest_path(self, scope: Path, stage: str) -> Path:
        return scope / f".{stage}.manifest.json"

    def write_manifest(self, scope: Path, stage: str, outputs: list[str], inputs: dict[str, str],
                       extra: dict | None = None) -> str:
        """Record sizes and hashes of `outputs` (paths relative to `scope`); returns its digest."""
        files = {}
        for name in outputs:
            for f in _files_under(scope / name):
                rel = str(f.relative_to(scope))
                files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            if not (scope / name).exists():
                raise FileNotFoundError(f"stage {stage} did not write {scope / name}")
        manifest = {"stage": stage, "outputs": outputs, "files": files, "inputs": inputs,
                    "time": time.time(), **(extra or {})}
        atomic_write_json(self.manifest_path(scope, stage), manifest)
        return self.manifest_digest(scope, stage)

    def manifest_digest(self, scope: Path, stage: str) -> str:
        m = json.loads(self.manifest_path(scope, stage).read_text())
        return hashlib.sha256(json.dumps(m["files"], sort_keys=True).encode()).hexdigest()

    def check_manifest(self, scope: Path, stage: str, inputs: dict[str, str]) -> str | None:
        """Why the stage must be redone, or None when its outputs are intact and current."""
        path = self.manifest_path(scope, stage)
        if not path.exists():
            return "not done"
        try:
            m = json.loads(path.read_text())
            files = m["files"]
        except (ValueError, KeyError):
            return "manifest unreadable"
        if m.get("inputs") != inputs:
            return "inputs changed since it ran"
        for name in m["outputs"]:
            if not (scope / name).exists():
                return f"output {name} missing"
        present = {str(f.relative_to(scope)) for name in m["outputs"] for f in _files_under(scope / name)}
        if present != set(files):
            return "output files differ from the manifest"
        for rel, info in files.items():
            f = scope / rel
            if f.stat().st_size != info["bytes"]:
                return f"{rel} has {f.stat().st_size} bytes, manifest says {info['bytes']}"
            if sha256_file(f) != info["sha256"]:
                return f"{rel} does not match its manifest hash"
        return None

    def clear_stage(self, scope: Path, stage: str, outputs: list[str]) -> None:
        self.manifest_path(scope, stage).unlink(missing_ok=True)
        for name in outputs:
            p = scope / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    # --- state and metrics -----------------------------------------------------------------
    def read_state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {}

    def update_state(self, **fields: Any) -> None:
        state = self.read_state()
        state.update(fields, updated=time.time())
        atomic_write_json(self.state_path, state)

    def log_metrics(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a crash
                continue
        return rows
