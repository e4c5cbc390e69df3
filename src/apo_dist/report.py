"""report.md and winrate.png from a run directory's eval.json files."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from .rundir import RunDir, atomic_write_text


def eval_results(run_dir: str | Path) -> list[dict]:
    rd = RunDir(run_dir)
    out = []
    for r in rd.rounds():
        path = rd.round_dir(r) / "eval.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write report.md (a per-round table) and winrate.png (win-rate vs labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = RunDir(run_dir)
    results = eval_results(run_dir)
    config = rd.config_path.read_text() if rd.config_path.exists() else ""
    dataset = OmegaConf.select(OmegaConf.create(config), "eval.reference", default="sft") == "dataset"
    reference = "reference" if dataset else "SFT"
    lines = [f"# apo-dist report: {rd.root.name}", "",
             f"Win-rate of the policy against {'the dataset' if dataset else 'the SFT model'}'s reference "
             "completions on the held-out eval prompts, judged by the oracle (tie = 0.5), with its standard error. "
             "A pair the judge could not judge counts as a win or a loss by a seeded coin (unjudged).", "",
             "| round | labels | win-rate | stderr | n | wins | losses | ties | unjudged |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        lines.append(f"| {e['round']} | {e['labels']} | {e['win_rate']:.3f} | {e['stderr']:.3f} | {e['n']} "
                     f"| {e['wins']} | {e['losses']} | {e['ties']} | {e.get('unjudged', 0)} |")
    if not results:
        lines.append("| - | - | - | - | - | - | - | - | - |")
    lines += ["", "![win-rate vs labels](winrate.png)", "", "## Config", "", "```yaml", config.rstrip(), "```", ""]
    atomic_write_text(rd.root / "report.md", "\n".join(lines))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if results:
        x = [e["labels"] for e in results]
        y = [e["win_rate"] for e in results]
        err = [1.96 * e["stderr"] for e in results]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"policy vs {reference} (95% CI)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label=f"{reference} vs itself")
    ax.set_xlabel("labels")
    ax.set_ylabel("win-rate")
    ax.set_title(rd.root.name)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = rd.root / ".winrate.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(rd.root / "winrate.png")
    return rd.root / "report.md"
