"""Aggregate a sweep: win-rate per acquisition function and label count, over seeds.

Reads every `<sweep>/<function>_seed<k>/round_*/eval.json` and writes `results.csv`, `results.md`
(mean +- standard error over seeds, and the difference to random with a paired 95% confidence
interval: paired by seed, so each seed's shared eval set and reference cancel) and `winrate.png`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from .rundir import atomic_write_text

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond that the normal's.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]


def t95(df: int) -> float:
    return T95[df - 1] if 1 <= df <= len(T95) else 1.96


def collect(root: str | Path) -> pd.DataFrame:
    """One row per (run, round): function, seed, round, labels, win_rate, stderr."""
    rows = []
    for config in sorted(Path(root).glob("*/config.yaml")):
        cfg = OmegaConf.load(config)
        for path in sorted(config.parent.glob("round_*/eval.json")):
            e = json.loads(path.read_text())
            rows.append({"function": cfg.acquisition.function, "seed": int(cfg.seed), "round": e["round"],
                         "labels": e["labels"], "win_rate": e["win_rate"], "stderr": e["stderr"]})
    if not rows:
        raise FileNotFoundError(f"no finished rounds (round_*/eval.json) under {root}")
    return pd.DataFrame(rows)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per function and label count: mean and standard error over seeds, and the paired difference
    to random (mean, standard error, 95% CI) over the seeds both have."""
    out = []
    random = results[results["function"] == "random"].set_index(["labels", "seed"])["win_rate"]
    for (function, labels), g in results.groupby(["function", "labels"]):
        w = g["win_rate"].to_numpy()
        row = {"function": function, "labels": labels, "seeds": len(w), "mean": w.mean(),
               "se": w.std(ddof=1) / math.sqrt(len(w)) if len(w) > 1 else float("nan")}
        if function != "random":
            paired = g.set_index("seed")["win_rate"]
            common = [s for s in paired.index if (labels, s) in random.index]
            d = np.array([paired[s] - random[(labels, s)] for s in common])
            if len(d) > 1:
                se = d.std(ddof=1) / math.sqrt(len(d))
                row.update(diff=d.mean(), diff_se=se, ci_low=d.mean() - t95(len(d) - 1) * se,
                           ci_high=d.mean() + t95(len(d) - 1) * se)
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


def write_outputs(root: str | Path) -> Path:
    """results.csv, results.md and winrate.png in the sweep folder; returns results.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    summary = summarise(collect(root))
    summary.to_csv(root / "results.csv", index=False)
    lines = ["# Sweep results", "", "Win-rate against the reference completions, mean ± standard error over seeds; "
             "difference to random paired by seed with a 95% t confidence interval.", "",
             "| function | labels | seeds | win-rate | diff to random [95% CI] |", "|---|---:|---:|---|---|"]
    for r in summary.itertuples():
        diff = (f"{r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                if "diff" in summary and not pd.isna(getattr(r, "diff", float("nan"))) else "")
        lines.append(f"| {r.function} | {r.labels} | {r.seeds} | {r.mean:.3f} ± {r.se:.3f} | {diff} |")
    reach = labels_to_reach(summary)
    if reach:
        lines += ["", "Labels needed to reach random's final mean win-rate:", ""]
        lines += [f"- {f}: {n if n is not None else 'not reached'}" for f, n in sorted(reach.items())]
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
    return root / "results.md"
