"""report.md, winrate.png and (with KL and scores) frontier.png from a run directory's eval.json files."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
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


def pm(e: dict, key: str, decimals: int = 3) -> str:
    """`mean ± stderr` of eval.json's `key`, or "-" when the round has none."""
    if key not in e:
        return "-"
    return f"{e[key]:.{decimals}f} ± {e.get(f'{key}_stderr', float('nan')):.{decimals}f}"


def score_lines(results: list[dict]) -> list[str]:
    """The report's score and KL table (score oracles; eval.kl_samples > 0), or nothing."""
    if not any("score" in e or "kl" in e for e in results):
        return []
    lines = ["", "## Score and KL", "",
             "Mean oracle score of the policy's eval completions and of the reference's, their paired difference "
             "and the soft win-rate (sigmoid of the score margin / the eval oracle's noise_temperature), each ± its "
             "standard error over prompts; KL(policy || SFT) per sequence from the policy's own samples at T = 1, "
             "and those samples' mean score (frontier.png plots one against the other).", "",
             "| round | labels | score | reference score | difference | soft win-rate | KL | score at T = 1 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        soft = (f"{e['soft_win_rate']:.3f} ± {e['soft_stderr']:.3f}" if "soft_win_rate" in e else "-")
        lines.append(f"| {e['round']} | {e['labels']} | {pm(e, 'score')} | {pm(e, 'reference_score')} "
                     f"| {pm(e, 'score_diff')} | {soft} | {pm(e, 'kl')} | {pm(e, 'kl_score')} |")
    return lines


def position_lines(results: list[dict]) -> list[str]:
    """The LLM judge's rate of choosing the first-shown candidate, and advice when it is biased."""
    rounds = [e for e in results if "first_shown_rate" in e]
    if not rounds:
        return []
    lines = ["", "## Position bias of the eval judge", "",
             "How often the judge chose the candidate it was shown first, among its decisive answers, with a "
             "Wilson 95% interval (0.5 = no position bias).", "",
             "| round | first shown chosen | decisive answers | 95% interval |", "|---:|---:|---:|---|"]
    for e in rounds:
        low, high = e["first_shown_ci"]
        lines.append(f"| {e['round']} | {e['first_shown_rate']:.3f} | {e['first_shown_n']} | [{low:.3f}, {high:.3f}] |")
    biased = [str(e["round"]) for e in rounds if e["position_bias"]]
    if biased:
        lines += ["", f"The interval excludes 0.5 in round(s) {', '.join(biased)}: the judge favours one position, "
                  "which adds noise (or bias, if the policy's answers are shown first more often) to the win-rate. "
                  "Recommended: `both_orders: true` on the eval judge (`eval.oracle.both_orders`, or "
                  "`oracle.both_orders` when eval.oracle is null), which asks both orders and averages."]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write report.md (per-round tables), winrate.png (win-rate vs labels) and, when the rounds
    carry KL and sample scores, frontier.png (score vs KL)."""
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
             "completions on the held-out eval prompts, judged by the oracle (tie = 0.5; with eval.outcome=soft, "
             "the soft win-rate below), with its standard error over prompts (clustered: several samples of one "
             "prompt count as one). A pair the judge could not judge counts as a win or a loss by a seeded coin "
             "(unjudged).", "",
             "| round | labels | win-rate | stderr | pairs | prompts | wins | losses | ties | unjudged |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        lines.append(f"| {e['round']} | {e['labels']} | {e['win_rate']:.3f} | {e['stderr']:.3f} | {e['n']} "
                     f"| {e.get('n_prompts', e['n'])} | {e['wins']} | {e['losses']} | {e['ties']} "
                     f"| {e.get('unjudged', 0)} |")
    if not results:
        lines.append("| - | - | - | - | - | - | - | - | - | - |")
    frontier = [e for e in results if "kl" in e and "kl_score" in e]
    lines += ["", "![win-rate vs labels](winrate.png)", *score_lines(results), *position_lines(results)]
    if frontier:
        lines += ["", "![oracle score vs KL to the SFT model](frontier.png)"]
    lines += ["", "## Config", "", "```yaml", config.rstrip(), "```", ""]
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
    if frontier:
        plot_frontier(pd.DataFrame([{"run": rd.root.name, "labels": e["labels"], "kl": e["kl"], "kl_se": e["kl_stderr"],
                                     "score": e["kl_score"], "score_se": e["kl_score_stderr"]} for e in frontier]),
                      "run", rd.root / "frontier.png")
    return rd.root / "report.md"

def plot_frontier(points: pd.DataFrame, line: str, path: Path) -> None:
    """The reward-KL frontier (Rafailov et al. 2023, fig. 2): oracle score vs KL(policy || SFT) of
    the same T = 1 samples, with standard-error bars, one line per value of `line` through its
    label counts in order. `points`: columns line, labels, kl, kl_se, score, score_se."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, g in points.groupby(line):
        g = g.sort_values("labels")
        ax.errorbar(g["kl"], g["score"], xerr=g["kl_se"].fillna(0), yerr=g["score_se"].fillna(0), marker="o",
                    capsize=2, label=str(name))
        for x, y, n in zip(g["kl"], g["score"], g["labels"]):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel("KL(policy || SFT) per sequence")
    ax.set_ylabel("oracle score of samples at T = 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

