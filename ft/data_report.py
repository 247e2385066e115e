"""`ft data`: a recipe's data as ft will train on it, before any GPU time: the format found, row and token counts,
a length histogram (in the terminal and as a PNG), what `data.too_long` drops or cuts, and three rows rendered as the
model sees them, each image or audio span shown as `<image: N tokens>`. It needs the model's processor, no weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.text import Text
from transformers import ProcessorMixin

from ft.data import Row
from ft.data_checks import check_rows
from ft.data_split import recipe_rows
from ft.encode import encode_row, truncate
from ft.plots import length_histogram
from ft.recipe import Recipe

console = Console(stderr=True)
SHOWN_ROWS = 3
BAR_WIDTH = 40
BINS = 12


def seen_by_model(row: Row, processor: ProcessorMixin, max_length: int) -> str:
    """The row's tokens decoded, special tokens included, after too_long's cut; media spans collapsed."""
    features = encode_row(row, processor)
    features = truncate(features, max_length, processor) or features
    ids = features["input_ids"].tolist()
    media = {processor.image_token_id: "image", processor.audio_token_id: "audio"}
    pieces, run = [], 0
    for i, token in enumerate(ids):
        if token in media:
            run += 1
            if i + 1 == len(ids) or ids[i + 1] != token:
                pieces.append(f"<{media[token]}: {run} tokens>")
                run = 0
        else:
            pieces.append(processor.tokenizer.decode([token]))
    return "".join(pieces)


def histogram_lines(lengths: list[int]) -> list[str]:
    counts, edges = np.histogram(lengths, bins=min(BINS, max(1, len(set(lengths)))))
    top = max(int(counts.max()), 1)
    return [f"{int(lo):>7}-{int(hi):<7} {'#' * round(BAR_WIDTH * c / top):<{BAR_WIDTH}} {c}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def describe_data(recipe: Recipe, processor: ProcessorMixin, png: Path) -> None:
    """Print the summary of the recipe's training and held-out rows and write the training lengths' PNG."""
    data = recipe.data
    train, held = recipe_rows(recipe)
    console.print(Text(f"data.train: {train.format} ({train.why})"), highlight=False, soft_wrap=True)
    train_rows, lengths = check_rows(train, processor, data, "data.train")
    held_rows, _ = check_rows(held, processor, data, "data.eval") if held else ([], [])
    for label, rows in (("data.train", train_rows), ("held-out", held_rows)):
        if not rows:
            continue
        totals = {key: sum(r.tokens[key] for r in rows) for key in ("text", "image", "audio", "trained")}
        console.print(f"{label}: {len(rows)} rows, {sum(totals.values()) - totals['trained']} tokens (text "
                      f"{totals['text']}, image {totals['image']}, audio {totals['audio']}); {totals['trained']} "
                      "trained", highlight=False, soft_wrap=True)
    console.print(f"lengths of data.train (tokens): min {min(lengths)}, median {int(np.median(lengths))}, "
                  f"max {max(lengths)}; data.max_seq_length {data.max_seq_length}", highlight=False,
                  soft_wrap=True)
    for line in histogram_lines(lengths):
        console.print(line, highlight=False)
    length_histogram(lengths, data.max_seq_length, png, f"{recipe.model.name}: data.train")
    console.print(Text(f"histogram: {png}"), highlight=False, soft_wrap=True)
    for row in train_rows[:SHOWN_ROWS]:
        console.print(Text(f"--- {row.where}"), highlight=False, soft_wrap=True)
        console.print(Text(seen_by_model(row, processor, data.max_seq_length)), highlight=False, soft_wrap=True)
