"""Check a recipe's data before any training: every row's shape, media files and token length.

All problems of all rows are collected and raised as one error, so a user fixes a dataset in one pass.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import track
from transformers import ProcessorMixin

from ft.data import Row, raise_if_problems
from ft.encode import length_of

console = Console(stderr=True)


def check_rows(rows: list[Row], processor: ProcessorMixin, max_seq_length: int, label: str) -> list[int]:
    """Encode every valid row to measure it; raise a DataError listing all bad rows. Returns token lengths."""
    lengths = []
    for row in track(rows, description=f"check {label} data", console=console, transient=True):
        if row.problems:
            lengths.append(0)
            continue
        try:
            n = length_of(row, processor)
        except (ValueError, OSError) as exc:
            row.problems.append(f"cannot be encoded: {exc}")
            lengths.append(0)
            continue
        if n > max_seq_length:
            row.problems.append(f"{n} tokens, longer than data.max_seq_length ({max_seq_length})")
        lengths.append(n)
    raise_if_problems(rows)
    return lengths
