"""Chaos: the whole loop under many faults ends where an uninterrupted run ends.

One 2-round run on the tiny model (vLLM server generation, 2-rank scoring and training launched
with `accelerate launch`, an LLM judge reached through a proxy that turns 30% of its requests into
faults) is made to suffer, at seeded random moments spread over its stages:

- at least 10 SIGKILLs of the coordinator (`apo-dist run`, a subprocess): a couple right at
  startup, the rest mid-stage;
- one SIGKILL of a training rank (the APO_DIST_FAULT hook, "@1": rank 1 dies after a training step,
  right after its checkpoint), which fails the stage (exit 5);
- one SIGUSR1 (SLURM's warning signal), which stops the run at a safe point (exit 8);

and after each, the same command resumes it, until it exits 0. Then every stage's outputs (their
manifests' sha256 and upstream digests: every table, each round's policy weights and training log),
the label store (every comparison's answer; not who paid, when or how fast), every round's eval.json
(but for `oracle_requests`, the answers the stage's last attempt asked for) and policy tensors must
equal those of the uninterrupted reference run, bitwise; no comparison may have been sent to the
oracle again once its answer was stored (only one in flight at a fault may be asked again); and no
process of the run may be left, after any fault or at the end.

The reference runs at the same time, with the same config except how servers are reached (a vLLM
server of its own, started by its coordinator, since each life of the chaos run reloads the shared
one's weights; the judge without the proxy): keys that change no result.

Fault moments: each fault is a uniform random point on a nominal timeline of the run (its stages
in order, each as long as it about takes here), i.e. a stage and a fraction of it; sorted, so that
every life of the coordinator makes progress before the next fault. A life waits until state.json
shows the stage running, then the fault lands that fraction of the stage's duration later (the
reference's duration once it has done the stage, else the nominal one), in a later stage if this
attempt is quicker. A fault the run has already gone past, or that a life ended before, is drawn
again further on. The seed is printed (APO_TEST_CHAOS_SEED replays the plan; where faults land
depends on timing too), and so is a table of where each fault landed (state.json read right before
it): run with `-s` to see it.

Determinism: the judge answers with log-probabilities (oracle.answer=logprob) at temperature 0 from
a server that computes each request whole and alone (invariant_judge_server: max_num_seqs 1, no
prefix caching), so an answer depends on the request only, not on what else either run asks, or asked
before. vLLM's defaults do not give that on CPU (bf16), measured here: a forward step holding only
the last token of a prompt (left over by chunked prefill when a step's token budget ran out one
token early, or after a prefix-cache hit on all but that token) takes another matmul path and moved
the request's log-probs by a rounding step of a bf16 logit (up to 0.27; its P(A) by up to 0.02),
the likely cause of a CI failure in which a comparison asked again after a kill got another label;
with prefix caching and chunked prefill off, batched requests still differed, rarely (2 of ~2,300).
Generation uses per-request seeds; training resumes from its per-step checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from apo_dist.oracles.store import open_store

from .judge_server import JUDGE_KEY, JUDGE_MODEL, FaultProxy, invariant_judge_server  # noqa: F401 (fixture)
from .test_loop import CONFIG
from .test_orphans import ACCELERATE, output, processes_of, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")

SEED = int(os.environ.get("APO_TEST_CHAOS_SEED", "20261129"))
KEY_ENV = "APO_TEST_JUDGE_KEY"
COORDINATOR_KILLS = 10  # SIGKILLs delivered to a live coordinator, at least
STARTUP_KILLS = 2  # of them, right after the process starts (before its first stage)
STAGE_FAILED, PREEMPTED, ORACLE_FAILED = 5, 8, 7  # exit codes (README)
MAX_LIVES = 40  # a bound on the coordinator's lives (one per fault, plus resumes): the test cannot loop forever
HANG_SECONDS = 900  # a process that has not ended after this long is hung (a guard, not a speed check)
# The run's stages in order (certainty acquisition: no entropy samples) and about how long each
# takes on 2 CPU cores, the reference running alongside: the timeline the faults are drawn on.
STAGES = ["pool", "entropy", "samples", "scores", "acquired", "labels", "train", "eval"]
TIMELINE = [("run", "prompts"), ("run", "eval_reference"), *((r, s) for r in (0, 1) for s in STAGES)]
NOMINAL_SECONDS = {"prompts": 0.5, "eval_reference": 8, "pool": 0.3, "entropy": 0.3, "samples": 1, "scores": 18,
                   "acquired": 0.3, "labels": 6, "train": 18, "eval": 8}
STARTUP_SECONDS = 6  # a startup kill lands this long after the process starts, at most
TRAIN_STEPS = {0: 2, 1: 4}  # optimizer steps of each round: 8 then 16 labels, 4 pairs a step, 1 epoch
# Columns of the store that differ between runs by nature: who paid, when, how long it took.
RUN_DEPENDENT = ("run", "created", "latency", "cost")


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, JUDGE_KEY)


def chaos_overrides(tiny_overrides, policy_server: str, judge_url: str) -> list[str]:
    return [*tiny_overrides, "acquisition.function=certainty", "training.micro_batch_size=1",
            "training.checkpoint_every_steps=1",
            "launcher.accelerate_config=" + str(ACCELERATE / "cpu_2proc.yaml"), "launcher.scoring_processes=2",
            "launcher.training_processes=2", "launcher.collective_timeout_s=120",
            "generation.backend=vllm_server", f"generation.servers.urls=[{policy_server}]",
            "oracle.kind=llm_judge", f"oracle.model={JUDGE_MODEL}", f"oracle.base_url={judge_url}",
            f"oracle.api_key_env={KEY_ENV}", "oracle.answer=logprob", "oracle.temperature=0", "oracle.timeout=8",
            "oracle.max_concurrency=32", "oracle.batch_size=8"]


def start(run_dir: Path, overrides: list[str], fault: str | None = None) -> subprocess.Popen:
    """`apo-dist run` as its own process (output appended to <run_dir>.out); `fault`: APO_DIST_FAULT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APO_DIST_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if fault:
        env["APO_DIST_FAULT"] = fault
    with open(run_dir.parent / f"{run_dir.name}.out", "ab") as out:
        out.write(f"\n===== life started {time.time():.3f}{' with APO_DIST_FAULT=' + fault if fault else ''}\n".encode())
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "apo_dist.cli", "run", CONFIG, "--run-dir", str(run_dir),
                                 "--no-progress", *overrides], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def read_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def stage_times(run_dir: Path) -> list[tuple[tuple, float, float]]:
    """((round, stage), start, end) of every stage the run did, in order, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [((m["round"], m["stage"]), m["time"] - m["seconds"], m["time"]) for m in records]


def store_snapshot(db: Path) -> tuple[set[str], Counter]:
    """(keys answered, requests per key) of a label store, as committed."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        answered = {k for (k,) in con.execute("SELECT key FROM labels")}
        requests = Counter(dict(con.execute("SELECT key, COUNT(*) FROM requests GROUP BY key").fetchall()))
    return answered, requests


def store_rows(db: Path) -> pd.DataFrame:
    """Every answer of a store, by key, without the columns that differ between runs by nature."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        table = pd.read_sql_query("SELECT * FROM labels", con)
    return table.drop(columns=list(RUN_DEPENDENT)).sort_values("key").reset_index(drop=True)


def _plain(value):
    """A table cell as plain Python, for messages: numpy scalars and arrays become numbers and lists."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def differing_rows(ours: pd.DataFrame, theirs: pd.DataFrame, on: str, shown: tuple[str, ...],
                   notes: dict | None = None) -> str:
    """The rows of two tables, matched on column `on`, that differ in a column or are in one table only,
    a line each: the columns that differ and the `shown` ones, as "ours vs theirs", then notes[value of
    `on`] if any; "" when the tables hold the same rows."""
    def cells(table):
        return table.set_index(on).map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
    a, b = cells(ours), cells(theirs)
    index = a.index.union(b.index)
    a, b = a.reindex(index), b.reindex(index)
    differ = (a != b) & ~(a.isna() & b.isna())
    mine, refs = set(ours[on]), set(theirs[on])
    lines = []
    for key in index[differ.any(axis=1).to_numpy()]:
        if key not in mine or key not in refs:
            only, table = ("this run", a) if key in mine else ("the reference", b)
            text = f"only in {only}: " + "; ".join(f"{c} {_plain(table.at[key, c])!r}" for c in shown)
        else:
            text = "; ".join(f"{c} {_plain(a.at[key, c])!r} vs {_plain(b.at[key, c])!r}"
                             for c in a.columns if differ.at[key, c] or c in shown)
        lines.append(f"{on} {key}: {text}" + (f" [{notes[key]}]" if notes and key in notes else ""))
    return "\n".join(lines)


def differing_training_labels(run_dir: Path, reference: Path) -> str:
    """`differing_rows` of every round's labels.parquet, the run's against the reference's."""
    found = []
    for r in TRAIN_STEPS:
        paths = [d / f"round_{r:04d}" / "labels.parquet" for d in (run_dir, reference)]
        rows = differing_rows(*map(pd.read_parquet, paths), "pair_id", ("prompt", "label")) \
            if all(p.exists() for p in paths) else "missing: " + ", ".join(str(p) for p in paths if not p.exists())
        if rows:
            found.append(f"round {r} labels.parquet:\n{rows}")
    return "\n".join(found)


def manifests(run_dir: Path) -> dict[str, dict]:
    """Every stage's manifest by path: the sha256 of its files (eval.json aside) and its inputs."""
    found = {}
    for path in sorted(run_dir.rglob(".*.manifest.json")):
        m = json.loads(path.read_text())
        found[str(path.relative_to(run_dir))] = {
            "files": {name: f["sha256"] for name, f in m["files"].items() if name != "eval.json"},
            "inputs": m["inputs"]}
    return found


def policy_tensors(run_dir: Path, r: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / f"round_{r:04d}" / "policy" / "model.safetensors")


@dataclass
class Fault:
    kind: str  # "kill" (the coordinator), "startup" (a kill before its first stage), "usr1", "rank"
    position: float  # seconds into the nominal timeline
    target: tuple = ()  # (round, stage) the position falls in
    fraction: float = 0.0  # how far into that stage
    fault_env: str = ""  # "rank": the APO_DIST_FAULT value
    offset: float = 0.0  # seconds into the stage when it was delivered (startup: after the process started)
    # what happened
    delivered: bool = False
    life: int = -1
    at: float = 0.0  # seconds after the life started
    landed: str = ""  # round / stage / stage_status from state.json right before, or why it did not land
    launched: str = ""  # ranks of a launched stage alive at that moment
    exit_code: int | None = None
    inflight: set = field(default_factory=set)  # comparisons asked but not answered when it landed


class Chaos:
    """Plans the faults on a nominal timeline of the run and delivers them to successive lives of it."""

    def __init__(self, run_dir: Path, overrides: list[str], reference: Path, seed: int):
        self.run_dir, self.overrides, self.reference, self.rng = run_dir, overrides, reference, random.Random(seed)
        self.spans, t = [], 0.0
        for key in TIMELINE:
            self.spans.append((key, t, t + NOMINAL_SECONDS[key[1]]))
            t += NOMINAL_SECONDS[key[1]]
        self.order = {key: i for i, key in enumerate(TIMELINE)}
        self.total = t
        self.pending: list[Fault] = []
        self.faults: list[Fault] = []  # as delivered (or not)
        self.lives = 0
        self.snapshots: list[tuple[set, Counter]] = []  # the store after each fault

    # --- planning ------------------------------------------------------------------------
    def point(self, kind: str = "kill", after: float = 0.0, before: float = 0.8) -> Fault:
        """A uniform random point of the timeline between `after` seconds and `before` of its length,
        as a fault on the stage it falls in. Faults stay clear of the end, where the run may finish
        before they land: kills of its last fifth (a kill to draw after that is a startup kill), a
        SIGUSR1 of its last 30% (it needs a stage boundary after it to stop at; one to draw after that
        lands in the stage the run is at)."""
        end = (0.7 if kind == "usr1" else before) * self.total
        if after >= end:
            if kind == "kill":
                return Fault("startup", after, offset=self.rng.uniform(0.2, STARTUP_SECONDS))
            end = after + 1e-3
        position = self.rng.uniform(after, end)
        key, a, b = next(s for s in self.spans if s[1] <= position < s[2])
        return Fault(kind, position, key, (position - a) / (b - a))

    def plan(self) -> None:
        faults = [self.point() for _ in range(COORDINATOR_KILLS - STARTUP_KILLS)]
        for _ in range(STARTUP_KILLS):
            faults.append(Fault("startup", self.rng.uniform(0, self.total), offset=self.rng.uniform(0.2, STARTUP_SECONDS)))
        faults.append(self.point("usr1"))
        rank = Fault("rank", 0.0)
        self.aim_rank(rank, *self.rng.choice([(r, k) for r, n in TRAIN_STEPS.items() for k in range(1, n)]))
        self.pending = sorted([*faults, rank], key=lambda f: f.position)

    def aim_rank(self, f: Fault, r: int, step: int) -> None:
        f.target, f.fault_env = (r, "train"), f"{r}:train:step{step}@1"
        f.position = next(a for key, a, _ in self.spans if key == (r, "train"))

    def stage_seconds(self, key: tuple) -> float:
        """How long a stage takes: as long as it took the reference run, once it did it (it runs alongside,
        mostly ahead), else the nominal time."""
        done = {k: b - a for k, a, b in stage_times(self.reference)} if (self.reference / "metrics.jsonl").exists() else {}
        return done.get(key, NOMINAL_SECONDS[key[1]])

    # --- delivering ----------------------------------------------------------------------
    def progress(self, state: dict) -> int:
        """Where a state.json stands on the timeline (index of its stage; past the end when done)."""
        if state.get("status") == "done":
            return len(self.spans)
        return self.order.get((state.get("round"), state.get("stage")), -1)

    def resume_point(self) -> int:
        """The stage (index) the next life starts with: the one a fault interrupted, or the next one."""
        state = read_state(self.run_dir)
        return self.progress(state) + (state.get("stage_status") == "done")

    def run(self) -> None:
        while self.pending:
            assert self.lives < MAX_LIVES, f"the run needed more than {MAX_LIVES} lives:\n{self.table()}"
            f, now = self.pending[0], max(0, self.resume_point())
            if now >= len(TIMELINE):
                break
            if f.kind == "rank" and self.retarget_rank(f) or \
                    f.kind in ("kill", "usr1") and self.order[f.target] < now:  # the run is past it: draw again
                if f.kind != "rank":
                    self.pending[0] = self.point(f.kind, after=self.spans[now][1])
                self.pending.sort(key=lambda g: g.position)
                continue
            self.pending.pop(0)
            self.faults.append(f)
            proc = self.deliver(f)
            if proc.returncode == 0:  # the run ended before the fault landed
                f.landed = "not delivered: the run had finished"
                break
            if not f.delivered:  # the life ended (oracle retries exhausted) before it: draw another one
                self.pending = sorted([*self.pending, self.point("kill" if f.kind == "startup" else f.kind,
                                                                 after=f.position)], key=lambda g: g.position)
        self.faults += [dataclasses.replace(f, landed="not delivered: the run had finished") for f in self.pending]
        # the same command until the run is done
        while read_state(self.run_dir).get("status") != "done":
            assert self.lives < MAX_LIVES, f"the run needed more than {MAX_LIVES} lives:\n{self.table()}"
            life, proc, _ = self.begin()
            code = proc.wait(HANG_SECONDS)
            self.check_nothing_left(f"life {life} exited {code}")
            if code == 0:
                return
            assert code == ORACLE_FAILED, f"life {life} exited {code}:\n{output(self.run_dir)[-4000:]}"
            self.faults.append(Fault("unplanned", self.total, landed=f"exit {code} (oracle retries exhausted)",
                                     life=life, exit_code=code))
            self.after_fault(self.faults[-1])

    def begin(self, fault_env: str = "") -> tuple[int, subprocess.Popen, float]:
        self.lives += 1
        return self.lives, start(self.run_dir, self.overrides, fault_env or None), time.time()

    def wait_for_target(self, proc: subprocess.Popen, f: Fault, t0: float) -> None:
        """Wait until this life runs the fault's stage (or a later one), or ends."""
        want = self.order[f.target]
        while proc.poll() is None:
            state = read_state(self.run_dir)
            if state.get("updated", 0) >= t0 and state.get("status") == "running" and self.progress(state) >= want:
                return
            time.sleep(0.05)

    def land(self, proc: subprocess.Popen, f: Fault, life: int, t0: float) -> None:
        """Record where the fault lands, right before it does."""
        state = read_state(self.run_dir)
        f.life, f.at, f.delivered = life, time.time() - t0, True
        where = f"round {state.get('round')} {state.get('stage')} ({state.get('stage_status')})" if state else \
            "no state.json yet"
        before_any = state.get("updated", 0) < t0  # the life has not even marked the run as running
        f.landed = ("startup, state.json: " if f.kind == "startup" or before_any else "") + where + \
            (" (not yet touched by this life)" if before_any and state else "")
        ranks = [c for c in processes_of(self.run_dir).values()
                 if "apo_dist.cluster.worker" in c and "accelerate.commands.launch" not in c]
        f.launched = f"{len(ranks)} ranks of {ranks[0].split('apo_dist.cluster.worker ')[1].split()[0]}" if ranks else ""

    def retarget_rank(self, f: Fault) -> bool:
        """Keep the rank's fault ahead of the run (a fault that landed later than planned may have left
        that round's training done, or checkpointed past the step); True when it moved."""
        for r, steps in sorted(TRAIN_STEPS.items()):
            rd = self.run_dir / f"round_{r:04d}"
            if (rd / ".train.manifest.json").exists():
                continue
            progress = rd / "train_checkpoint" / "progress.json"
            done = len(json.loads(progress.read_text())["history"]) if progress.exists() else 0
            if r == f.target[0] and done < int(f.fault_env.split("step")[1].split("@")[0]):
                return False
            if done + 1 < steps:
                self.aim_rank(f, r, self.rng.randrange(done + 1, steps))
                return True
        raise AssertionError(f"no training left to kill a rank in:\n{self.table()}")

    def deliver(self, f: Fault) -> subprocess.Popen:
        life, proc, t0 = self.begin(f.fault_env)
        f.life = life
        if f.kind == "rank":  # rank 1 SIGKILLs itself after the step; the stage fails
            code = proc.wait(HANG_SECONDS)
            f.exit_code, f.at = code, time.time() - t0
            log = self.run_dir / f"round_{f.target[0]:04d}" / "logs" / "train.log"
            assert code == STAGE_FAILED, f"a killed training rank: exit {code}\n{output(self.run_dir)[-4000:]}"
            assert "Signal 9 (SIGKILL)" in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]
            f.delivered, f.landed = True, f"round {f.target[0]} train, rank 1 after {f.fault_env.split(':')[2][:-2]}"
            self.after_fault(f)
            return proc
        if f.kind != "startup":
            self.wait_for_target(proc, f, t0)
            f.offset = f.fraction * self.stage_seconds(f.target)
        time.sleep(f.offset)
        if proc.poll() is not None:  # it ended (done, or failed) before the fault landed
            f.exit_code = proc.returncode
            if proc.returncode != 0:
                assert proc.returncode == ORACLE_FAILED, \
                    f"life {life} exited {proc.returncode}:\n{output(self.run_dir)[-4000:]}"
                f.landed = f"not delivered: exit {proc.returncode} (oracle retries exhausted)"
                self.after_fault(f)  # its unanswered comparisons are asked again
            self.check_nothing_left(f"life {life} exited {proc.returncode}")
            return proc
        self.land(proc, f, life, t0)
        if f.kind == "usr1":
            proc.send_signal(signal.SIGUSR1)
            f.exit_code = proc.wait(HANG_SECONDS)
            assert f.exit_code in (PREEMPTED, 0), f"SIGUSR1: exit {f.exit_code}\n{output(self.run_dir)[-4000:]}"
            if f.exit_code == 0:
                f.delivered, f.landed = False, f"not honoured: the run ended first ({f.landed})"
            else:
                state = read_state(self.run_dir)
                assert state["status"] == "preempted", state
                f.landed += f" -> stopped {state['reason'].split('; stopped ')[-1]}"
        else:
            proc.send_signal(signal.SIGKILL)
            f.exit_code = proc.wait(30)
            assert f.exit_code == -signal.SIGKILL
        self.after_fault(f)
        return proc

    def after_fault(self, f: Fault) -> None:
        self.check_nothing_left(f"{f.kind} in life {f.life}")
        db = self.run_dir / "labels.sqlite"
        answered, requests = store_snapshot(db) if db.exists() else (set(), Counter())
        f.inflight = set(requests) - answered
        self.snapshots.append((answered, requests))

    def check_nothing_left(self, what: str) -> None:
        assert wait_until(lambda: not processes_of(self.run_dir), 30), \
            f"left behind after {what}: {processes_of(self.run_dir)}"

    def table(self) -> str:
        lines = [f"{'#':>2} {'fault':<9} {'life':>4} {'at s':>6}  {'planned':<24} landed"]
        for i, f in enumerate([*self.faults, *self.pending]):
            planned = (f"startup +{f.offset:.1f}s" if f.kind == "startup" else
                       f"{f.target[0]} {f.target[1]} +{f.offset:.1f}s" if f.kind in ("kill", "usr1") else
                       f.fault_env if f.kind == "rank" else "")
            landed = f.landed + (f" [{f.launched}]" if f.launched else "") + \
                (f" [{len(f.inflight)} answers in flight]" if f.inflight else "") + \
                (f" exit {f.exit_code}" if f.exit_code not in (None, -9) else "")
            lines.append(f"{i:>2} {f.kind:<9} {f.life:>4} {f.at:>6.1f}  {planned:<24} {landed}")
        return "\n".join(lines)


def test_the_loop_under_many_faults_ends_as_an_uninterrupted_run(tmp_path, tiny_overrides, vllm_server,
                                                                 invariant_judge_server):  # noqa: F811
    print(f"\nchaos seed {SEED} (APO_TEST_CHAOS_SEED={SEED} replays this schedule)")
    # The uninterrupted reference runs alongside, on a vLLM server of its own (started by its
    # coordinator: the chaos run's lives reload the shared one's weights), asking the judge directly.
    t = time.time()
    reference = tmp_path / "reference"
    ref_overrides = [*chaos_overrides(tiny_overrides, "", invariant_judge_server), "generation.servers.num_local=1"]
    ref_proc = start(reference, [o for o in ref_overrides if not o.startswith("generation.servers.urls=")])
    run_dir = tmp_path / "chaos"
    try:
        with FaultProxy(invariant_judge_server, fault_rate=0.3, seed=SEED, slow_seconds=9, retry_after=0.5) as proxy:
            chaos = Chaos(run_dir, chaos_overrides(tiny_overrides, vllm_server.urls[0], proxy.url), reference, SEED)
            chaos.plan()
            try:
                chaos.run()
            finally:
                print(chaos.table())
            injected, requests = dict(proxy.injected), proxy.requests
        chaos_seconds = time.time() - t
        assert ref_proc.wait(HANG_SECONDS) == 0, output(reference)[-4000:]
    finally:
        ref_proc.kill()
        for pid in [*processes_of(run_dir), *processes_of(reference)]:  # on failure only: this test's own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    kills = [f for f in chaos.faults if f.delivered and f.kind in ("kill", "startup")]
    print(f"reference run: {reference_seconds(reference):.0f} s; chaos run: {chaos_seconds:.0f} s, {chaos.lives} lives; "
          f"delivered: {len(kills)} coordinator SIGKILLs ({sum(f.kind == 'startup' for f in kills)} at startup), "
          f"{sum(f.delivered for f in chaos.faults if f.kind == 'rank')} training-rank SIGKILL, "
          f"{sum(f.delivered for f in chaos.faults if f.kind == 'usr1')} SIGUSR1; "
          f"judge faults: {sum(injected.values())} of {requests} requests {injected}")

    assert len(kills) >= COORDINATOR_KILLS, chaos.table()
    assert any(f.delivered for f in chaos.faults if f.kind == "rank"), chaos.table()
    assert any(f.delivered for f in chaos.faults if f.kind == "usr1"), chaos.table()
    assert read_state(run_dir)["status"] == "done" and read_state(reference)["status"] == "done"
    assert wait_until(lambda: not processes_of(run_dir) and not processes_of(reference), 30), \
        [processes_of(run_dir), processes_of(reference)]
    for r, steps in TRAIN_STEPS.items():
        assert len((reference / f"round_{r:04d}" / "train_log.jsonl").read_text().splitlines()) == steps

    # The label store first (every comparison answered alike): an answer that differs changes every
    # output downstream of it, so the message names the comparisons, how often this run asked each,
    # and the training labels that differ.
    store = open_store(run_dir / "labels.sqlite", readonly=True)
    table = store.request_counts()
    store.close()
    counts = dict(zip(table["key"], table["n"]))
    inflight = Counter(k for f in chaos.faults for k in f.inflight)
    answers, ref_answers = store_rows(run_dir / "labels.sqlite"), store_rows(reference / "labels.sqlite")
    notes = {k: f"asked {n} times by this run, in flight at {inflight[k]} of its faults" for k, n in counts.items()}
    differing = differing_rows(answers, ref_answers, "key", ("label", "raw_text"), notes)
    assert not differing, (f"answers that differ from the reference's (this run's vs the reference's):\n"
                           f"{differing}\n{differing_training_labels(run_dir, reference)}\n{chaos.table()}")
    pd.testing.assert_frame_equal(answers, ref_answers, check_exact=True)
    # Every stage's outputs bitwise alike (their manifests: files' sha256, upstream digests), but for
    # eval.json's oracle_requests: what the stage's last attempt asked (less when answers were stored).
    ours, theirs = manifests(run_dir), manifests(reference)
    assert ours == theirs, [name for name in theirs if ours.get(name) != theirs[name]]
    # Every round's eval result, labels and policy weights alike.
    for r in TRAIN_STEPS:
        rd, ref = run_dir / f"round_{r:04d}", reference / f"round_{r:04d}"
        got, want = json.loads((rd / "eval.json").read_text()), json.loads((ref / "eval.json").read_text())
        got.pop("oracle_requests"), want.pop("oracle_requests")  # asked by the stage's last attempt, not the run
        assert got == want, r
        pd.testing.assert_frame_equal(pd.read_parquet(rd / "labels.parquet"), pd.read_parquet(ref / "labels.parquet"),
                                      check_exact=True)
        mine, reference_weights = policy_tensors(run_dir, r), policy_tensors(reference, r)
        assert mine.keys() == reference_weights.keys()
        different = [k for k in mine if not torch.equal(mine[k], reference_weights[k])]
        assert not different, f"round {r}: tensors differ from the uninterrupted run: {different}"
    # No comparison asked again once stored; one asked twice was in flight at a fault.
    assert set(counts) == set(answers["key"])
    for answered, asked in chaos.snapshots:
        again = [k for k in answered if counts[k] != asked[k]]
        assert not again, f"{len(again)} stored comparisons were asked again"
    repeated = {k: n for k, n in counts.items() if n > 1}
    assert all(n <= 1 + inflight[k] for k, n in repeated.items()), (repeated, inflight)
    print(f"oracle: {len(counts)} comparisons, {sum(counts.values())} requests; asked twice: {len(repeated)} "
          f"(in flight at a fault)")


def reference_seconds(run_dir: Path) -> float:
    """From the life's start (the .out file's marker) to the end of its last stage."""
    started = float(output(run_dir).split("===== life started ")[1].split()[0])
    return stage_times(run_dir)[-1][2] - started
