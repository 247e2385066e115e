"""A recipe's data, loaded and checked before any training: `load_data` is what `ft validate` and `ft train` call.

`ft.data` reads the rows and checks their shape and media files; here every row that passed is encoded with the
model's processor to check what only the processor knows: image sizes and token length. All problems of all rows are
collected and raised as one error, so a user fixes a dataset in one pass. Nothing here imports trl, so
`ft validate` stays a data check, not a trainer start.

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

from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.text import Text
from transformers import ProcessorMixin

from ft.data import MAX_LISTED_PROBLEMS, Row, raise_if_problems
from ft.data_split import recipe_rows
from ft.encode import IGNORE_INDEX, encode_row, truncate
from ft.errors import DataError
from ft.recipe import IMAGE_SOFT_TOKENS, DataSection, Recipe

console = Console(stderr=True)
LARGE_IMAGE_FACTOR = 16
PLACES_SHOWN = 5  # rows named when too_long drops or cuts some


def load_data(recipe: Recipe, processor: ProcessorMixin) -> tuple[list[Row], list[Row], list[int]]:
    """Train and eval rows, every one checked and too-long ones dropped or cut as data.too_long says, and the train
    rows' token lengths; errors about the sources themselves name the recipe key."""
    train, held = recipe_rows(recipe)
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
    """Encode every valid row to measure it; raise a DataError listing all bad rows. Returns the rows kept (too-long
    ones dropped, or kept to be cut when encoded, as data.too_long says) and their token lengths."""
    min_side, max_pixels = image_limits(processor)
    limit = data.max_seq_length
    kept, lengths, warnings, dropped, cut = [], [], [], [], []
    # Off a terminal, a transient bar would leave only an empty line before ft's message.
    for row in track(rows, description=f"check {label}", console=console, transient=True,
                     disable=not console.is_terminal):
        if not row.problems:
            warnings += check_image_sizes(row, min_side, max_pixels)
        if row.problems:
            continue
        try:
            features = encode_row(row, processor)
        except (ValueError, OSError) as exc:
            row.problems.append(f"cannot be encoded: {exc}")
            continue
        n = int(features["input_ids"].numel())
        if n > limit and data.too_long == "error":
            row.problems.append(f"{n} tokens, longer than data.max_seq_length ({limit})")
            continue
        if n > limit:
            features = truncate(features, limit, processor) if data.too_long == "truncate" else None
            if features is None:
                dropped.append(row)
                continue
            cut.append(row)
        row.tokens = token_counts(features, processor)
        kept.append(row)
        lengths.append(int(features["input_ids"].numel()))
    if len(warnings) > MAX_LISTED_PROBLEMS:
        warnings[MAX_LISTED_PROBLEMS:] = [f"... and {len(warnings) - MAX_LISTED_PROBLEMS} more large images"]
    for warning in warnings:  # paths are user input: never parsed as Rich markup
        console.print(Text.assemble(("warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
    raise_if_problems(rows)
    report_too_long(label, len(rows), dropped, cut, data)
    return kept, lengths


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
