"""`ft validate` checks every data row without importing the trainer (trl)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPORT_IMPORTS, imported, run_ft, write_recipe


def test_validate_checks_rows_with_the_processor_and_without_trl(tmp_path: Path) -> None:
    """A row too long for data.max_seq_length: only encoding it with the model's processor finds that, so the
    processor and torch were loaded; trl (the trainer) was not."""
    rows = tmp_path / "rows.jsonl"
    words = " ".join(["word"] * 40)
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": words},
                                             {"role": "assistant", "content": words}]}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", data={"train": str(rows), "eval": None, "max_seq_length": 16})
    result = run_ft("validate", str(recipe), after=REPORT_IMPORTS)
    assert f"{rows}:1: " in result.stderr and "longer than data.max_seq_length (16)" in result.stderr, result.stderr
    assert result.returncode == 2
    modules = imported(result)
    assert "torch" in modules and "transformers" in modules
    assert "trl" not in modules
