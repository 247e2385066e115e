"""The stages stay apart: ft/ (recipe, training) never imports quantize/ or eval/; only the CLI chains the stages."""

from __future__ import annotations

import ast
from pathlib import Path

FT = Path(__file__).parent.parent / "ft"
CHAINS_STAGES = {FT / "cli.py"}


def _imported(path: Path) -> set[str]:
    """Top-level package of every import in a file, function-level imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_ft_imports_no_other_stage() -> None:
    offending = {str(p.relative_to(FT.parent)): sorted(_imported(p) & {"quantize", "eval"})
                 for p in FT.rglob("*.py") if p not in CHAINS_STAGES}
    assert {p: names for p, names in offending.items() if names} == {}
    assert _imported(FT / "cli.py") >= {"quantize", "eval"}  # the check sees imports inside functions
