"""Links between ft's documents resolve: every relative link in the Markdown files names a file that exists, and every
`#section` (in a Markdown link, or written as `docs/BENCHMARKS.md#section` in a recipe or a code comment) names a
heading of that file, as GitHub makes its anchors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MENTION = re.compile(r"([\w./-]+\.md)#([\w-]+)")


def tracked(*patterns: str) -> list[Path]:
    """The checkout's files matching the patterns (git's list where there is one: no virtual environment, no runs)."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(f"**/{pattern}")]
    return [ROOT / name for name in sorted(set(names)) if (ROOT / name).is_file()]


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (lower case, punctuation dropped, spaces as hyphens; a repeated
    heading gets -1, -2, ...). Lines inside code fences are not headings.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.md"
    >>> _ = path.write_text("# Top\\n```\\n# not a heading\\n```\\n## Export at the 12B shape (`bench/x.py`)\\n## Top\\n")
    >>> sorted(anchors(path))
    ['export-at-the-12b-shape-benchxpy', 'top', 'top-1']
    """
    found: set[str] = set()
    fenced = False
    for line in markdown.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        base = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        slug, n = base, 0
        while slug in found:
            n += 1
            slug = f"{base}-{n}"
        found.add(slug)
    return found


def links() -> list[tuple[Path, str]]:
    """(file, target) of every relative Markdown link and every `FILE.md#section` mention in text files."""
    found = []
    for path in tracked("*.md"):
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
        found += [(path, target) for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]
    for path in tracked("*.md", "*.py", "*.yaml", "*.toml"):
        if path == Path(__file__).resolve():
            continue  # its own examples
        found += [(path, f"{name}#{anchor}") for name, anchor in MENTION.findall(path.read_text())]
    return list(dict.fromkeys(found))


def resolve(source: Path, target: str) -> tuple[Path, str]:
    name, _, anchor = target.partition("#")
    if not name:
        return source, anchor
    for base in (source.parent, ROOT):  # Markdown links are relative to their file; mentions in code to the root
        if (base / name).exists():
            return (base / name).resolve(), anchor
    return source.parent / name, anchor


@pytest.mark.parametrize(("source", "target"), links(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path)
                         else v)
def test_link_resolves(source: Path, target: str) -> None:
    path, anchor = resolve(source, target)
    assert path.exists(), f"{source.relative_to(ROOT)}: {target}: no such file"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path), f"{source.relative_to(ROOT)}: {target}: no such section in {path.name}"


def test_the_documents_link_to_their_figures() -> None:
    """README, DESIGN, ROADMAP and the 12B recipes point at BENCHMARKS' sections rather than at the page alone."""
    for name in ("README.md", "docs/DESIGN.md", "docs/ROADMAP.md", "recipes/gemma4-12b-qlora.yaml",
                 "recipes/gemma4-12b-qlora-4k.yaml"):
        assert "BENCHMARKS.md#" in (ROOT / name).read_text(), name
