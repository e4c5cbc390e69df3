"""A label store as a data set: `apo-dist export-labels STORE OUT [--format preference]`.

Two formats, written as Parquet or JSON lines by OUT's extension (both load with
`datasets.load_dataset("parquet" | "json", data_files=OUT)`):

- raw (the default): every row of the store's labels table as stored (oracles/store.py): the
  comparison in canonical order (first < second) with label = P(first preferred), its status, and
  what the oracle reported.
- preference: one row per answered comparison in the layout TRL's DPOTrainer and OpenRLHF read:
  prompt, chosen, rejected (plain strings), plus p_chosen (the oracle's probability that chosen is
  preferred), oracle (its identity) and key (the store's comparison key). chosen is the side the
  oracle prefers, P > 0.5; a soft answer keeps its probability in p_chosen (> 0.5). Unlabelable
  comparisons are left out, and so are ties (P = 0.5) unless `keep_ties`: then chosen and rejected
  are the store's canonical order and p_chosen is 0.5.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .rundir import atomic_write_text, write_table

FORMATS = ("raw", "preference")
SUFFIXES = (".parquet", ".jsonl")


class ExportError(ValueError):
    """An export that cannot be written as asked; the message is one line."""


def preference_rows(labels: pd.DataFrame, keep_ties: bool = False) -> tuple[pd.DataFrame, dict[str, int]]:
    """(prompt, chosen, rejected, p_chosen, oracle, key rows, {"unlabelable": n, "ties": n} left out)
    from a store's labels table (LabelStore.export)."""
    answered = labels[labels["status"].eq("ok") & labels["label"].notna()]
    tie = answered["label"].astype(float).eq(0.5)
    kept = answered if keep_ties else answered[~tie]
    p_first = kept["label"].astype(float)
    first_chosen = p_first >= 0.5  # ties kept: the canonical order
    rows = pd.DataFrame({"prompt": kept["prompt"], "chosen": kept["first"].where(first_chosen, kept["second"]),
                         "rejected": kept["second"].where(first_chosen, kept["first"]),
                         "p_chosen": p_first.where(first_chosen, 1.0 - p_first),
                         "oracle": kept["oracle"], "key": kept["key"]})
    left_out = {"unlabelable": len(labels) - len(answered), "ties": 0 if keep_ties else int(tie.sum())}
    return rows.reset_index(drop=True), left_out


def check_out(out: Path) -> None:
    """ExportError unless OUT names a Parquet or JSON lines file."""
    if out.suffix not in SUFFIXES:
        raise ExportError(f"{out}: the output must end in {' or '.join(SUFFIXES)} (Parquet or JSON lines)")


def write_rows(out: Path, table: pd.DataFrame) -> None:
    """`table` to OUT, atomically, as Parquet or JSON lines by its extension; ExportError when it cannot
    be written there."""
    check_out(out)
    try:
        if out.suffix == ".parquet":
            write_table(out, table)
        else:
            atomic_write_text(out, table.to_json(orient="records", lines=True, force_ascii=False))
    except OSError as e:
        raise ExportError(f"{out}: cannot write ({e.strerror or e})") from None
