"""The folders ft writes (run directory, export folder, eval folder): ft's own marker, one writer at a time, and
nothing deleted that ft did not write.

A folder is ft's when it carries the marker `.ft-run` (`{"kind": ..., "version": 1}`), written atomically before
anything else. A non-empty folder without it is refused whatever `output.overwrite` says, and a fresh start removes
only what ft wrote (`clear`). One process writes a folder at a time: `lock` holds an exclusive advisory lock
(`flock`) on `.ft-lock` inside it, which records the holder's PID; the kernel releases the lock when the process
exits or is killed, so a lock file left behind by `kill -9` never blocks the next run or `--resume`.

    >>> import tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with claim(run, "run"):
    ...     sorted(p.name for p in run.iterdir())
    ['.ft-lock', '.ft-run']
    >>> contents(run), marked_kind(run)
    ([], 'run')
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ft.atomic import write_text
from ft.errors import FtError

MARKER = ".ft-run"
LOCK = ".ft-lock"
VERSION = 1
KINDS = {"run": "run directory", "export": "export folder", "eval": "evaluation folder",
         "compare": "comparison folder"}

_held: dict[Path, list[int]] = {}  # folder -> [lock file descriptor, nesting depth] of the locks this process holds


def _control(name: str) -> bool:
    """ft's marker (and its temporaries while it is written) and lock file: never part of a folder's contents."""
    return name == LOCK or name.startswith(MARKER)


def contents(folder: Path) -> list[str]:
    """Names in `folder` other than ft's marker and lock (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(name for name in os.listdir(folder) if not _control(name))


def marked_kind(folder: Path) -> str | None:
    """The kind recorded by ft's marker in `folder`; None when it has no readable marker (not ft's)."""
    try:
        marker: Any = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        kind = marker["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return kind if kind in KINDS else None


def check(folder: Path, kind: str) -> None:
    """Raise FtError unless ft may write a `kind` folder at `folder`; changes nothing.

    The folder (or, when it does not exist yet, the nearest existing folder above it) must be a writable folder,
    and an existing folder must be empty or carry ft's marker of the same kind.
    """
    existing = next(path for path in (folder, *folder.parents) if os.path.lexists(path))
    if not existing.is_dir():
        place = "is a file" if existing == folder else f"is inside {existing}, which is a file"
        raise FtError(f"{folder} {place}, not a folder; pick a folder path")
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        place = "" if existing == folder else f" (inside {existing})"
        raise FtError(f"{folder}: permission denied, ft cannot write there{place}; pick a folder you can write to")
    if existing != folder:
        return
    found = marked_kind(folder)
    if found is None:
        names = contents(folder)
        if names:
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise FtError(
                f"{folder} is not empty ({listed}) and was not made by ft (no {MARKER} marker); ft never writes into "
                "or clears such a folder, even with output.overwrite=true: pick a new or empty folder"
            )
    elif found != kind:
        raise FtError(f"{folder} is an ft {KINDS[found]}, not an ft {KINDS[kind]}; give each its own folder")


def lock(folder: Path) -> Lock:
    """Hold `folder` for this process (`with lock(folder): ...`); another process holding it is an FtError naming
    its PID. Nested locks of one folder in one process are fine."""
    key = folder.resolve()
    if key in _held:
        _held[key][1] += 1
        return Lock(key)
    try:
        fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FtError(f"{folder}: cannot create the lock file {LOCK} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FtError(f"{folder} is in use by another ft process (PID {holder}); wait for it to finish "
                      "or stop it, then run again") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = [fd, 1]
    return Lock(key)


def claim(folder: Path, kind: str) -> Lock:
    """`check`, then create the folder, mark it as ft's (the marker first) and `lock` it."""
    check(folder, kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if marked_kind(folder) is None:
            write_text(folder / MARKER, json.dumps({"kind": kind, "version": VERSION}) + "\n")
    except OSError as exc:
        raise FtError(f"{folder}: cannot write there ({exc.strerror})") from None
    return lock(folder)


class Lock:
    """A folder held by this process; released when the `with` block ends (or by the kernel when it exits)."""

    def __init__(self, key: Path) -> None:
        self.key = key

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        held = _held[self.key]
        held[1] -= 1
        if held[1] == 0:
            del _held[self.key]
            os.close(held[0])  # closing the descriptor drops the flock


def clear(folder: Path, names: Iterable[str]) -> None:
    """Remove from `folder` what ft wrote there: the entries `names`, and subfolders ft claimed (export and eval
    folders carry their own marker). Everything else, such as a user's own files, stays."""
    owned = set(names)
    for name in contents(folder):
        path = folder / name
        if path.is_symlink() or not path.is_dir():
            if name in owned:
                path.unlink()
        elif name in owned or marked_kind(path) is not None:
            shutil.rmtree(path)
