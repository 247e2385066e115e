"""A recipe's data, loaded and checked before any training: `load_data` is what `ft validate` and `ft train` call.

`ft.data` reads the rows and checks their shape and media files; here every row that passed is encoded with the
model's processor to check what only the processor knows: image sizes and token length. All problems of all rows are
collected and raised as one error, so a user fixes a dataset in one pass. Rows over data.max_seq_length are dropped,
cut (`ft.encode.truncate`) or reported as errors, as data.too_long says, and named; past data.max_dropped the run
stops. The encoding is kept between runs (`ft.encode_cache`). Nothing here imports trl, so `ft validate` stays a
data check, not a trainer start.

Image sizes follow the image processor (transformers' Gemma4UnifiedImageProcessor), which resizes every image, up or
down with its aspect ratio kept, to fit `data.image_soft_tokens` soft tokens of pooling x pooling patches of
patch x patch px (3 x 3 patches of 16 px for Gemma 4). An image with a side shorter than one patch is a row error:
it would be blown up from less than a patch of pixels (and transformers misreads a 1- or 3-px side as the colour
axis). An image of more than `LARGE_IMAGE_FACTOR` times the most pixels the processor ever keeps (1120 soft tokens:
2.58 MP, so 41.3 MP) is accepted and resized like any other, with a warning naming its row: it is decoded and shrunk
again every time the row is encoded, at every epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.text import Text
from transformers import ProcessorMixin

from ft import encode_cache
from ft.data import MAX_LISTED_PROBLEMS, Row, raise_if_problems
from ft.data_split import recipe_rows
from ft.encode import IGNORE_INDEX, encode_row, encode_rows, truncate
from ft.encode_cache import Encoded
from ft.errors import DataError
from ft.recipe import IMAGE_SOFT_TOKENS, DataSection, Recipe

console = Console(stderr=True)
LARGE_IMAGE_FACTOR = 16
PLACES_SHOWN = 5  # rows named when too_long drops or cuts some
CHUNK = 512  # rows encoded together


def load_data(recipe: Recipe, processor: ProcessorMixin) -> tuple[list[Row], list[Row], list[int]]:
    """Train and eval rows, every one checked and too-long ones dropped or cut as data.too_long says, and the train
    rows' token lengths; errors about the sources themselves name the recipe key."""
    train, held = recipe_rows(recipe)
    if train.format != "messages":  # ft's own form needs no word; another one says how auto found it
        console.print(Text(f"data.train: {len(train)} rows read as {train.format} ({train.why})"), highlight=False,
                      soft_wrap=True)
    train, lengths = check_rows(train, processor, recipe.data, "data.train")
    held, _ = check_rows(held, processor, recipe.data, "data.eval") if held else ([], [])
    return train, held, lengths


def image_limits(processor: ProcessorMixin) -> tuple[int, int]:
    """(shortest side, most pixels without a warning) of an image, from the image processor's patch geometry."""
    images = processor.image_processor
    most_kept = max(IMAGE_SOFT_TOKENS) * images.pooling_kernel_size**2 * images.patch_size**2
    return images.patch_size, LARGE_IMAGE_FACTOR * most_kept


def check_image_sizes(row: Row, min_side: int, max_pixels: int) -> list[str]:
    """Add a problem to `row` for every image with a side under `min_side`; return a warning for every image over
    `max_pixels`."""
    warnings = []
    for field, path in row.media_parts("image"):
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
        if min(width, height) < min_side:
            row.problems.append(f"{field}: image {path.name} is {width}x{height} px, smaller than the image "
                                f"processor's {min_side}x{min_side} px patch")
        elif width * height > max_pixels:
            warnings.append(f"{row.where}: {field}: image {path.name} is {width}x{height} px "
                            f"({width * height / 1e6:.1f} MP, over {max_pixels / 1e6:.1f} MP); the image processor "
                            "shrinks it again every time the row is encoded, which is slow: shrink it beforehand")
    return warnings


def _places(rows: list[Row]) -> str:
    shown = ", ".join(row.where for row in rows[:PLACES_SHOWN])
    return shown + (f" and {len(rows) - PLACES_SHOWN} more" if len(rows) > PLACES_SHOWN else "")


def check_rows(rows: list[Row], processor: ProcessorMixin, data: DataSection, label: str) -> tuple[list[Row], list[int]]:
    """Encode every valid row to measure it (or read the encoding that an earlier run kept, `ft.encode_cache`); raise
    a DataError listing all bad rows. Returns the rows kept (too-long ones dropped or cut, as data.too_long says) and
    their token lengths; each kept row carries its token counts, and a row without media its token ids and labels."""
    min_side, max_pixels = image_limits(processor)
    warnings = [w for row in rows if not row.problems for w in check_image_sizes(row, min_side, max_pixels)]
    if len(warnings) > MAX_LISTED_PROBLEMS:
        warnings[MAX_LISTED_PROBLEMS:] = [f"... and {len(warnings) - MAX_LISTED_PROBLEMS} more large images"]
    for warning in warnings:  # paths are user input: never parsed as Rich markup
        console.print(Text.assemble(("warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
    key = None if any(row.problems for row in rows) else encode_cache.encoding_key(rows, processor, data)
    entries = encode_cache.load(key) if key else None
    if entries is None:
        entries = _encode_all(rows, processor, data, label)
        raise_if_problems(rows)
        if key:
            encode_cache.save(key, entries)
    kept, lengths, dropped, cut = [], [], [], []
    for row, entry in zip(rows, entries, strict=True):
        if entry.fate == "dropped":
            dropped.append(row)
            continue
        if entry.fate == "cut":
            cut.append(row)
        row.tokens = entry.counts
        if not row.media("image") and not row.media("audio"):
            row.encoding = (entry.input_ids, entry.labels)
        kept.append(row)
        lengths.append(len(entry.input_ids))
    report_too_long(label, len(rows), dropped, cut, data)
    if rows and not kept:  # data.max_dropped of 1 lets every row go; nothing is left to train or evaluate on
        raise DataError(f"{label}: all {len(rows)} rows were dropped (data.too_long: {data.too_long})")
    return kept, lengths


def _encode_all(rows: list[Row], processor: ProcessorMixin, data: DataSection, label: str) -> list[Encoded]:
    """Each row's fate under data.too_long, token counts, ids and labels; problems are added to the rows."""
    limit = data.max_seq_length
    entries = []
    # Off a terminal, a transient bar would leave only an empty line before ft's message.
    for start in track(range(0, len(rows), CHUNK), description=f"encode {label}", console=console, transient=True,
                       disable=not console.is_terminal):
        chunk = rows[start : start + CHUNK]
        usable = [row for row in chunk if not row.problems]
        encoded = dict(zip(map(id, usable), _encoded(usable, processor), strict=True))
        for row in chunk:
            features = encoded.get(id(row))
            if features is None:
                entries.append(Encoded("dropped", {}))  # a row with problems: the run stops before using it
                continue
            n = int(features["input_ids"].numel())
            fate = "kept"
            if n > limit and data.too_long == "error":
                row.problems.append(f"{n} tokens, longer than data.max_seq_length ({limit})")
            elif n > limit:
                fate = "cut"
                features = truncate(features, limit, processor) if data.too_long == "truncate" else None
            if features is None:
                entries.append(Encoded("dropped", {}))
                continue
            entries.append(Encoded(fate, token_counts(features, processor), features["input_ids"].numpy().astype(
                np.int32), features["labels"].numpy().astype(np.int32)))
    return entries


def _encoded(rows: list[Row], processor: ProcessorMixin) -> list[dict[str, Any] | None]:
    """The rows encoded together; where that fails, one by one, so that the rows that cannot be are named (None)."""
    try:
        return encode_rows(rows, processor)
    except (ValueError, OSError):
        pass
    encoded: list[dict[str, Any] | None] = []
    for row in rows:
        try:
            encoded.append(encode_row(row, processor))
        except (ValueError, OSError) as exc:
            row.problems.append(f"cannot be encoded: {exc}")
            encoded.append(None)
    return encoded


def token_counts(features: dict[str, Any], processor: ProcessorMixin) -> dict[str, int]:
    """Tokens of an encoded row: text (turn markers included), image and audio soft tokens, and trained ones."""
    ids = features["input_ids"]
    image, audio = (int((ids == token).sum()) for token in (processor.image_token_id, processor.audio_token_id))
    trained = int((features["labels"] != IGNORE_INDEX).sum())
    return {"text": int(ids.numel()) - image - audio, "image": image, "audio": audio, "trained": trained}


def report_too_long(label: str, total: int, dropped: list[Row], cut: list[Row], data: DataSection) -> None:
    """Say what data.too_long did; stop when it dropped more than data.max_dropped of the rows."""
    over = f"longer than data.max_seq_length ({data.max_seq_length})"
    if cut:
        console.print(Text(f"{label}: {len(cut)} of {total} rows {over} truncated: {_places(cut)}"),
                      highlight=False, soft_wrap=True)
    if not dropped:
        return
    why = "left with no trained token once truncated" if data.too_long == "truncate" else over
    message = f"{len(dropped)} of {total} rows ({len(dropped) / total:.1%}) {why}"
    if len(dropped) > data.max_dropped * total:
        raise DataError(f"{label}: {message} would be dropped, more than data.max_dropped "
                        f"({data.max_dropped:.1%}): {_places(dropped)}. Raise data.max_seq_length, or set "
                        "data.too_long=truncate (or data.max_dropped)")
    console.print(Text(f"{label}: {message} dropped: {_places(dropped)}"), highlight=False, soft_wrap=True)
