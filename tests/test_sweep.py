"""Sweeps: the aggregation against hand-computed numbers, and a tiny sweep end to end."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest

from apo_dist.aggregate import collect, labels_to_reach, summarise, write_outputs

from .test_loop import CONFIG, _child

# win-rates by (function, seed) at 8 and 16 labels
WIN = {("random", 0): (0.50, 0.60), ("random", 1): (0.54, 0.62), ("random", 2): (0.52, 0.58),
       ("certainty", 0): (0.55, 0.66), ("certainty", 1): (0.53, 0.61), ("certainty", 2): (0.57, 0.68)}


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    for (function, seed), rates in WIN.items():
        run = tmp_path / f"{function}_seed{seed}"
        for r, (labels, w) in enumerate(zip((8, 16), rates)):
            (run / f"round_{r:04d}").mkdir(parents=True)
            (run / f"round_{r:04d}" / "eval.json").write_text(json.dumps(
                {"round": r, "labels": labels, "win_rate": w, "stderr": 0.03}))
        (run / "config.yaml").write_text(f"seed: {seed}\nacquisition:\n  function: {function}\n")
    return tmp_path


def test_summary_matches_hand_computation(sweep_dir):
    s = summarise(collect(sweep_dir)).set_index(["function", "labels"])
    # random at 16 labels: 0.60, 0.62, 0.58 -> mean 0.60, sd 0.02, se 0.02 / sqrt 3
    assert s.loc[("random", 16), "mean"] == pytest.approx(0.60)
    assert s.loc[("random", 16), "se"] == pytest.approx(0.02 / math.sqrt(3))
    # certainty - random per seed at 16 labels: 0.06, -0.01, 0.10 -> mean 0.05, sd 0.0556776
    row = s.loc[("certainty", 16)]
    sd = math.sqrt(((0.06 - 0.05) ** 2 + (-0.01 - 0.05) ** 2 + (0.10 - 0.05) ** 2) / 2)
    assert row["diff"] == pytest.approx(0.05)
    assert row["diff_se"] == pytest.approx(sd / math.sqrt(3))
    assert row["ci_high"] - row["diff"] == pytest.approx(4.303 * sd / math.sqrt(3))  # t(0.975, df 2)
    assert row["mde"] == pytest.approx((4.303 + 1.061) * sd / math.sqrt(3))  # + t(0.80, df 2): 80% power
    assert row["seeds"] == 3


def test_score_and_kl_are_aggregated_and_plotted(sweep_dir):
    # score = win-rate + 0.1 * seed, KL = labels / 100 and score at T = 1 = KL / 2 (random) or KL (certainty)
    for (function, seed), _ in WIN.items():
        for path in sorted((sweep_dir / f"{function}_seed{seed}").glob("round_*/eval.json")):
            e = json.loads(path.read_text())
            kl = e["labels"] / 100
            e.update(score=e["win_rate"] + 0.1 * seed, kl=kl, kl_score=kl if function == "certainty" else kl / 2)
            path.write_text(json.dumps(e))
    md = write_outputs(sweep_dir).read_text()
    score = summarise(collect(sweep_dir), "score").set_index(["function", "labels"])
    # the seed term cancels in the paired difference: the same diffs, SE and MDE as the win-rate's
    row, win = score.loc[("certainty", 16)], summarise(collect(sweep_dir)).set_index(["function", "labels"])
    assert row["mean"] == pytest.approx(0.65 + 0.1) and row["diff"] == pytest.approx(0.05)
    assert row["mde"] == pytest.approx(win.loc[("certainty", 16), "mde"])
    assert "Mean oracle score of the policy's eval completions" in md and "| certainty | 16 | 3 | 0.750 ± " in md
    csv = (sweep_dir / "results.csv").read_text().splitlines()
    assert {"mde", "score_mean", "score_mde", "kl_mean", "kl_score_mean"} <= set(csv[0].split(","))
    assert (sweep_dir / "frontier.png").stat().st_size > 1000 and "frontier.png" in md


def test_labels_to_reach_randoms_final_win_rate(sweep_dir):
    reach = labels_to_reach(summarise(collect(sweep_dir)))
    # random's final mean 0.60; certainty reaches 0.55 at 8 and 0.65 at 16 labels
    assert reach == {"certainty": 16, "random": 16}


def test_outputs_are_written(sweep_dir):
    md = write_outputs(sweep_dir).read_text()
    assert "| certainty | 16 | 3 | 0.650 ± " in md and "+0.050 [" in md
    sd = math.sqrt(((0.06 - 0.05) ** 2 + (-0.01 - 0.05) ** 2 + (0.10 - 0.05) ** 2) / 2)
    assert f"| {(4.303 + 1.061) * sd / math.sqrt(3):.3f} |" in md  # the MDE beside the interval
    assert not (sweep_dir / "frontier.png").exists() and "score" not in md  # no scores in these rounds
    assert (sweep_dir / "results.csv").read_text().count("\n") == 5
    assert (sweep_dir / "winrate.png").stat().st_size > 1000


def test_tiny_sweep_end_to_end(tmp_path, tiny_overrides):
    root = tmp_path / "sweep"
    args = ["sweep", CONFIG, "--acquisition", "certainty", "--seeds", "0,1", "--root", str(root), "--no-progress",
            *tiny_overrides, "loop.rounds=1"]
    proc = mp.get_context("fork").Process(target=_child, args=(args, None))
    proc.start()
    proc.join(600)
    assert proc.exitcode == 0
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "certainty_seed0", "certainty_seed1", "random_seed0", "random_seed1"]
    assert (root / "labels.sqlite").exists() and not list(root.glob("*/labels.sqlite"))  # one shared store
    results = collect(root)
    assert len(results) == 4 and set(results["labels"]) == {8}
    assert "| certainty | 8 | 2 |" in (root / "results.md").read_text()


def test_slurm_refuses_a_sqlite_store_that_nodes_would_share(tmp_path, capsys):
    """Array tasks, and the jobs of runs sharing an oracle.store, run at once on any nodes, and SQLite's
    WAL mode needs every process on one host: `sweep --slurm` and `submit` refuse such a store before
    writing or submitting anything (with a PostgreSQL store they go on: tests/test_slurm.py)."""
    from apo_dist.cli import main

    root, shared = tmp_path / "sweep", tmp_path / "shared" / "labels.sqlite"
    assert main(["sweep", CONFIG, "model.policy=unused", "--root", str(root), "--slurm"]) == 2
    store = f"oracle.store={shared}"
    assert main(["sweep", CONFIG, "model.policy=unused", store, "--root", str(root), "--slurm"]) == 2
    assert main(["submit", CONFIG, "model.policy=unused", store, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    fix = ("WAL mode does not support (https://www.sqlite.org/wal.html); set oracle.store=postgresql://USER@HOST:PORT/"
           "DATABASE (`apo-dist migrate-labels` copies the answers stored so far there), or ")
    assert err == [
        f"config error: sweep --slurm: the arms of the job array would share the SQLite label store "
        f"{root.resolve() / 'labels.sqlite'} from different nodes at once, which SQLite's {fix}run the sweep "
        "without --slurm",
        f"config error: sweep --slurm: the arms of the job array would share the SQLite label store {shared} from "
        f"different nodes at once, which SQLite's {fix}run the sweep without --slurm",
        f"config error: submit: the runs that set this oracle.store can share the SQLite label store {shared} from "
        f"different nodes at once, which SQLite's {fix}leave oracle.store empty: the run's own <run>/labels.sqlite "
        "is opened by its coordinator only"]
    assert list(tmp_path.iterdir()) == []
