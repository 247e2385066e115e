"""Prompts with exact reference answers: generated reasoning tasks (reasoning-gym, offline) and the held-out set.

    >>> prompts = reasoning_prompts(["basic_arithmetic"], samples=2, seed=0)
    >>> len(prompts), prompts[0].task
    (2, 'basic_arithmetic')
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ft.data import Row
from ft.errors import RecipeError
from ft.recipe import Recipe

INSTRUCTION = "Reply with the final answer only."


@dataclass(frozen=True)
class Prompt:
    task: str
    messages: list[dict[str, Any]]
    answer: str


def reasoning_prompts(tasks: list[str], samples: int, seed: int) -> list[Prompt]:
    """`samples` procedurally generated problems per reasoning-gym task; the same seed gives the same problems."""
    import reasoning_gym

    prompts = []
    for task in tasks:  # names were checked against the registry when the recipe was (check_tasks)
        for item in reasoning_gym.create_dataset(task, size=samples, seed=seed):
            question = f"{item['question']}\n{INSTRUCTION}"
            prompts.append(Prompt(task, [{"role": "user", "content": question}], str(item["answer"])))
    return prompts


def check_tasks(recipe: Recipe) -> None:
    """Every eval.tasks name is a reasoning-gym task; all unknown names are reported at once, with a "did you mean"
    and their place in the recipe. (Importing reasoning_gym fills its registry: about a second.)"""
    if recipe.eval is None:
        return
    from reasoning_gym.factory import DATASETS

    problems = []
    for i, task in enumerate(recipe.eval.tasks):
        if task not in DATASETS:
            close = difflib.get_close_matches(task, list(DATASETS), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "see reasoning_gym.factory.DATASETS for the names"
            problems.append(f"{recipe.where(f'eval.tasks.{i}')}: unknown reasoning-gym task '{task}' ({hint})")
    if problems:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))


def _text(content: Any) -> str | None:
    """The text of a message, or None when it holds images or audio (the text-only judge cannot see them)."""
    if isinstance(content, str):
        return content
    if any(part.get("type") != "text" for part in content):
        return None
    return "".join(part["text"] for part in content)


def heldout_prompts(rows: list[Row]) -> list[Prompt]:
    """Text-only held-out rows: the conversation up to its last assistant turn, which is the reference answer."""
    prompts = []
    for row in rows:
        texts = [_text(m["content"]) for m in row.messages]
        if any(t is None for t in texts):
            continue
        messages = [{"role": m["role"], "content": t} for m, t in zip(row.messages[:-1], texts, strict=False)]
        prompts.append(Prompt("heldout", messages, texts[-1]))
    return prompts


def text_only(rows: list[Row]) -> list[list[dict[str, Any]]]:
    """Conversations with image and audio parts removed, for rendering an evaluation text."""
    out = []
    for row in rows:
        messages = []
        for m in row.messages:
            content = m["content"] if isinstance(m["content"], str) else "".join(
                p["text"] for p in m["content"] if p.get("type") == "text")
            messages.append({"role": m["role"], "content": content})
        out.append(messages)
    return out
