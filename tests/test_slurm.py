"""SLURM: runs, heterogeneous jobs, requeue and job arrays on a real SLURM cluster on this machine.

The session fixture brings up slurmctld and two slurmd (virtual nodes ci-node1 and ci-node2, see
launch/slurm_cluster.sh), and tears them down at the end, checking that no daemon, job step or vLLM
server is left. Jobs inherit this process's environment, as sbatch does by default.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from apo_dist.cli import main
from apo_dist.oracles.store import open_store

from .test_loop import CONFIG, all_labels, eval_results, request_counts, run_cli

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "launch" / "slurm_cluster.sh"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def leftovers() -> list[str]:
    """Processes a cluster or its jobs could leave behind."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    pattern = re.compile(r"slurmctld|slurmd|slurmstepd|apo_dist\.vllm_servers serve|apo_dist\.cli (run|sweep)")
    return [line for line in out if pattern.search(line) and "ps -eo" not in line]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests bring up a cluster as root (apt-get, /etc/hosts); run them as root")
    folder = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(CLUSTER), "up", str(folder)], check=True, timeout=300)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(folder)], timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        deadline = time.monotonic() + 30
        while leftovers() and time.monotonic() < deadline:
            time.sleep(1)
        assert not leftovers(), f"left behind after the SLURM tests: {leftovers()}"


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.splitlines()[0].split() if "=" in kv)


def wait_for(job: str, timeout: float = 900) -> dict[str, str]:
    """Wait until `job` ends; returns its scontrol record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info["JobState"] in FINAL:
            return info
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish within {timeout} s: {job_info(job)}")


def wait_for_file(path: Path, job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert job_info(job)["JobState"] not in FINAL, f"job {job} ended before reaching {path.name}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.5)


def interrupt(job: str, hold: Path, how: str) -> dict[str, str]:
    """Once the job waits at its hold point: SLURM requeues it (killing it), or sends the warning
    signal and lets it go on; then wait for the job to end."""
    wait_for_file(hold, job)
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", job], check=True)
    else:  # what SLURM sends signal_seconds before the time limit: the job stops and requeues itself
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        time.sleep(2)
        hold.unlink()
    return wait_for(job)


def submit(capsys, run_dir: Path, overrides: list[str]) -> str:
    assert main(["submit", CONFIG, "--run-dir", str(run_dir), *overrides]) == 0
    return re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "round_0001" / "policy" / "model.safetensors")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_overrides) -> Path:
    """The reference: the same 2-round run executed locally, without SLURM."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    assert run_cli(run_dir, tiny_overrides) == 0
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert all_labels(run_dir).equals(all_labels(reference))
    assert [e["win_rate"] for e in eval_results(run_dir)] == [e["win_rate"] for e in eval_results(reference)]
    a, b = weights(run_dir), weights(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert set(request_counts(run_dir).values()) == {1}  # every oracle request made exactly once


def test_submitted_run_matches_local_run(slurm, tmp_path, capsys, tiny_overrides, local_run):
    run_dir = tmp_path / "run"
    job = submit(capsys, run_dir, tiny_overrides)
    script = (run_dir / "slurm" / "run.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@300" in script
    assert f"#SBATCH --output={run_dir.resolve()}/slurm/%x-%j.out" in script
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED", job_log(run_dir)
    assert len(eval_results(run_dir)) == 2
    assert_same_run(run_dir, local_run)
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"SLURM run job {job}: {job} COMPLETED" in out and "status: done" in out


def test_submit_refuses_a_second_job_for_a_busy_run(slurm, tmp_path, capsys, tiny_overrides):
    run_dir = tmp_path / "run"
    job = submit(capsys, run_dir, [*tiny_overrides, "slurm.extra=[--hold]"])  # pending until released
    try:
        assert main(["submit", CONFIG, "--run-dir", str(run_dir), *tiny_overrides]) == 9
        assert f"already has job {job} PENDING" in capsys.readouterr().err
        assert "#SBATCH --hold" in (run_dir / "slurm" / "run.sbatch").read_text()
    finally:
        subprocess.run(["scancel", job])


@pytest.mark.parametrize("how", ["scontrol_requeue", "warning_signal"])
def test_requeued_mid_training_resumes_with_the_same_labels(slurm, tmp_path, capsys, monkeypatch, tiny_overrides,
                                                            local_run, how):
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    monkeypatch.setenv("APO_DIST_HOLD", f"0:train:step1={hold}")  # the job waits after step 1 of round 0
    job = submit(capsys, run_dir, [*tiny_overrides, "training.checkpoint_every_steps=1"])
    info = interrupt(job, hold, how)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "restart 1" in log
    if how == "warning_signal":
        assert "preempted: SIGUSR1 received; stopped in round 0 train (checkpointed)" in log
        assert f"requeueing SLURM job {job}" in log
    assert_same_run(run_dir, local_run)


def test_heterogeneous_job_runs_vllm_and_training_on_different_nodes(slurm, tmp_path, capsys, tiny_overrides):
    pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    job = submit(capsys, run_dir, [*tiny_overrides, "loop.rounds=1", "generation.backend=vllm_server",
                                   "slurm.generation_nodes=1", "launcher.scoring_processes=2",
                                   "launcher.training_processes=2", "model.dtype=float32"])
    info = wait_for(job)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED", log
    assert "vLLM on ci-node1, training on ci-node2" in log
    served = (next((run_dir / "slurm").glob("servers_*/ci-node1.urls"))).read_text().split()
    assert len(served) == 1 and served[0].startswith("http://ci-node1:")
    for stage in ("scores", "train"):
        stage_log = (run_dir / "round_0000" / "logs" / f"{stage}.log").read_text()
        assert re.search(r"rendezvous: node ci-node2 machine_rank 0 of 1 -> main process ci-node2:\d+, 2 ranks",
                         stage_log), stage_log[-3000:]
    assert len(eval_results(run_dir)) == 1


def test_array_sweep_and_aggregation(slurm, tmp_path, capsys, tiny_overrides, postgres_url):
    """Arms run at once on both nodes, sharing a PostgreSQL label store (a SQLite one is refused)."""
    root = tmp_path / "sweep"
    assert main(["sweep", CONFIG, *tiny_overrides, "loop.rounds=1", "slurm.array_parallel=2", "--acquisition",
                 "certainty", "--seeds", "0,1", "--root", str(root), f"oracle.store={postgres_url}", "--slurm"]) == 0
    array, aggregate = re.search(r"array job (\d+) \(4 tasks.*aggregation job (\d+)", capsys.readouterr().out).groups()
    assert wait_for(aggregate)["JobState"] == "COMPLETED", job_log(root)
    for task in range(4):
        assert job_info(f"{array}_{task}")["JobState"] == "COMPLETED"
    arms = sorted(p.parent.name for p in root.glob("*/state.json"))
    assert arms == ["certainty_seed0", "certainty_seed1", "random_seed0", "random_seed1"]
    assert "| certainty |" in (root / "results.md").read_text()
    assert (root / "winrate.png").stat().st_size > 1000
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"SLURM array job {array}:" in out and f"SLURM aggregate job {aggregate}: {aggregate} COMPLETED" in out
    assert out.count(": done, last stage round 0 eval (done)") == 4
    requests = open_store(postgres_url).request_counts()
    assert len(requests) >= 8 and (requests["n"] == 1).all() and not list(root.glob("**/labels.sqlite"))


def test_multi_node_job_trains_with_one_rank_per_node(slurm, tmp_path, capsys, tiny_overrides):
    run_dir = tmp_path / "run"
    job = submit(capsys, run_dir, [*tiny_overrides, "loop.rounds=1", "slurm.nodes=2",
                                   "launcher.scoring_processes=2", "launcher.training_processes=2"])
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED", job_log(run_dir)
    assert "#SBATCH --nodes=2" in (run_dir / "slurm" / "run.sbatch").read_text()
    train_log = (run_dir / "round_0000" / "logs" / "train.log").read_text()
    for rank, node in enumerate(["ci-node1", "ci-node2"]):
        assert re.search(rf"rendezvous: node {node} machine_rank {rank} of 2 -> main process ci-node1:\d+, 2 ranks",
                         train_log), train_log[-3000:]
    worlds = {json.loads(line)["world"] for line in (run_dir / "logs" / "sharding_rank_1.jsonl").read_text().splitlines()}
    assert worlds == {2}  # the second node's rank joined the first node's process group
    assert len(eval_results(run_dir)) == 1


def test_warning_signal_stops_two_node_training_at_the_same_step(slurm, tmp_path, capsys, monkeypatch,
                                                                 tiny_overrides):
    """Both ranks (one per node) agree on the step, checkpoint, and the requeued job resumes there."""
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    monkeypatch.setenv("APO_DIST_HOLD", f"0:train:step1={hold}")  # in the ranks, which run the train stage
    job = submit(capsys, run_dir, [*tiny_overrides, "loop.rounds=1", "slurm.nodes=2", "launcher.scoring_processes=2",
                                   "launcher.training_processes=2", "training.checkpoint_every_steps=1"])
    info = interrupt(job, hold, "warning_signal")
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "preempted: SIGUSR1 received; stopped in round 0 train (checkpointed)" in log
    train_log = (run_dir / "round_0000" / "logs" / "train.log").read_text()
    assert "TrainingStopped: training stopped after step 1" in train_log, train_log[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "round_0000" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) == 2  # 8 labels / batch 4: each step once
    assert set(request_counts(run_dir).values()) == {1}
