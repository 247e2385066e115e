"""Load chat rows from any data source (`ft.data_sources`) in any known format (`ft.data_formats`), and check their
shape and media files.

In ft's own form, a row is `{"messages": [{"role": ..., "content": [parts]}]}`; a part is `{"type": "text", "text": ...}`,
`{"type": "image", "path": ...}` or `{"type": "audio", "path": ...}`, paths relative to the data file's folder.
Content may also be a plain string. Every problem in every row is collected before anything trains; the checks
that need the model's processor (image sizes, token length) and the loading of a recipe's data are in
`ft.data_checks`.

    >>> rows = load_rows(Path("data/demo/train.jsonl"))
    >>> rows[0].where
    'data/demo/train.jsonl:1'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from ft.data_formats import detect_format, to_messages
from ft.data_sources import Record, read_records
from ft.errors import DataError
from ft.recipe import ColumnsSection, DataSource

ROLES = ("system", "developer", "user", "assistant")
PART_TYPES = ("text", "image", "audio")
SAMPLE_RATE = 16_000
MAX_LISTED_PROBLEMS = 50


@dataclass
class Row:
    """One conversation with where it came from, and its media resolved to absolute paths."""

    messages: list[dict[str, Any]]
    where: str
    base: Path
    problems: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # once checked: text, image, audio and trained tokens
    encoding: tuple[np.ndarray, np.ndarray] | None = None  # once checked, a row without media: token ids and labels

    def media(self, kind: str) -> list[Path]:
        return [path for _, path in self.media_parts(kind)]

    def media_parts(self, kind: str) -> list[tuple[str, Path]]:
        """(field path such as `messages[0].content[1].path`, file) of every `kind` part, in order."""
        return [
            (f"messages[{i}].content[{j}].path", self.base / part["path"])
            for i, message in enumerate(self.messages)
            if isinstance(message.get("content"), list)
            for j, part in enumerate(message["content"])
            if isinstance(part, dict) and part.get("type") == kind and isinstance(part.get("path"), str)
        ]


class Rows(list[Row]):
    """The rows of one data source, with the format they were read as and why (`ft.data_formats`)."""

    def __init__(self, rows: list[Row], fmt: str, why: str) -> None:
        super().__init__(rows)
        self.format, self.why = fmt, why


def _first_format(records: list[Record], columns: ColumnsSection) -> tuple[str, str]:
    """The format of the first record that fits one (bad rows before it are reported as rows); the first record's
    error when none fits."""
    first_error = None
    for record in records:
        if record.values is None:
            continue
        try:
            return detect_format(record.values, columns, record.where)
        except DataError as exc:
            first_error = first_error or exc
    raise first_error or DataError(f"{records[0].where}: no readable row")


def load_rows(source: DataSource, fmt: str = "auto", columns: ColumnsSection | None = None) -> Rows:
    """Read every row of a data source in ft's form; problems with a row are attached to it, not raised."""
    columns = columns or ColumnsSection()
    records, base = read_records(source)
    if not records:
        raise DataError(f"{source}: no rows")
    why = f"data.format is {fmt}"
    if fmt == "auto":
        fmt, why = _first_format(records, columns)
    rows = []
    for record in records:
        row = Row([], record.where, base, list(record.problems))
        if record.values is not None:
            try:
                row.messages = to_messages(record.values, fmt, columns)
            except ValueError as exc:
                row.problems.append(str(exc))
        if not row.problems:
            row.problems.extend(check_messages(row))
        rows.append(row)
    return Rows(rows, fmt, why)


def _check_part(part: Any, where: str, base: Path) -> list[str]:
    if not isinstance(part, dict):
        return [f"{where}: a content part must be an object with a 'type'"]
    kind = part.get("type")
    if kind not in PART_TYPES:
        return [f"{where}.type: unknown part type {kind!r} (expected one of {', '.join(PART_TYPES)})"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            return [f"{where}.text: a text part needs a 'text' string"]
        return []
    if not isinstance(part.get("path"), str) or not part["path"]:
        return [f"{where}.path: an {kind} part needs a 'path' (relative to the data file)"]
    media = base / part["path"]
    if not media.is_file():
        return [f"{where}.path: {kind} file not found: {media}"]
    return [f"{where}.path: {p}" for p in (_check_image(media) if kind == "image" else _check_audio(media))]


def _check_image(path: Path) -> list[str]:
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.DecompressionBombError as exc:  # far beyond any image size that ft warns about (ft.data_checks)
        return [f"image {path.name} is too large to open ({exc})"]
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return [f"unreadable image {path.name} ({exc})"]
    return []


def _check_audio(path: Path) -> list[str]:
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        return [f"unreadable audio {path.name} ({exc})"]
    if info.frames == 0:
        return [f"audio {path.name} is empty"]
    return []


def check_messages(row: Row) -> list[str]:
    """Shape checks of one conversation: roles, content parts, media files, an assistant turn to learn from."""
    messages = row.messages
    if not isinstance(messages, list):
        return ["'messages' must be a list of {role, content} objects"]
    if not messages:
        return ["empty conversation (no messages)"]
    problems = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{where}: a message must be an object with 'role' and 'content'")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role in ("system", "developer") and i != 0:
            problems.append(f"{where}.role: a {role} message may only come first")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            problems.append(f"{where}.content: must be a non-empty string or list of parts")
            continue
        for j, part in enumerate(content):
            problems.extend(_check_part(part, f"{where}.content[{j}]", row.base))
            if role == "assistant" and isinstance(part, dict) and part.get("type") in ("image", "audio"):
                problems.append(f"{where}.content[{j}]: assistant turns can only hold text")
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append("no assistant message: nothing to learn from")
    elif roles[-1] != "assistant":
        problems.append("the conversation must end with an assistant message")
    return problems


def load_audio(path: Path) -> np.ndarray:
    """Mono float32 waveform at 16 kHz (stereo is averaged, other rates are resampled)."""
    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        divisor = np.gcd(rate, SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)
    return wave


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def raise_if_problems(rows: list[Row], extra: list[str] | None = None) -> None:
    """Raise one DataError listing every problem of every row (up to MAX_LISTED_PROBLEMS lines)."""
    lines = [f"{row.where}: {p}" for row in rows for p in row.problems] + (extra or [])
    if not lines:
        return
    shown = lines[:MAX_LISTED_PROBLEMS]
    more = f"\n  ... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    bad = sum(1 for row in rows if row.problems)
    raise DataError(f"{bad} of {len(rows)} rows are invalid:\n  " + "\n  ".join(shown) + more)
