"""Recipe schema, overrides, the shipped recipes, the JSON schema command, and the README's reference table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from ft.errors import RecipeError
from ft.recipe import Recipe
from ft.recipe_io import load_recipe
from conftest import ROOT, run_ft

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_open_with_a_run_comment(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "every recipe opens with a comment"
    recipe = load_recipe(path)
    command = "ft eval" if recipe.study else "ft train"  # a study trains nothing: eval exports and measures it
    assert f"{command} recipes/{path.name}" in path.read_text()
    assert recipe.data.train.is_absolute() and recipe.output.dir.is_absolute()


def test_overrides_parse_yaml_values_and_nest():
    recipe = load_recipe(
        ROOT / "recipes" / "demo.yaml", ["train.lr=1e-4", "lora.targets=[q_proj]", "lora.vision=false"]
    )
    assert recipe.train.lr == 1e-4 and recipe.lora.targets == ["q_proj"] and recipe.lora.vision is False


def test_relative_paths_anchor_at_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text("# x\nmodel: {name: tiny-random:gemma4-unified}\ndata: {train: d/t.jsonl}\noutput: {dir: out}\n")
    recipe = load_recipe(path)
    assert recipe.data.train == tmp_path / "sub" / "d" / "t.jsonl"
    assert recipe.output.dir == tmp_path / "sub" / "out"


def test_several_errors_are_reported_together_with_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  name: tiny-random:gemma4-unified\ndata:\n  train: t.jsonl\n"
        "train:\n  lr: -1\n  batchsize: 4\noutput:\n  dir: out\n"
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert f"{path}:6: train.lr: Input should be greater than 0" in message
    assert f"{path}:7: train.batchsize: unknown key (did you mean 'batch_size'?)" in message


def test_schema_command_prints_the_json_schema():
    result = run_ft("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema == json.loads(json.dumps(Recipe.model_json_schema()))
    assert set(schema["required"]) == {"model", "data", "output"}


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        nested = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        keys += _keys(nested[0], f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return keys


def test_readme_documents_every_recipe_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in _keys(Recipe) if f"`{key}`" not in readme]
    assert not missing, f"README recipe reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = readme.index("<!-- test-command -->")
    command = readme[marker + 2]
    assert "pytest" in command and "pip install" in command
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
