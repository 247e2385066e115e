"""A recipe's training and held-out rows: `data.train` and `data.eval` as read (`ft.data.load_rows`), or, without
`data.eval`, `data.eval_split` rows of `data.train` held out.

Which rows are held out depends only on each row's content and `train.seed`: the rows whose seeded SHA-256 is
smallest. The same data gives the same held-out rows every run, in any order, and a row added to the file moves at
most one other row between the sets.

    >>> from ft.data import Row
    >>> rows = [Row([{"role": "user", "content": str(i)}], f"x:{i}", Path(".")) for i in range(20)]
    >>> train, held = held_out(rows, 0.25, seed=0)
    >>> len(train), len(held), set(r.where for r in train) & set(r.where for r in held)
    (15, 5, set())
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ft.data import Row, Rows, load_rows
from ft.data_sources import count_records
from ft.errors import DataError
from ft.recipe import Recipe


def held_out_count(rows: int, size: float | int) -> int:
    """How many of `rows` rows a `data.eval_split` of `size` holds out: a count, or a fraction (at least one)."""
    return size if isinstance(size, int) else max(1, round(size * rows))


def held_out(rows: list[Row], size: float | int, seed: int) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) in their file order: `held_out_count` rows with the smallest seeded hash go
    to the held-out set."""
    count = held_out_count(len(rows), size)
    if count >= len(rows):
        raise DataError(f"data.eval_split asks for {count} held-out rows, but data.train has only {len(rows)}")

    def key(index: int) -> tuple[str, int]:
        content = json.dumps(rows[index].messages, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(f"{seed}\0{content}".encode()).hexdigest(), index

    chosen = set(sorted(range(len(rows)), key=key)[:count])
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


def training_row_count(recipe: Recipe) -> int | None:
    """The rows a run trains on, counted before they load (`count_records`) for `auto`'s choice by steps: data.train's
    less those data.eval_split holds out (data.too_long's drops are known only once the rows are encoded); None
    where the source cannot tell."""
    rows = count_records(recipe.data.train)
    if rows is None or recipe.data.eval is not None or not recipe.data.eval_split:
        return rows
    return max(rows - held_out_count(rows, recipe.data.eval_split), 0)


def recipe_rows(recipe: Recipe) -> tuple[Rows, list[Row]]:
    """(training rows, held-out rows) of a recipe, read in `data.format`; errors about a source name its key."""
    data = recipe.data
    with recipe.blame("data.train"):
        train = load_rows(data.train, data.format, data.columns)
    if data.eval is not None:
        with recipe.blame("data.eval"):
            return train, load_rows(data.eval, data.format, data.columns)
    if not data.eval_split:
        return train, []
    kept, held = held_out(train, data.eval_split, recipe.train.seed)
    return Rows(kept, train.format, train.why), held
