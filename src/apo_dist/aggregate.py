"""Aggregate a sweep: win-rate per acquisition function and label count, over seeds.

Reads every `<sweep>/<function>_seed<k>/round_*/eval.json` and writes `results.csv`, `results.md`
(mean +- standard error over seeds, the difference to random with a paired 95% confidence
interval: paired by seed, so each seed's shared eval set and reference cancel, and the minimum
detectable effect of that comparison), `winrate.png`, and where the eval oracle gives scores the
same for the mean oracle score and `frontier.png` (score vs KL to the SFT model).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from .report import plot_frontier
from .rundir import atomic_write_text

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond that the normal's.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]
# One-sided 80% Student t quantiles (the power term) by degrees of freedom (1..30); beyond, the normal's.
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
       0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855,
       0.854, 0.854]
# Per-round statistics read from eval.json when present (score oracles; eval.kl_samples > 0).
OPTIONAL = ("score", "kl", "kl_score")


def t95(df: int) -> float:
    return T95[df - 1] if 1 <= df <= len(T95) else 1.96


def t80(df: int) -> float:
    return T80[df - 1] if 1 <= df <= len(T80) else 0.8416


def mde(se: float, df: int) -> float:
    """Minimum detectable effect of a paired t test at 80% power, two-sided alpha 0.05, treating the
    observed standard error as the true one: (t_{0.975, df} + t_{0.80, df}) * se."""
    return (t95(df) + t80(df)) * se


def collect(root: str | Path) -> pd.DataFrame:
    """One row per (run, round): function, seed, round, labels, win_rate, stderr, and score, kl,
    kl_score (NaN where the round has none)."""
    rows = []
    for config in sorted(Path(root).glob("*/config.yaml")):
        cfg = OmegaConf.load(config)
        for path in sorted(config.parent.glob("round_*/eval.json")):
            e = json.loads(path.read_text())
            rows.append({"function": cfg.acquisition.function, "seed": int(cfg.seed), "round": e["round"],
                         "labels": e["labels"], "win_rate": e["win_rate"], "stderr": e["stderr"],
                         **{k: e.get(k, math.nan) for k in OPTIONAL}})
    if not rows:
        raise FileNotFoundError(f"no finished rounds (round_*/eval.json) under {root}")
    return pd.DataFrame(rows)


def summarise(results: pd.DataFrame, metric: str = "win_rate") -> pd.DataFrame:
    """Per function and label count: mean and standard error of `metric` over seeds, and the paired
    difference to random (mean, standard error, 95% CI, minimum detectable effect) over the seeds
    both have."""
    out = []
    results = results.dropna(subset=[metric])
    random = results[results["function"] == "random"].set_index(["labels", "seed"])[metric]
    for (function, labels), g in results.groupby(["function", "labels"]):
        w = g[metric].to_numpy()
        row = {"function": function, "labels": labels, "seeds": len(w), "mean": w.mean(),
               "se": w.std(ddof=1) / math.sqrt(len(w)) if len(w) > 1 else float("nan")}
        if function != "random":
            paired = g.set_index("seed")[metric]
            common = [s for s in paired.index if (labels, s) in random.index]
            d = np.array([paired[s] - random[(labels, s)] for s in common])
            if len(d) > 1:
                se = d.std(ddof=1) / math.sqrt(len(d))
                row.update(diff=d.mean(), diff_se=se, ci_low=d.mean() - t95(len(d) - 1) * se,
                           ci_high=d.mean() + t95(len(d) - 1) * se, mde=mde(se, len(d) - 1))
        out.append(row)
    return pd.DataFrame(out).sort_values(["function", "labels"]).reset_index(drop=True)


def labels_to_reach(summary: pd.DataFrame) -> dict[str, int | None]:
    """Per function: the fewest labels at which its mean win-rate reaches random's final mean."""
    random = summary[summary["function"] == "random"]
    if random.empty:
        return {}
    target = random.sort_values("labels")["mean"].iloc[-1]
    reach = {}
    for function, g in summary.groupby("function"):
        hit = g[g["mean"] >= target].sort_values("labels")
        reach[function] = int(hit["labels"].iloc[0]) if len(hit) else None
    return reach


def metric_rows(summary: pd.DataFrame, decimals: int = 3) -> list[str]:
    """results.md rows: function, labels, seeds, mean ± SE, diff to random [95% CI], MDE."""
    rows = []
    for r in summary.itertuples():
        has_diff = "diff" in summary and not pd.isna(getattr(r, "diff", float("nan")))
        diff = f"{r.diff:+.{decimals}f} [{r.ci_low:+.{decimals}f}, {r.ci_high:+.{decimals}f}]" if has_diff else ""
        mde_text = f"{r.mde:.{decimals}f}" if has_diff else ""
        rows.append(f"| {r.function} | {r.labels} | {r.seeds} | {r.mean:.{decimals}f} ± {r.se:.{decimals}f} "
                    f"| {diff} | {mde_text} |")
    return rows


def write_outputs(root: str | Path) -> Path:
    """results.csv, results.md, winrate.png and, where rounds carry KL and sample scores,
    frontier.png in the sweep folder; returns results.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    results = collect(root)
    summary = summarise(results)
    present = [m for m in OPTIONAL if results[m].notna().any()]
    by_metric = {m: summarise(results, m) for m in present}
    table = summary
    for m, s in by_metric.items():
        stats = [c for c in s.columns if c not in ("function", "labels", "seeds")]
        table = table.merge(s[["function", "labels", *stats]].rename(columns={c: f"{m}_{c}" for c in stats}),
                            on=["function", "labels"], how="left")
    table.to_csv(root / "results.csv", index=False)
    head = "| function | labels | seeds | {} | diff to random [95% CI] | MDE |"
    lines = ["# Sweep results", "", "Mean ± standard error over seeds; difference to random paired by seed with a "
             "95% t confidence interval; MDE: the smallest true difference this comparison detects with 80% power "
             "(two-sided alpha 0.05), (t_0.975,df + t_0.80,df) x the paired standard error, df = seeds - 1.", "",
             "Win-rate against the reference completions:", "",
             head.format("win-rate"), "|---|---:|---:|---|---|---:|", *metric_rows(summary)]
    titles = {"score": ("Mean oracle score of the policy's eval completions:", "score"),
              "kl": ("KL(policy || SFT) per sequence, from the policy's samples at T = 1:", "KL"),
              "kl_score": ("Mean oracle score of those T = 1 samples (the reward of the reward-KL frontier):", "score")}
    for m, s in by_metric.items():
        lines += ["", titles[m][0], "", head.format(titles[m][1]), "|---|---:|---:|---|---|---:|", *metric_rows(s)]
    reach = labels_to_reach(summary)
    if reach:
        lines += ["", "Labels needed to reach random's final mean win-rate:", ""]
        lines += [f"- {f}: {n if n is not None else 'not reached'}" for f, n in sorted(reach.items())]
    if "kl" in by_metric and "kl_score" in by_metric:
        lines += ["", "![oracle score vs KL to the SFT model](frontier.png)"]
    atomic_write_text(root / "results.md", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for function, g in summary.groupby("function"):
        g = g.sort_values("labels")
        ax.plot(g["labels"], g["mean"], marker="o", label=function)
        ax.fill_between(g["labels"], g["mean"] - g["se"].fillna(0), g["mean"] + g["se"].fillna(0), alpha=0.2)
    ax.set_xlabel("labels")
    ax.set_ylabel("win-rate (mean ± SE over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "winrate.png", dpi=120)
    plt.close(fig)
    if "kl" in by_metric and "kl_score" in by_metric:
        frontier = by_metric["kl"].merge(by_metric["kl_score"], on=["function", "labels"], suffixes=("_kl", "_score"))
        plot_frontier(frontier.rename(columns={"mean_kl": "kl", "se_kl": "kl_se", "mean_score": "score",
                                               "se_score": "score_se"}), "function", root / "frontier.png")
    return root / "results.md"

