"""Recipe schema, overrides, the shipped recipes, the JSON schema command, and the README's reference table."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

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


JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
    "null": type(None),
}


def _alternatives(schema: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain schemas a node allows: its $ref followed, each branch of an anyOf."""
    if "$ref" in node:
        return _alternatives(schema, schema["$defs"][node["$ref"].removeprefix("#/$defs/")])
    if "anyOf" in node:
        return [plain for branch in node["anyOf"] for plain in _alternatives(schema, branch)]
    return [node]


def schema_problems(schema: dict[str, Any], node: dict[str, Any], value: Any, where: str) -> list[str]:
    """Why `value` breaks `node` (none: it conforms), as an editor reads the schema: types, enums, required and
    unknown keys, list items. A small reader of its own, so the test does not lean on the library that wrote it."""
    found: list[str] = []
    for plain in _alternatives(schema, node):
        kind, problems = plain.get("type"), []
        if "enum" in plain and value not in plain["enum"]:
            problems.append(f"{where}: {value!r} is not one of {plain['enum']}")
        elif kind and (not isinstance(value, JSON_TYPES[kind]) or isinstance(value, bool) and kind != "boolean"):
            problems.append(f"{where}: {value!r} is not of type {kind}")
        elif kind == "object":
            problems += [f"{where}.{key}: required key is missing" for key in plain.get("required", [])
                         if key not in value]
            for key, item in value.items():
                if key in plain.get("properties", {}):
                    problems += schema_problems(schema, plain["properties"][key], item, f"{where}.{key}")
                elif plain.get("additionalProperties") is False:
                    problems.append(f"{where}.{key}: unknown key")
        elif kind == "array":
            for i, item in enumerate(value):
                problems += schema_problems(schema, plain.get("items", {}), item, f"{where}[{i}]")
        if not problems:
            return []
        found += problems
    return found


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """What `ft schema` prints."""
    result = run_ft("schema")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_schema_accepts_the_shipped_recipes(schema: dict[str, Any], path: Path) -> None:
    assert schema_problems(schema, schema, yaml.safe_load(path.read_text()), "recipe") == []


DELETE = object()  # a recipe edit that removes the key


REFUSED = [  # (recipe key, value, what the schema reader says)
    ("trian.lr", 0.1, "recipe.trian: unknown key"),
    ("lora.dropuot", 0.1, "recipe.lora.dropuot: unknown key"),
    ("train.schedule", "cosin", "recipe.train.schedule: 'cosin' is not one of"),
    ("data.image_soft_tokens", 100, "recipe.data.image_soft_tokens: 100 is not one of"),
    ("train.batch_size", "eight", "recipe.train.batch_size: 'eight' is not of type integer"),
    ("model.name", DELETE, "recipe.model.name: required key is missing"),
]


@pytest.mark.parametrize(("key", "value", "problem"), [pytest.param(*case, id=case[0]) for case in REFUSED])
def test_schema_flags_what_the_recipe_loader_refuses(schema: dict[str, Any], key: str, value: object, problem: str,
                                                       tmp_path: Path) -> None:
    """An editor using the schema flags the mistakes that `ft` itself refuses (tests/test_bad_inputs.py)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    section, name = key.split(".")
    values = recipe.setdefault(section, {})
    if value is DELETE:
        del values[name]
    else:
        values[name] = value
    assert any(problem in found for found in schema_problems(schema, schema, recipe, "recipe")), problem
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "r.yaml")


def test_schema_describes_every_recipe_key(schema: dict[str, Any]) -> None:
    """Every key of the recipe, with the description an editor shows for it (`ft.recipe`'s own, never empty)."""
    for key, field in _leaf_fields(Recipe):
        node = schema
        for name in key.split("."):
            node = next(plain["properties"][name] for plain in _alternatives(schema, node)
                        if name in plain.get("properties", {}))
        assert field.description and node.get("description") == field.description, key
    assert set(schema["required"]) == {"model", "data", "output"}


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted key, field) of every value of a recipe, nested sections walked."""
    leaves = []
    for name, field in model.model_fields.items():
        # a section, or an optional one (X | None); a dict or list of sections (export.variants) is one value
        union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        nested = [a for a in (typing.get_args(field.annotation) if union else (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        leaves += _leaf_fields(nested[0], f"{prefix}{name}.") if nested else [(f"{prefix}{name}", field)]
    return leaves


def test_readme_documents_every_recipe_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _ in _leaf_fields(Recipe) if f"`{key}`" not in readme]
    assert not missing, f"README recipe reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = readme.index("<!-- test-command -->")
    command = readme[marker + 2]
    assert "pytest" in command and "pip install" in command
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
