"""The prepared GPU check, as far as a CPU allows: it refuses clearly without a GPU, and its steps
(quickstart fp32/bf16, a ZeRO-3 training stage, a paper_imdb rehearsal with a given stand-in) run
end to end on tiny sizes with --smoke and write the report."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def test_refuses_without_a_gpu(tmp_path):
    done = run_check("--out", str(tmp_path / "gpu.md"), tmp_path=tmp_path)
    assert done.returncode == 3 and "no CUDA device is visible" in done.stderr
    assert not (tmp_path / "gpu.md").exists()


def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu.md"
    done = run_check("--smoke", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    for section in ("model.dtype=float32", "model.dtype=bfloat16", "One ZeRO-3 training stage", "Rehearsal of"):
        assert section in report
    assert "counts: all 10 as planned" in report and "every step ran" in report
    assert "| 0/train |" in report.split("One ZeRO-3 training stage")[1]  # the ZeRO-3 run trained again
    assert "| 0/scores | " in report and "| cpu |" in report  # stages report where their model sat
