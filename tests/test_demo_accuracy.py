"""The demo shows what ft is for: the tiny model learns the demo's held-out rule (repeating the first word of a list)
demo's training, from near zero before it to most of the held-out rows after, and the report gives every quant's
accuracy with its interval. What the low-bit quants score is reported as measured, not asserted here.

"Before" is the untrained base model, exported and scored by the same `ft eval` code as a study (study: true) with
the demo's own data and eval settings, so both numbers come from the same prompts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from scipy.stats import binomtest

from conftest import DEMO_DATA, ROOT, run_ft_in_process
from ft.data import load_rows

pytestmark = pytest.mark.slow


def heldout(results: dict[str, Any], label: str) -> dict[str, Any]:
    (row,) = [q for q in results["quants"] if q["type"] == label]
    return row["accuracy"]["heldout"]


def text_only_rows() -> int:
    """Held-out rows without an image or audio part: the prompts that `ft eval` can score (read from the file)."""
    rows = load_rows(DEMO_DATA / "heldout.jsonl")
    return sum(all(part["type"] == "text" for m in row.messages for part in m["content"]) for row in rows)


@pytest.fixture(scope="module")
def results(demo_run: Path) -> dict[str, Any]:
    return json.loads((demo_run / "eval" / "results.json").read_text())


@pytest.fixture(scope="module")
def base_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`ft eval` of the untrained tiny model: the demo recipe as a study (nothing trained), its reference only."""
    folder = tmp_path_factory.mktemp("base")
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    for section in ("lora", "train"):
        del recipe[section]
    recipe.update(study=True, logging={"wandb": "disabled"}, output={"dir": str(folder / "run")})
    recipe["data"].update(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "heldout.jsonl"))
    recipe["export"] = {"quants": ["Q8_0"], "reference": recipe["export"]["reference"], "projector": False}
    recipe["eval"].update(quants=["Q8_0"], speed=False)
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_ft_in_process("eval", str(path))
    assert result.returncode == 0, result.stderr
    return json.loads((folder / "run" / "eval" / "results.json").read_text())


def test_untrained_model_misses_the_heldout_rule(results: dict[str, Any], base_results: dict[str, Any]) -> None:
    reference = f"{base_results['reference_type']} (reference)"
    before = heldout(base_results, reference)
    print(f"held-out accuracy of the untrained reference: {before['accuracy']:.1%}")
    assert results["prompts_sha256"] == base_results["prompts_sha256"]  # the same prompts and answers as the demo's
    assert before["n"] == text_only_rows() >= 20
    assert before["accuracy"] <= 0.1


def test_demo_learns_the_heldout_rule(results: dict[str, Any]) -> None:
    after = heldout(results, f"{results['reference_type']} (reference)")
    print(f"held-out accuracy of the trained reference: {after['accuracy']:.1%}")
    assert after["n"] == text_only_rows()
    assert after["accuracy"] >= 0.8


def accuracy_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """The report's accuracy table, by (type, task): its other cells as written."""
    section = report.split("## Accuracy (greedy, exact match)", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| type ")]
    return {(row[0], row[1]): row[2:] for row in rows}


def test_report_gives_every_quants_heldout_accuracy_with_its_interval(demo_run: Path, results: dict[str, Any]) -> None:
    """Each measured file has a held-out row in report.md: its accuracy from its per-prompt answers, and the 95%
    Wilson interval as scipy computes it."""
    table = accuracy_rows((demo_run / "eval" / "report.md").read_text())
    types = [q["type"] for q in results["quants"]]
    assert types[1:] == yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())["eval"]["quants"]
    for q in results["quants"]:
        accuracy, interval, n = table[(q["type"], "heldout")][:3]
        answers = q["answers"][-int(n):]  # held-out prompts come after any reasoning-gym ones
        assert int(n) == text_only_rows()
        assert float(accuracy) == pytest.approx(100 * sum(answers) / len(answers), abs=0.05)
        wilson = binomtest(sum(answers), len(answers)).proportion_ci(method="wilson")
        low, high = (float(x) for x in re.fullmatch(r"([\d.]+)-([\d.]+)", interval).groups())
        assert (low, high) == pytest.approx((100 * wilson.low, 100 * wilson.high), abs=0.05), q["type"]
