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
from ft.errors import DataError
from ft.recipe import Recipe


def held_out(rows: list[Row], size: float | int, seed: int) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) in their file order: `size` rows (a count, or a fraction of the rows, at
    least one) with the smallest seeded hash go to the held-out set."""
    count = size if isinstance(size, int) else max(1, round(size * len(rows)))
    if count >= len(rows):
        raise DataError(f"data.eval_split asks for {count} held-out rows, but data.train has only {len(rows)}")

    def key(index: int) -> tuple[str, int]:
        content = json.dumps(rows[index].messages, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(f"{seed}\0{content}".encode()).hexdigest(), index

    chosen = set(sorted(range(len(rows)), key=key)[:count])
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


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
