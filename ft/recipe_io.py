"""Read a recipe YAML, apply `key.path=value` overrides, and turn schema errors into messages with file:line.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.yaml"
    >>> _ = p.write_text(
    ...     "model: {name: tiny-random:gemma4-unified}\\ndata: {train: t.jsonl}\\noutput: {dir: runs/x}\\n")
    >>> load_recipe(p, ["train.lr=1e-4"]).train.lr
    0.0001
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ft.errors import RecipeError
from ft.recipe import Recipe

Loc = tuple[str | int, ...]


def _line_index(node: yaml.Node, loc: Loc = ()) -> dict[Loc, int]:
    """Map every key path in a composed YAML document to its 1-based line."""
    lines: dict[Loc, int] = {loc: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            lines.update(_line_index(value, child))
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, (*loc, i)))
    return lines


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section_model(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc`, used to suggest key names."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if a is not type(None)]
        nested = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _did_you_mean(loc: Loc) -> str:
    owner = _section_model(loc[:-1])
    if owner is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known keys: {', '.join(owner.model_fields)})"


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key" + _did_you_mean(tuple(error["loc"]))
    if error["type"] == "missing":
        return "required key is missing"
    message = error["msg"]
    if "input" in error and not isinstance(error["input"], dict | list):
        message += f" (got {error['input']!r})"
    return message


def _format_errors(exc: ValidationError, source: str, lines: dict[Loc, int], overridden: dict[Loc, str]) -> str:
    out = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        by_override = [
            o for path, o in overridden.items() if loc and (path[: len(loc)] == loc or loc[: len(path)] == path)
        ]
        while loc and loc not in lines:
            loc = loc[:-1]
        where = by_override[0] if by_override else f"{source}:{lines.get(loc, 1)}"
        field = _dotted(tuple(error["loc"])) or "(recipe)"
        out.append(f"{where}: {field}: {_describe(error)}")
    return "invalid recipe:\n  " + "\n  ".join(out)


def _apply_override(doc: dict[str, Any], override: str) -> Loc:
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{override}': expected KEY.PATH=VALUE, for example train.lr=1e-4")
    path = tuple(key.split("."))
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{override}': value is not valid YAML ({exc.problem})") from None
    node = doc
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override '{override}': {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value
    return path


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    """Parse a recipe file into a dict plus a key-path -> line index; YAML syntax errors name the line."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        node = yaml.compose(text)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if doc is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections (model, data, lora, train, ...)")
    return doc, _line_index(node)


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe; relative paths are resolved against the recipe's folder."""
    path = Path(path)
    doc, lines = read_yaml(path)
    overridden = {_apply_override(doc, o): f"override '{o}'" for o in overrides or []}
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, str(path), lines, overridden)) from None
    recipe = recipe.resolve_paths(path.resolve().parent)
    recipe._where = {".".join(map(str, loc)): f"{path}:{line}" for loc, line in lines.items() if loc}
    recipe._where.update({".".join(map(str, loc)): where for loc, where in overridden.items()})
    return recipe
