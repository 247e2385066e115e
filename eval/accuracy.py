"""Exact-match scoring of greedy answers, Wilson intervals, and paired flips between two models.

Answer extraction, applied to the model's reply before comparing with the reference answer:
    1. drop thinking blocks (`<|channel>...<channel|>`) and a trailing `<turn|>`;
    2. if a line says "answer is X", "answer is: X" or "Answer: X" (markdown bold ignored), keep X (the last one);
    3. otherwise keep the last non-empty line;
    4. normalise: lower case, strip spaces, `**`, `$`, quotes and one trailing period.
Two answers match when their normalised texts are equal, or when both parse as numbers and are equal.

    >>> extract_answer("Let me add.\\nThe answer is **-4**.")
    '-4'
    >>> is_correct("<|channel>thought\\nhmm<channel|>A red circle.", "A red circle.")
    True
    >>> [round(x, 3) for x in wilson_interval(8, 10)]
    [0.49, 0.943]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_THINKING = re.compile(r"<\|channel>.*?<channel\|>", re.DOTALL)
_ANSWER_LINE = re.compile(r"answer(?:\s+is\s*:?|\s*:)\s*(.+)", re.IGNORECASE)


def normalize(text: str) -> str:
    text = text.strip().lower().replace("**", "").replace("$", "").strip("\"'` ")
    return text[:-1].strip() if text.endswith(".") else text


def extract_answer(reply: str) -> str:
    reply = _THINKING.sub("", reply).replace("<turn|>", "")
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if not lines:
        return ""
    for line in reversed(lines):
        match = _ANSWER_LINE.search(line.replace("**", "").replace("$", ""))
        if match:
            return normalize(match.group(1))
    return normalize(lines[-1])


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def is_correct(reply: str, reference: str) -> bool:
    got, want = extract_answer(reply), normalize(reference)
    if got == want:
        return True
    a, b = _number(got), _number(want)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Flips:
    """Paired comparison on the same prompts: how many answers each model got that the other missed."""

    lost: int  # right with the reference model, wrong quantized
    gained: int  # wrong with the reference model, right quantized


def paired_flips(reference: list[bool], other: list[bool]) -> Flips:
    if len(reference) != len(other):
        raise ValueError("paired flips need the same prompts for both models")
    return Flips(
        lost=sum(r and not o for r, o in zip(reference, other, strict=True)),
        gained=sum(o and not r for r, o in zip(reference, other, strict=True)),
    )
