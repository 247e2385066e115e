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

from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.text import Text
from transformers import ProcessorMixin

from ft.data import MAX_LISTED_PROBLEMS, Row, load_rows, raise_if_problems
from ft.encode import length_of
from ft.recipe import IMAGE_SOFT_TOKENS, Recipe

console = Console(stderr=True)
LARGE_IMAGE_FACTOR = 16


def load_data(recipe: Recipe, processor: ProcessorMixin) -> tuple[list[Row], list[Row], list[int]]:
    """Train and eval rows, every one checked, and the train rows' token lengths; errors about the files
    themselves name the recipe key."""
    loaded, lengths = [], []
    for key in ("data.train", "data.eval"):
        path = getattr(recipe.data, key.split(".")[1])
        if path is None:
            loaded.append([])
            continue
        with recipe.blame(key):
            rows = load_rows(path)
        measured = check_rows(rows, processor, recipe.data.max_seq_length, key.split(".")[1])
        lengths = lengths or measured
        loaded.append(rows)
    return loaded[0], loaded[1], lengths


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


def check_rows(rows: list[Row], processor: ProcessorMixin, max_seq_length: int, label: str) -> list[int]:
    """Encode every valid row to measure it; raise a DataError listing all bad rows. Returns token lengths."""
    min_side, max_pixels = image_limits(processor)
    lengths, warnings = [], []
    # Off a terminal, a transient bar would leave only an empty line before ft's message.
    for row in track(rows, description=f"check {label} data", console=console, transient=True,
                     disable=not console.is_terminal):
        if not row.problems:
            warnings += check_image_sizes(row, min_side, max_pixels)
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
    if len(warnings) > MAX_LISTED_PROBLEMS:
        warnings[MAX_LISTED_PROBLEMS:] = [f"... and {len(warnings) - MAX_LISTED_PROBLEMS} more large images"]
    for warning in warnings:  # paths are user input: never parsed as Rich markup
        console.print(Text.assemble(("warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
    raise_if_problems(rows)
    return lengths
