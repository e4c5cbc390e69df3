"""The stored reference log-probs and the trainer's forward agree: at the first step, where the
policy is the reference, every implicit reward is zero, under the paper configs' precision."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path


from apo_dist import context
from apo_dist.config import load_config
from apo_dist.loop import run
from apo_dist.rundir import RunDir

CONFIG = Path(__file__).parent.parent / "configs" / "test_tiny.yaml"
PAPER = Path(__file__).parent.parent / "configs" / "paper_imdb.yaml"
TOLERANCE = 1e-4  # mean |beta * (log pi - log ref)| at step 1 (beta 1): 0 measured; bf16 weights gave 3e-3


def fresh_run(cfg, run_dir: Path) -> None:
    """The run in a process whose Accelerate state starts empty (a fork inherits the parent's)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run(cfg, run_dir, progress=False, echo=lambda _: None)


def first_step(tmp_path: Path, overrides: list[str]) -> dict:
    """Round 0's first training step, run in a forked child: Accelerate keeps its mixed precision
    for the life of a process, and the other tests train in fp32."""
    cfg = load_config(CONFIG, [*overrides, "loop.rounds=1", "training.beta=1.0", "training.lr=1e-9"])
    rd = RunDir(tmp_path / "run")
    child = mp.get_context("fork").Process(target=fresh_run, args=(cfg, rd.root))
    child.start()
    child.join(600)
    assert child.exitcode == 0
    return json.loads(rd.path("train_log", 0).read_text().splitlines()[0])


def paper_precision() -> list[str]:
    paper = load_config(PAPER)
    return [f"model.dtype={paper.model.dtype}", f"training.mixed_precision={paper.training.mixed_precision}"]


def test_paper_precision_starts_at_zero_margin(tmp_path, tiny_overrides):
    assert paper_precision() == ["model.dtype=bfloat16", "training.mixed_precision=bf16"]
    step = first_step(tmp_path, [*tiny_overrides, *paper_precision()])
    for key in ("chosen_reward", "rejected_reward", "margin"):
        assert abs(step[key]) < TOLERANCE, (key, step)


def test_scoring_in_generation_precision_would_not(tmp_path, tiny_overrides, monkeypatch):
    """What the tolerance guards against: scoring with the bf16 weights generation uses."""
    monkeypatch.setattr(context, "training_forward", lambda *a: ("bfloat16", None))
    step = first_step(tmp_path, [*tiny_overrides, *paper_precision()])
    assert max(abs(step["chosen_reward"]), abs(step["rejected_reward"])) > 10 * TOLERANCE, step
