"""Load chat rows from JSONL, parquet or a saved `datasets` folder, and check their shape and media files.

A row is `{"messages": [{"role": ..., "content": [parts]}]}`; a part is `{"type": "text", "text": ...}`,
`{"type": "image", "path": ...}` or `{"type": "audio", "path": ...}`, paths relative to the data file's folder.
Content may also be a plain string. Every problem in every row is collected before anything trains; the checks
that need the model's processor (image sizes, token length) and the loading of a recipe's data are in
`ft.data_checks`.

    >>> rows = load_rows(Path("data/demo/train.jsonl"))
    >>> rows[0].where
    'data/demo/train.jsonl:1'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from ft.errors import DataError

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


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(Row([], where, path.parent, [f"not UTF-8 text (byte {exc.start} of the line)"]))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # Some of json's messages end in "at" themselves ("Invalid control character at").
                problem = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
                rows.append(Row([], where, path.parent, [f"not valid JSON ({problem})"]))
                continue
            if not isinstance(record, dict):
                rows.append(Row([], where, path.parent, ["a row must be a JSON object with a 'messages' key"]))
                continue
            rows.append(Row(record.get("messages"), where, path.parent))  # type: ignore[arg-type]
    return rows


def _strip_nulls(value: Any) -> Any:
    """Parquet/arrow store parts as structs with every field present; drop the empty ones."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _read_table(path: Path) -> list[Row]:
    import datasets

    try:
        table = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # datasets raises many types for unreadable input; all mean the same to a user
        raise DataError(f"{path}: cannot read as a {'datasets folder' if path.is_dir() else 'parquet file'}: {exc}")
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"{path}: holds several splits ({', '.join(table)}); point data.train at one of them")
    if "messages" not in table.column_names:
        raise DataError(f"{path}: no 'messages' column (columns: {', '.join(table.column_names)})")
    base = path if path.is_dir() else path.parent
    return [Row(_strip_nulls(r["messages"]), f"{path}:row {i}", base) for i, r in enumerate(table)]


def count_rows(path: Path) -> int | None:
    r"""How many rows a data file holds, read cheaply (the lines of a JSONL file, a parquet file's or a datasets
    folder's metadata), for a decision made before the rows load (`ft.resolve`); None where it cannot tell.

    >>> import tempfile
    >>> data = Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = data.write_text('{"messages": []}\n\n{"messages": []}\n')
    >>> count_rows(data), count_rows(data.with_name("missing.jsonl"))
    (2, None)
    """
    try:
        if path.is_dir():
            import datasets

            table = datasets.load_from_disk(str(path))
            return table.num_rows if isinstance(table, datasets.Dataset) else None
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        if path.suffix in (".jsonl", ".json"):
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())
    except Exception:  # unreadable data is reported when the rows load (`load_rows`), naming the file and line
        return None
    return None


def load_rows(path: Path) -> list[Row]:
    """Read every row of a data file; format problems are attached to rows, not raised."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        rows = _read_table(path)
    elif path.suffix == ".parquet":
        rows = _read_table(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    else:
        raise DataError(f"{path}: unsupported data format '{path.suffix}' (use .jsonl, .parquet or a datasets folder)")
    if not rows:
        raise DataError(f"{path}: no rows")
    for row in rows:
        if not row.problems:
            row.problems.extend(check_messages(row))
    return rows


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
