"""The one seam between the training stage and the libraries that build the model it trains.

A backend is a module here with one function, `load(recipe, settings) -> PeftModel`: the base model with the
recipe's LoRA on it, ready for trl's SFTTrainer, built as the resolved settings say (`ft.resolve`, which also
decides which backend runs, and why). Everything after that (data, trainer, checkpoints, run directory) is the same
for every backend (`ft.train`).

- `hf`: transformers + peft + bitsandbytes with ft's own memory work (`ft.backends.hf`); runs anywhere.
- `unsloth`: unsloth's FastModel, its kernels and offloaded checkpointing (`ft.backends.unsloth`); CUDA only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import PeftModel

    from ft.recipe import Recipe
    from ft.resolve import Settings


def load(recipe: Recipe, settings: Settings) -> PeftModel:
    """The recipe's base model with its LoRA, from the module of the backend the settings name."""
    return importlib.import_module(f"ft.backends.{settings.backend}").load(recipe, settings)
