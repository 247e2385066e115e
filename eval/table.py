"""The machine-readable table of evaluations: one row per (evaluation, quant), each value as results.json holds it
(results.csv of `ft eval`, comparison.csv of `ft compare`), for a researcher's own plots."""

from __future__ import annotations

import csv
import io
from typing import Any

COLUMNS = ("evaluation", "type", "file", "bits_per_weight", "kld_mean", "kld_mean_error", "kld_median", "kld_p99",
           "kld_p999", "top1_agreement", "ppl", "ppl_ratio", "accuracy", "prompts")
DIVERGENCE = ("kld_mean", "kld_mean_error", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "ppl",
              "ppl_ratio")


def overall_accuracy(row: dict[str, Any]) -> tuple[float | str, int | str]:
    """Accuracy over every prompt of a row (all tasks together), and the number of prompts; blank without prompts."""
    answers = row.get("answers") or []
    return (sum(answers) / len(answers), len(answers)) if answers else ("", "")


def table(evaluations: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (evaluation, quant), each value as its results.json holds it."""
    rows = []
    for label, results in evaluations:
        for q in results["quants"]:
            div = q.get("divergence", {})
            accuracy, prompts = overall_accuracy(q)
            rows.append({"evaluation": label, "type": q["type"], "file": q["file"],
                         "bits_per_weight": q.get("bits_per_weight", ""),
                         **{k: div.get(k, "") for k in DIVERGENCE}, "accuracy": accuracy, "prompts": prompts})
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # floats as Python writes them (repr): they read back to the same numbers
    return out.getvalue()
