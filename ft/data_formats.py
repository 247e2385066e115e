"""Turn a record of a common chat dataset format into ft's own `messages` form (`ft.data`).

Formats (`data.format`), with the key names `data.columns` can change:
- `messages`: ft's own form, `{"messages": [{"role", "content": str | [parts]}]}`.
- `sharegpt`: `{"conversations": [{"from": "human", "value": "..."}, ...]}`, or OpenAI-style `messages` of
  `{role, content}` strings next to an `images` / `audios` column; role names such as human, gpt, model or bot map to
  user and assistant.
- `alpaca`: `{"instruction", "input", "output", "system"}`; the input, when there is one, follows the instruction
  after a blank line.
In sharegpt and alpaca rows, media come from the `images` and `audios` columns (a path, raw bytes, or a datasets
Image / Audio value, alone or in a list) and take the place of the `<image>` / `<audio>` markers in the text, in
order; a row without markers gets its media before its first user text. Media given as bytes are written once,
named by their SHA-256, into `ft-media/` of the datasets cache, so that every later stage reads files as for ft's own
rows.

`auto` decides from the first row and says why (`detect_format`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from ft.atomic import write_bytes
from ft.errors import DataError
from ft.recipe import ColumnsSection

FORMATS = ("messages", "sharegpt", "alpaca")
# Role names of sharegpt-style files (LLaMA-Factory's, axolotl's, OpenAI's) -> ft's roles; data.columns.roles adds to it.
ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
MARKERS = {"<image>": "image", "<audio>": "audio"}
MARKER = re.compile("|".join(map(re.escape, MARKERS)))


def _conversation_key(values: dict[str, Any], columns: ColumnsSection) -> str | None:
    keys = [columns.messages] if columns.messages else ["messages", "conversations"]
    return next((k for k in keys if isinstance(values.get(k), list)), None)


def _turn_keys(turn: dict[str, Any], columns: ColumnsSection) -> tuple[str, str]:
    role = columns.role or ("role" if "role" in turn else "from")
    content = columns.content or ("content" if "content" in turn else "value")
    return role, content


def _has_media_column(values: dict[str, Any], columns: ColumnsSection) -> bool:
    return any(values.get(c) not in (None, [], "") for c in (columns.images, columns.audios))


def detect_format(values: dict[str, Any] | None, columns: ColumnsSection, where: str) -> tuple[str, str]:
    """(format, why) for a dataset whose first record is `values`; a DataError naming the keys when none fits."""
    seen = ", ".join(sorted(values or {})) or "none"
    key = _conversation_key(values or {}, columns)
    if values is not None and key is not None:
        turns = values[key]
        first = turns[0] if turns and isinstance(turns[0], dict) else {}
        role, content = _turn_keys(first, columns)
        if (role, content) == ("role", "content") and not _has_media_column(values, columns):
            return "messages", f"its '{key}' column is a list of {{role, content}} turns"
        if role in first and content in first:
            media = " with media columns" if _has_media_column(values, columns) else ""
            return "sharegpt", f"its '{key}' column is a list of {{{role}, {content}}} turns{media}"
    if values is not None and columns.instruction in values and columns.output in values:
        return "alpaca", f"it has '{columns.instruction}' and '{columns.output}' columns"
    raise DataError(f"{where}: fits no known format (keys: {seen}); ft reads messages ('messages': a list of "
                    "{role, content}), sharegpt ('conversations': a list of {from, value}) and alpaca ('instruction', "
                    "'input', 'output'): set data.format, and data.columns for other key names")


def _media_cache() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "ft-media"


def _media_path(value: Any, kind: str) -> str:
    """A path for one image or audio value: a path as given, or bytes written once into the media cache."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = (value, None) if isinstance(value, bytes) else (None, value)
    if data is None:
        if not isinstance(path, str) or not path:
            raise ValueError(f"an {kind} must be a path, bytes or a datasets {kind.title()} value, not "
                             f"{type(value).__name__}")
        return path
    file = _media_cache() / f"{hashlib.sha256(data).hexdigest()}{Path(path or '').suffix}"
    if not file.is_file():
        write_bytes(file, data)
    return str(file)


def _media(values: dict[str, Any], column: str, kind: str) -> list[str]:
    given = values.get(column)
    items = [] if given is None else given if isinstance(given, list) else [given]
    return [_media_path(item, kind) for item in items]


def _parts(text: str, media: dict[str, list[str]]) -> list[dict[str, str]]:
    """Text split at its media markers, each marker replaced by the next media file of its kind."""
    parts: list[dict[str, str]] = []
    position = 0
    for match in MARKER.finditer(text):
        if match.start() > position:
            parts.append({"type": "text", "text": text[position : match.start()]})
        kind = MARKERS[match.group()]
        parts.append({"type": kind, "path": media[kind].pop(0)})
        position = match.end()
    if position < len(text):
        parts.append({"type": "text", "text": text[position:]})
    return parts


def _with_media(turns: list[tuple[str, str]], values: dict[str, Any], columns: ColumnsSection) -> list[dict]:
    """Messages from (role, text) turns, with the row's media columns placed at their markers or up front."""
    media = {"image": _media(values, columns.images, "image"), "audio": _media(values, columns.audios, "audio")}
    for kind, files in media.items():
        markers = sum(text.count(f"<{kind}>") for _, text in turns)
        if markers and markers != len(files):
            raise ValueError(f"{markers} <{kind}> markers in the text but {len(files)} {kind}s in its column")
    if not any(MARKER.search(text) for _, text in turns):
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        upfront = [{"type": k, "path": p} for k in ("image", "audio") for p in media[k]]
        if upfront and first_user is not None:
            role, text = turns[first_user]
            messages = [{"role": r, "content": t} for r, t in turns]
            messages[first_user]["content"] = [*upfront, {"type": "text", "text": text}]
            return messages
    return [{"role": role, "content": _parts(text, media) if MARKER.search(text) else text} for role, text in turns]


def _sharegpt(values: dict[str, Any], columns: ColumnsSection) -> list[dict]:
    key = _conversation_key(values, columns)
    if key is None:
        raise ValueError(f"no conversation list ('{columns.messages or 'conversations'}')")
    roles = {**ROLE_NAMES, **columns.roles}
    turns = []
    system = values.get(columns.system)
    if isinstance(system, str) and system:
        turns.append(("system", system))
    for i, turn in enumerate(values[key]):
        if not isinstance(turn, dict):
            raise ValueError(f"{key}[{i}]: a turn must be an object")
        role_key, content_key = _turn_keys(turn, columns)
        name, text = turn.get(role_key), turn.get(content_key)
        if name not in roles:
            raise ValueError(f"{key}[{i}].{role_key}: unknown role {name!r} (known: {', '.join(roles)}; map others "
                             "with data.columns.roles)")
        if not isinstance(text, str):
            raise ValueError(f"{key}[{i}].{content_key}: a turn's content must be a string")
        turns.append((roles[name], text))
    return _with_media(turns, values, columns)


def _alpaca(values: dict[str, Any], columns: ColumnsSection) -> list[dict]:
    instruction, answer = values.get(columns.instruction), values.get(columns.output)
    extra, system = values.get(columns.input), values.get(columns.system)
    for name, value in ((columns.instruction, instruction), (columns.output, answer)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: needs a non-empty string")
    prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra else instruction
    turns = [("system", system)] if isinstance(system, str) and system else []
    return _with_media([*turns, ("user", prompt), ("assistant", answer)], values, columns)


def to_messages(values: dict[str, Any], fmt: str, columns: ColumnsSection) -> Any:
    """The record's conversation in ft's `messages` form; ValueError saying what is wrong with the record."""
    if fmt == "sharegpt":
        return _sharegpt(values, columns)
    if fmt == "alpaca":
        return _alpaca(values, columns)
    key = _conversation_key(values, columns) or columns.messages or "messages"
    return values.get(key)
