"""How an answer's next token is picked, shared by every way ft makes the model answer (GGUF and transformers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0; else top-k (0: off), then top-p, then temperature, seeded."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
