"""Shared fixtures: the tiny model, its processor, and a fast copy of the demo recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


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
    """The README's demo, once per session: train, export (ft quantize) and evaluate (ft eval) the tiny model. What
    the command printed is kept beside the run directory, in `ft.stderr`."""
    run = tmp_path_factory.mktemp("demo") / "run"
    result = run_ft("train", str(ROOT / "recipes" / "demo.yaml"), f"output.dir={run}", "logging.wandb=offline")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (run.parent / "ft.stderr").write_text(result.stderr)
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


def run_ft(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the `ft` CLI in a fresh process, as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ft", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )
