"""manifest.json of an export: every file with size, SHA-256, type and bits per weight, and what it was made from.

The manifest makes `ft quantize` resumable: a file whose entry matches (same inputs, same SHA-256 on disk) is
skipped on a rerun; anything else is made again, and a file whose bytes no longer match its entry is reported as
damaged. It is rewritten atomically after each finished file, so a kill loses at most the file in progress.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> m = Manifest(d / "manifest.json")
    >>> _ = (d / "a.txt").write_text("hello")
    >>> m.record(d / "a.txt", kind="text", inputs="v1")
    >>> m.state(d / "a.txt", inputs="v1"), m.state(d / "a.txt", inputs="v2"), m.state(d / "b.txt", inputs="v1")
    ('current', 'outdated', 'new')
    >>> _ = (d / "a.txt").write_text("hell")
    >>> m.state(d / "a.txt", inputs="v1")
    'damaged'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from ft.atomic import write_text

CHUNK = 1 << 24


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of the settings and input hashes a file was made from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gguf_bits_per_weight(path: Path) -> float:
    """Bits per weight over all tensors of a GGUF file (what llama.cpp's own listings report)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    return 8.0 * sum(int(t.n_bytes) for t in reader.tensors) / max(elements, 1)


class Manifest:
    """The export folder's record of finished files, keyed by file name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.files = {f["file"]: f for f in json.loads(path.read_text())["files"]}

    def state(self, path: Path, inputs: str) -> Literal["current", "new", "outdated", "damaged"]:
        """`current` when the file on disk is the one recorded for these inputs; `damaged` when it was, but its
        bytes changed since (truncated, overwritten); `new` when there is no such file, `outdated` when its inputs
        changed."""
        entry = self.files.get(path.name)
        if entry is None or not path.is_file():
            return "new"
        if entry["inputs"] != inputs:
            return "outdated"
        return "current" if sha256(path) == entry["sha256"] else "damaged"

    def record(self, path: Path, kind: str, inputs: str, **extra: Any) -> None:
        entry = {"file": path.name, "kind": kind, "size": path.stat().st_size, "sha256": sha256(path),
                 "inputs": inputs, **extra}
        if path.suffix == ".gguf":
            entry["bits_per_weight"] = round(gguf_bits_per_weight(path), 4)
        self.files[path.name] = entry
        self.save()

    def save(self) -> None:
        files = sorted(self.files.values(), key=lambda f: f["file"])
        write_text(self.path, json.dumps({"files": files}, indent=2) + "\n")

    def entry(self, name: str) -> dict[str, Any]:
        return self.files[name]
