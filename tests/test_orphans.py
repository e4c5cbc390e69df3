"""Launched stages die with their coordinator, and one coordinator writes a run directory at a time.

A real `apo-dist run` (a subprocess) is SIGKILLed while a 2-rank training or scoring stage runs;
then no process of the run may be left (not `accelerate launch`, not a rank), and the same command
resumes and completes. A second coordinator on a run that another one holds is refused at once.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_loop import CONFIG

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")

ACCELERATE = Path(__file__).parent.parent / "launch" / "accelerate"
BUSY = 10  # the exit code of a run whose directory another coordinator holds (README)


@pytest.fixture(scope="module")
def one_round(tiny_overrides) -> list[str]:
    return [*tiny_overrides, "acquisition.function=certainty", "training.micro_batch_size=1", "loop.rounds=1"]


@pytest.fixture(scope="module")
def base(one_round) -> list[str]:
    return [*one_round, "launcher.accelerate_config=" + str(ACCELERATE / "cpu_2proc.yaml"),
            "launcher.collective_timeout_s=120"]


def coordinator(run_dir: Path, overrides: list[str], hold: str | None = None, name: str = "") -> subprocess.Popen:
    """`apo-dist run` as its own process, output in <run_dir><name>.out; `hold`: APO_DIST_HOLD."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APO_DIST_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if hold:
        env["APO_DIST_HOLD"] = hold
    out = open(run_dir.parent / f"{run_dir.name}{name}.out", "ab")
    with out:
        return subprocess.Popen([sys.executable, "-m", "apo_dist.cli", "run", CONFIG, "--run-dir", str(run_dir),
                                 "--no-progress", *overrides], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def processes_of(run_dir: Path) -> dict[int, str]:
    """pid -> command line of every live process whose command line names the run directory."""
    names = {str(run_dir), str(run_dir.resolve())}
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmdline for n in names):
            found[int(p.name)] = cmdline
    return found


def ranks_of(run_dir: Path, stage: str) -> dict[int, str]:
    """The ranks (not the launcher) of `stage` running apo_dist.cluster.worker for this run."""
    return {pid: c for pid, c in processes_of(run_dir).items()
            if f"apo_dist.cluster.worker {stage} " in c and "accelerate.commands.launch" not in c}


def wait_until(condition, timeout: float, every: float = 0.1) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def output(run_dir: Path, name: str = "") -> str:
    return (run_dir.parent / f"{run_dir.name}{name}.out").read_text(errors="replace")


def kill_and_check_nothing_is_left(proc: subprocess.Popen, run_dir: Path, stage: str) -> None:
    launched = processes_of(run_dir)
    assert any("accelerate.commands.launch" in c for c in launched.values()), launched
    assert len(ranks_of(run_dir, stage)) == 2, launched
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not processes_of(run_dir), 20), \
        f"left behind by the killed coordinator: {processes_of(run_dir)}"


def resume(run_dir: Path, overrides: list[str]) -> None:
    proc = coordinator(run_dir, overrides)
    assert proc.wait(300) == 0, output(run_dir)[-4000:]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"
    assert (run_dir / "round_0000" / "eval.json").exists()
    assert not processes_of(run_dir)


def test_killed_coordinator_takes_its_training_ranks_along(tmp_path, base):
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    overrides = [*base, "launcher.training_processes=2"]
    proc = coordinator(run_dir, overrides, hold=f"0:train:step1={hold}")  # fires in a rank
    try:
        assert wait_until(lambda: hold.exists() or proc.poll() is not None, 240) and hold.exists(), output(run_dir)
        kill_and_check_nothing_is_left(proc, run_dir, "train")  # the holding rank would wait forever
    finally:
        proc.kill()
        hold.unlink(missing_ok=True)
    resume(run_dir, overrides)


def test_killed_coordinator_takes_its_scoring_ranks_along(tmp_path, base):
    run_dir = tmp_path / "run"
    overrides = [*base, "launcher.scoring_processes=2"]
    proc = coordinator(run_dir, overrides)
    try:
        assert wait_until(lambda: len(ranks_of(run_dir, "scores")) == 2 or proc.poll() is not None, 240), \
            output(run_dir)
        time.sleep(1.0)  # the ranks are starting: importing, joining the process group, loading the model
        kill_and_check_nothing_is_left(proc, run_dir, "scores")
    finally:
        proc.kill()
    resume(run_dir, overrides)


def test_a_second_coordinator_is_refused_while_the_first_holds_the_run(tmp_path, one_round):
    base = one_round  # every stage in the coordinator
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    first = coordinator(run_dir, base, hold=f"0:pool:start={hold}")  # fires in the coordinator
    try:
        assert wait_until(lambda: hold.exists() or first.poll() is not None, 120) and hold.exists(), output(run_dir)
        state = (run_dir / "state.json").read_bytes()
        refused = coordinator(run_dir, [*base, "training.beta=0.5"], name="-second")  # its config is never read
        assert refused.wait(60) == BUSY, output(run_dir, "-second")
        text = output(run_dir, "-second").splitlines()
        busy = [line for line in text if line.startswith("run busy: ")]
        assert len(busy) == 1, text
        assert f"pid {first.pid} on {socket.gethostname()} since " in busy[0] and str(run_dir) in busy[0]
        assert "refusing to resume" not in "\n".join(text)
        assert (run_dir / "state.json").read_bytes() == state
        assert first.poll() is None
    finally:
        hold.unlink(missing_ok=True)
    assert first.wait(300) == 0, output(run_dir)[-4000:]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"


def test_the_lock_is_one_holder_at_a_time_and_released(tmp_path):
    from apo_dist.errors import RunBusy
    from apo_dist.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    with rd.lock():
        holder = json.loads(rd.lock_path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunBusy, match=f"pid {os.getpid()} on "):
            with RunDir(tmp_path / "run").lock():
                pass
    with rd.lock():  # released on the way out
        pass
