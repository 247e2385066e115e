"""What ft prints: its own words first and alone, even from commands that import torch; the libraries' warnings and
log messages only with `ft --verbose`. And `ft validate` checks every data row without importing the trainer (trl).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import REPORT_IMPORTS, imported, line_of, run_ft, write_recipe

from ft.quiet import LIBRARY_LOG_SETTINGS

# Once ft is done, messages sent the ways libraries send them: through torch's and transformers' own loggers (set up
# when imported, from the environment), through a plain library logger (bitsandbytes'), through Python's warnings.
LIBRARY_MESSAGES = {
    "torch says": 'logging.getLogger("torch.utils._pytree").warning("torch says")',
    "transformers says": 'transformers_logging.get_logger("transformers.trainer").warning("transformers says")',
    "bitsandbytes says": 'logging.getLogger("bitsandbytes.backends.cpu.ops").warning("bitsandbytes says")',
    "a library warns": 'warnings.warn("a library warns", FutureWarning)',
}
SEND_LIBRARY_MESSAGES = "\n".join(["import logging, warnings", "import torch",
                                    "from transformers.utils import logging as transformers_logging",
                                    *LIBRARY_MESSAGES.values()])


def test_recipe_error_is_fts_message_alone(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", trian={"lr": 0.1})
    result = run_ft("train", str(recipe))
    line = line_of(recipe.read_text(), "trian:")
    assert result.stderr == f"ft: error: invalid recipe:\n  {recipe}:{line}: trian: unknown key (did you mean 'train'?)\n"
    assert result.returncode == 2


def test_validate_checks_rows_with_the_processor_and_without_trl(tmp_path: Path) -> None:
    """A row too long for data.max_seq_length: only encoding it with the model's processor finds that, so the
    processor and torch were loaded; trl (the trainer) was not. stderr is ft's message and nothing else."""
    rows = tmp_path / "rows.jsonl"
    words = " ".join(["word"] * 40)
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": words},
                                             {"role": "assistant", "content": words}]}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", data={"train": str(rows), "eval": None, "max_seq_length": 16,
                                                   "too_long": "error"})
    result = run_ft("validate", str(recipe), after=REPORT_IMPORTS)
    expected = rf"ft: error: 1 of 1 rows are invalid:\n  {re.escape(str(rows))}:1: \d+ tokens, longer than " \
               r"data\.max_seq_length \(16\)\n"
    assert re.fullmatch(expected, result.stderr), result.stderr
    assert result.returncode == 2
    modules = imported(result)
    assert "torch" in modules and "transformers" in modules
    assert "trl" not in modules


def test_plan_prints_only_fts_lines(tmp_path: Path) -> None:
    """`ft plan` imports torch and transformers; what it prints is its header, its table and its verdict."""
    recipe = write_recipe(tmp_path / "r.yaml")
    result = run_ft("plan", str(recipe))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{recipe}: ") and lines[-1].startswith("ok: fits"), result.stderr
    assert all(line.startswith("  ") for line in lines[1:-1]), result.stderr


# The user's own choices, which ft leaves alone: the tests start from none.
NO_USER_SETTINGS = {name: None for name in [*LIBRARY_LOG_SETTINGS, "PYTHONWARNINGS"]}


def library_messages_shown(*args: str, env: dict[str, str | None]) -> list[str]:
    result = run_ft(*args, "schema", after=SEND_LIBRARY_MESSAGES, env=env)
    assert result.returncode == 0, result.stderr
    return [message for message in LIBRARY_MESSAGES if message in result.stderr]


def test_library_messages_are_hidden() -> None:
    assert library_messages_shown(env=NO_USER_SETTINGS) == []


def test_verbose_shows_library_messages() -> None:
    assert library_messages_shown("--verbose", env=NO_USER_SETTINGS) == list(LIBRARY_MESSAGES)


def test_a_users_warning_filter_is_kept() -> None:
    assert library_messages_shown(env={**NO_USER_SETTINGS, "PYTHONWARNINGS": "default"}) == ["a library warns"]
