"""Which backend a run gets (`ft.backends.choose`): never a silent fallback, a clear error where a forced backend
cannot run, and nothing imports unsloth on a machine without CUDA (CI's). The unsloth backend itself needs a GPU:
tests/test_gpu.py trains with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import line_of, run_ft, write_recipe

from ft import backends
from ft.errors import RecipeError
from ft.recipe_io import load_recipe


def recipe_with(tmp_path: Path, backend: str) -> Path:
    return write_recipe(tmp_path / "r.yaml", train={"backend": backend})


def test_forced_unsloth_without_cuda_fails_naming_the_line(tmp_path: Path) -> None:
    recipe = recipe_with(tmp_path, "unsloth")
    result = run_ft("train", str(recipe), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    line = line_of(recipe.read_text(), "backend:")
    assert f"{recipe}:{line}: train.backend: unsloth needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_auto_on_cpu_is_hf_and_says_why(demo_run: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    assert (summary["backend"], summary["backend_reason"]) == ("hf", "auto on a machine without CUDA")


@pytest.mark.parametrize("setting", ["auto", "hf"])
def test_cpu_choice_never_imports_unsloth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    chosen = backends.choose(load_recipe(recipe_with(tmp_path, setting), []))
    assert (chosen.name, chosen.device) == ("hf", "cpu")
    assert "unsloth" not in sys.modules


def test_cuda_without_a_working_unsloth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto falls back to hf with the reason recorded; a recipe that asks for unsloth is refused, naming its line."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(backends, "_unsloth_problem", lambda: "importing it failed (ImportError: no xformers)")
    auto = backends.choose(load_recipe(recipe_with(tmp_path, "auto"), []))
    assert (auto.name, auto.device) == ("hf", "cuda")
    assert auto.reason == "auto on CUDA, but unsloth cannot run here: importing it failed (ImportError: no xformers)"
    recipe = recipe_with(tmp_path, "unsloth")
    line = line_of(recipe.read_text(), "backend:")
    with pytest.raises(RecipeError, match=rf"{recipe}:{line}: train.backend: unsloth cannot run"):
        backends.choose(load_recipe(recipe, []))


@pytest.mark.parametrize("batch, rows, picked", [(1, backends.UNSLOTH_STEP_TOKENS, "unsloth"),
                                                 (1, backends.UNSLOTH_STEP_TOKENS + 1, "hf"),
                                                 (4, backends.UNSLOTH_STEP_TOKENS // 4, "unsloth"),
                                                 (4, backends.UNSLOTH_STEP_TOKENS // 4 + 1, "hf")])
def test_auto_on_cuda_picks_by_micro_batch_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int,
                                                  rows: int, picked: str) -> None:
    """unsloth for micro-batches up to UNSLOTH_STEP_TOKENS tokens, ft's own path past it (without importing
    unsloth), the reason saying so; `ft plan` estimates the same backend."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    imports: list[str] = []  # unsloth imports in _unsloth_problem
    monkeypatch.setattr(backends, "_unsloth_problem", lambda: imports.append("unsloth"))
    recipe = write_recipe(tmp_path / "r.yaml", data={"max_seq_length": rows}, train={"batch_size": batch})
    chosen = backends.choose(load_recipe(recipe, []))
    assert imports == (["unsloth"] if picked == "unsloth" else [])
    faster = "unsloth is the faster (up to" if picked == "unsloth" else "ft's own path is faster than unsloth (past"
    assert chosen.name == picked
    assert chosen.reason == (f"auto on CUDA with micro-batches up to {batch * rows} tokens ({batch} x {rows}), where "
                             f"{faster} {backends.UNSLOTH_STEP_TOKENS})")
    assert backends.choose_for_plan("auto", rows, batch) == picked
    assert backends.choose_for_plan("unsloth", rows, batch) == "unsloth"
