"""`ft compare`: one report over several evaluations of the same text, such as a base model's study and a
fine-tune's, so that "did fine-tuning make this model more sensitive to 3-bit quantization?" has an answer.

    ft compare runs/study-demo/eval runs/demo/eval --out comparison

Writes into `--out` (an ft comparison folder): comparison.csv, every (evaluation, quant) row with the numbers of
its results.json side by side; report.md with that table and, for each quant type that the first evaluation and a
later one both measured, the later one's minus the first one's mean KLD (each against its own reference) and
accuracy, with paired 95% intervals (`eval.paired`). Those pairs are made only where both evaluations scored the same
tokens (for KLD) or the same prompts (for accuracy), as their results.json digests say.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.paired import paired_bootstrap
from eval.report import PAIR_HEADER, PAIRS_NOTE, md_table, pair_rows
from eval.table import COLUMNS, table, to_csv
from ft.atomic import write_text
from ft.errors import FtError
from ft.rundir import claim


def load_results(folders: Sequence[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(label, results.json) of each evaluation folder; the label is the run's name, or the folder where two runs
    share a name."""
    loaded = []
    for folder in folders:
        try:
            loaded.append((folder, json.loads((folder / "results.json").read_text())))
        except (OSError, ValueError) as exc:
            raise FtError(f"{folder}: no readable results.json ({exc}); pass folders that `ft eval` wrote") from None
    names = [results["run"] for _, results in loaded]
    return [(name if names.count(name) == 1 else str(folder), results)
            for name, (folder, results) in zip(names, loaded, strict=True)]


def cross_pairs(evaluations: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each later evaluation's quant against the first evaluation's quant of the same type, where the same tokens
    (and, for accuracy, the same prompts) were scored."""
    (first_label, first), later = evaluations[0], evaluations[1:]
    firsts = {q["type"]: q for q in first["quants"] if "divergence" in q}
    pairs = []
    for label, results in later:
        if results.get("scored_tokens_sha256") != first.get("scored_tokens_sha256"):
            continue
        same_prompts = results.get("prompts_sha256") == first.get("prompts_sha256")
        for q in results["quants"]:
            base = firsts.get(q["type"])
            if base is None or "divergence" not in q:
                continue
            pair = {"type": f"{label}: {q['type']}", "against": f"{first_label}: {base['type']}",
                    "kld_mean": paired_bootstrap(q["divergence"]["chunk_kld"],
                                                 base["divergence"]["chunk_kld"]).as_dict()}
            if same_prompts and q.get("answers") and base.get("answers"):
                pair["accuracy"] = paired_bootstrap(q["answers"], base["answers"]).as_dict()
            pairs.append(pair)
    return pairs


def markdown(evaluations: list[tuple[str, dict[str, Any]]], rows: list[dict[str, Any]],
             pairs: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    sources = "\n".join(f"- {label}: `{r['reference']}`, {r.get('divergence_tokens', 0)} scored tokens, "
                        f"{r['date']}" for label, r in evaluations)
    first = evaluations[0][0]
    every = md_table(list(COLUMNS), [[cell(row[c]) for c in COLUMNS] for row in rows])
    against = md_table(PAIR_HEADER, pair_rows(pairs)) if pairs else "No evaluation scored the same tokens as the first."
    parts = ["# Comparison of evaluations", sources, "## Every quant (comparison.csv)", every, f"## Against {first}",
             f"Each quant of a later evaluation against the same type in {first}. " + PAIRS_NOTE.split(": ", 1)[1],
             against]
    return "\n\n".join(parts) + "\n"


def write_comparison(folders: Sequence[Path], out: Path) -> Path:
    """comparison.csv and report.md of `folders` (evaluation folders) in `out`; returns the report's path."""
    if len(folders) < 2:
        raise FtError("ft compare needs two evaluation folders or more")
    evaluations = load_results(folders)
    rows = table(evaluations)
    pairs = cross_pairs(evaluations)
    with claim(out, "compare"):
        write_text(out / "comparison.csv", to_csv(rows))
        write_text(out / "report.md", markdown(evaluations, rows, pairs))
    return out / "report.md"
