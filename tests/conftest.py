"""Shared fixtures and helpers: the tiny model, its processor, the demo run, a fast copy of the demo recipe, and
running the `ft` CLI in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

Result = subprocess.CompletedProcess[str]

# Code for `run_ft(..., after=REPORT_IMPORTS)`: ends stdout with the top-level packages the process imported, so a
# test can tell what a command loaded (`imported`).
REPORT_IMPORTS = """\
import sys
print("imported:", ",".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def ft_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of an ft process: offline, no wandb, no colour codes (they would split the phrases tests look
    for), this checkout's ft first on the path whatever the working folder; `env` on top (None removes a
    variable)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full: dict[str, str | None] = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "NO_COLOR": "1",
                                   "FORCE_COLOR": None, "PYTHONPATH": path, **(env or {})}
    return {key: value for key, value in full.items() if value is not None}


def ft_command(*args: str, after: str = "") -> list[str]:
    """The command line of `ft ARGS...`; with `after`, through ft's console-script entry (as `python -m ft` runs
    it) followed, in the same process and whether or not ft failed, by the Python code `after`."""
    if not after:
        return [sys.executable, "-m", "ft", *args]
    script = f"from ft.cli import main\ntry:\n    main()\nfinally:\n{textwrap.indent(after, '    ')}"
    return [sys.executable, "-c", script, *args]


def run_ft(*args: str, cwd: Path = ROOT, env: Mapping[str, str | None] | None = None, timeout: int = 600,
           after: str = "") -> Result:
    """Run the `ft` CLI in a fresh process, as a user would (`after`: see `ft_command`)."""
    return subprocess.run(ft_command(*args, after=after), capture_output=True, text=True, env=ft_env(env), cwd=cwd,
                          timeout=timeout)


def imported(result: Result) -> set[str]:
    """The top-level packages that a `run_ft(..., after=REPORT_IMPORTS)` process had imported when ft was done."""
    last = result.stdout.splitlines()[-1]
    assert last.startswith("imported: "), result.stdout
    return set(last.removeprefix("imported: ").split(","))


def line_of(text: str, snippet: str) -> int:
    """Number (from 1) of the first line of `text` holding `snippet`: where a recipe error must point."""
    for number, line in enumerate(text.splitlines(), start=1):
        if snippet in line:
            return number
    raise AssertionError(f"{snippet!r} not in\n{text}")


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the tiny random Gemma 4, built once per session; tests must not modify the model."""
    from ft.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The README's demo, once per session: train, export (ft quantize) and evaluate (ft eval) the tiny model."""
    run = tmp_path_factory.mktemp("demo") / "run"
    result = run_ft("train", str(ROOT / "recipes" / "demo.yaml"), f"output.dir={run}", "logging.wandb=offline")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return run


def write_recipe(path: Path, **sections: dict) -> Path:
    """Write a recipe based on recipes/demo.yaml with absolute data paths, and `sections` merged over it."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["data"]["train"] = str(DEMO_DATA / "train.jsonl")
    recipe["data"]["eval"] = str(DEMO_DATA / "heldout.jsonl")
    recipe["output"]["dir"] = str(path.parent / "run")
    recipe["logging"]["wandb"] = "disabled"
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path
