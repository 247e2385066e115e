"""The data checks' encoding, kept on disk so that a second `ft train` (or `ft validate`, `ft data`) on the same rows
with the same processor and settings tokenizes nothing again.

What is kept, for a list of rows: what `data.too_long` did to each row (kept, cut or dropped), its token counts, and
the token ids and labels of every kept row as training reads them (cut where it was cut). Rows without media are then
trained from these ids (`ft.encode.encoded_dataset`); rows with media are still encoded when read, since their pixels
and audio frames are never kept.

The key is a SHA-256 of everything the encoding depends on: each row's conversation, the size and modification time of
its media files, the tokenizer (its whole definition), the chat template, data.image_soft_tokens,
data.max_seq_length, data.too_long and `VERSION` (bumped when ft's encoding changes). Entries live in `ft-encoded/` of
the datasets cache, one `.npz` file each, written atomically; no library keeps such a result (`datasets`' own map
cache keys on a function's pickled code, which a processor's state makes unstable).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import ProcessorMixin

from ft.atomic import staged_file
from ft.data import Row
from ft.recipe import DataSection

VERSION = 2
FATES = ("kept", "cut", "dropped")
COUNTS = ("text", "image", "audio", "trained")


def cache_folder() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "ft-encoded"


def _media_stamp(row: Row) -> list[tuple[str, int, int]]:
    stamps = []
    for kind in ("image", "audio"):
        for path in row.media(kind):
            stat = path.stat()
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return stamps


def encoding_key(rows: list[Row], processor: ProcessorMixin, data: DataSection) -> str:
    digest = hashlib.sha256()
    tokenizer = processor.tokenizer
    settings = [VERSION, data.max_seq_length, data.too_long, data.image_soft_tokens, processor.chat_template]
    digest.update(json.dumps(settings).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for row in rows:
        digest.update(json.dumps([row.messages, _media_stamp(row)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class Encoded:
    """One row's entry: its fate, token counts, and (unless dropped) token ids and labels."""

    fate: str
    counts: dict[str, int]
    input_ids: np.ndarray | None = None
    labels: np.ndarray | None = None


def save(key: str, entries: list[Encoded]) -> None:
    kept = [e for e in entries if e.input_ids is not None]
    lengths = np.array([len(e.input_ids) for e in kept], dtype=np.int64)
    arrays = {
        "fate": np.array([FATES.index(e.fate) for e in entries], dtype=np.int8),
        "counts": np.array([[e.counts.get(c, 0) for c in COUNTS] for e in entries], dtype=np.int64).reshape(-1, 4),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "input_ids": np.concatenate([e.input_ids for e in kept]) if kept else np.zeros(0, np.int32),
        "labels": np.concatenate([e.labels for e in kept]) if kept else np.zeros(0, np.int32),
    }
    with staged_file(cache_folder() / f"{key}.npz") as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)


def load(key: str) -> list[Encoded] | None:
    path = cache_folder() / f"{key}.npz"
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError, KeyError):  # not there, or unreadable: encode again
        return None
    entries, k = [], 0
    offsets = arrays["offsets"]
    for fate, counts in zip(arrays["fate"].tolist(), arrays["counts"].tolist(), strict=True):
        entry = Encoded(FATES[fate], dict(zip(COUNTS, counts, strict=True)))
        if entry.fate != "dropped":
            start, stop = offsets[k], offsets[k + 1]
            entry.input_ids, entry.labels = arrays["input_ids"][start:stop], arrays["labels"][start:stop]
            k += 1
        entries.append(entry)
    return entries
