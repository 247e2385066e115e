"""Which training backend runs, and why: the one seam between the training stage and the libraries that build the
model it trains.

A backend is a module here with one function, `load(recipe, device, plan) -> PeftModel`: the base model with the
recipe's LoRA on it, ready for trl's SFTTrainer. Everything after that (data, trainer, checkpoints, run directory)
is the same for every backend (`ft.train`).

- `hf`: transformers + peft + bitsandbytes with ft's own memory work (`ft.backends.hf`); runs anywhere.
- `unsloth`: unsloth's FastModel, its kernels and offloaded checkpointing (`ft.backends.unsloth`); CUDA only.

`train.backend: auto` is unsloth on CUDA where unsloth imports and a micro-batch of the recipe's longest rows
(`train.batch_size` x `data.max_seq_length`) is at most `UNSLOTH_STEP_TOKENS` tokens, hf elsewhere: past that ft's own
path trains faster than unsloth (docs/BENCHMARKS.md, "Training backends at the Gemma 4 12B shape"). The choice and its
reason go into the progress header and summary.json, so a run never falls back silently.

    >>> choose_for_plan("auto", 4096, 1), choose_for_plan("auto", 8192, 1), choose_for_plan("auto", 4096, 4)
    ('unsloth', 'hf', 'hf')
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ft.errors import RecipeError

if TYPE_CHECKING:
    from peft import PeftModel

    from ft.memory import MemoryPlan
    from ft.recipe import Recipe

Name = Literal["hf", "unsloth"]
# auto's largest micro-batch for unsloth, in tokens (batch_size x max_seq_length). Measured on H200s
# (bench/train_12b.py, docs/BENCHMARKS.md). At batch 1 unsloth's step grows with the square of the row length (0.50 s
# at 2047 tokens, 3.58 s at 8203, 12.06 s at 16375) and ft's hf path, with about a second of fixed cost a step, more
# slowly (1.57, 2.65, 6.34 s): quadratic fits cross near 5800 tokens, and at 6144 they differ by 3%. At batch 4 of
# mixed-length rows (up to about 5k tokens, 20k a step) hf ran 2.51x plain unsloth's tokens per second over an epoch
# of 12 steps: each new padded width makes unsloth compile again (steps of 13, 58 and 15 s among 3.5-6.6 s ones),
# and even over unsloth's steps that did not recompile hf was 1.11x, its fixed cost spread over more tokens. So the
# bound is on the step's tokens, not the row's.
UNSLOTH_STEP_TOKENS = 6144


@dataclass(frozen=True)
class Backend:
    name: Name
    device: str  # "cuda" where torch sees a GPU, else "cpu"
    reason: str

    def load(self, recipe: Recipe, plan: MemoryPlan | None) -> PeftModel:
        """The recipe's base model with its LoRA, from this backend's module."""
        return importlib.import_module(f"ft.backends.{self.name}").load(recipe, self.device, plan)


def choose_for_plan(setting: str, max_seq_length: int, batch_size: int) -> Name:
    """The backend a recipe's setting, row length and batch size give on a CUDA machine with unsloth installed: what
    `ft plan` estimates."""
    if setting == "auto":
        return "unsloth" if batch_size * max_seq_length <= UNSLOTH_STEP_TOKENS else "hf"
    return setting  # type: ignore[return-value]


def choose(recipe: Recipe) -> Backend:
    """The backend and device this run uses. Picking unsloth imports it here, before trl, transformers and peft
    load (unsloth patches them at import), so `ft train` calls this before importing `ft.train`; an import failure
    is the reason auto gives for hf, and a RecipeError when the recipe asks for unsloth."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = recipe.train.backend
    if setting == "hf":
        return Backend("hf", device, "the recipe asks for hf")
    if device != "cuda":
        if setting == "unsloth":
            raise RecipeError(f"{recipe.where('train.backend')}: unsloth needs a CUDA GPU and this machine has none; "
                              "use hf (or auto, which picks hf here)")
        return Backend("hf", device, "auto on a machine without CUDA")
    rows, batch = recipe.data.max_seq_length, recipe.train.batch_size
    step = f"auto on CUDA with micro-batches up to {batch * rows} tokens ({batch} x {rows})"
    if choose_for_plan(setting, rows, batch) == "hf":
        return Backend("hf", device, f"{step}, where ft's own path is faster than unsloth (past {UNSLOTH_STEP_TOKENS})")
    problem = _unsloth_problem()
    if problem is None:
        return Backend("unsloth", device, "the recipe asks for unsloth" if setting == "unsloth" else
                       f"{step}, where unsloth is the faster (up to {UNSLOTH_STEP_TOKENS})")
    if setting == "unsloth":
        raise RecipeError(f"{recipe.where('train.backend')}: unsloth cannot run here: {problem}; use hf (or auto)")
    return Backend("hf", device, f"auto on CUDA, but unsloth cannot run here: {problem}")


def _unsloth_problem() -> str | None:
    """Why unsloth cannot be used in this process (None: it imported)."""
    if importlib.util.find_spec("unsloth") is None:
        return "it is not installed (pip install -e . installs it)"
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # its usage statistics would reach the network
    try:
        importlib.import_module("unsloth")
    except Exception as exc:  # unsloth raises NotImplementedError, ImportError or RuntimeError by platform
        return f"importing it failed ({type(exc).__name__}: {exc})"
    return None
