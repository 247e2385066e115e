"""Every `auto` of a recipe decided in one place: which backend trains, on which device, in which dtype, on which
base, with which memory work, logging where. The outcome is one frozen `Settings`, which the run header and
summary.json print, so a run never falls back silently.

The decisions come in two steps, both here, because unsloth patches transformers, peft and trl when it is imported:
`choose_backend` needs only the recipe and the machine, and `ft train` calls it before anything imports them (it
imports unsloth when unsloth is the one); `resolve` then settles the rest once the training stage has measured the
rows, since a CUDA run's MLP tiling and memory budget depend on the longest micro-batch. `ft plan` makes the same two
calls for `CUDA_WITH_UNSLOTH`, the machine a recipe's plan is for, from any machine.

- backend: `hf` anywhere; `unsloth` on CUDA only. `auto` is unsloth on CUDA where it imports, a micro-batch of the
  recipe's longest rows (`train.batch_size` x `data.max_seq_length`) is at most `UNSLOTH_STEP_TOKENS` tokens and the
  run is longer than `UNSLOTH_MIN_STEPS` optimizer steps (counted from the data file before anything loads,
  `ft.data_split.training_row_count`), hf elsewhere. A run on unsloth says in its reason that it waits for unsloth's
  compilation.
- dtype: `auto` is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow and imprecise).
- quantization: `auto` is nf4 (QLoRA) on CUDA, where memory is the limit, and none elsewhere (exact and faster on a
  CPU).
- gradient checkpointing: as the recipe says, and always with unsloth (its own offloaded kind, as plain unsloth runs
  under trl's defaults).
- activation offloading (trl's, CUDA only) and MLP tiles (`ft.tiling`) are ft's own memory work on the hf backend's
  checkpointing: offloading unless `off`; tiles when `on`, or on CUDA when `auto` and the untiled step would not fit
  `train.memory_budget_gb` (`ft.memory` estimates; a CUDA run that fits in no way is refused here, before any weights
  load).
- compiled layers (`ft.compiled`): on the hf backend when `train.compile_layers` asks for them (unsloth compiles its
  own). Not by default: at the 12B shape they take a few percent off a step after a first step that waits minutes
  for compilation (docs/BENCHMARKS.md#training-speed-on-users-data).
- wandb: `auto` is online when `WANDB_API_KEY` is set, else offline.

    >>> from ft.recipe import Recipe
    >>> def recipe(rows: int, batch: int) -> Recipe:
    ...     return Recipe.model_validate({"model": {"name": "tiny-random:gemma4-unified"}, "output": {"dir": "run"},
    ...         "data": {"train": "train.jsonl", "max_seq_length": rows}, "train": {"batch_size": batch}})
    >>> steps = [(4096, 1), (8192, 1), (4096, 4)]  # (data.max_seq_length, train.batch_size)
    >>> [choose_backend(recipe(rows, batch), CUDA_WITH_UNSLOTH).name for rows, batch in steps]
    ['unsloth', 'hf', 'hf']
    >>> [choose_backend(recipe(4096, 1), CUDA_WITH_UNSLOTH, steps).name for steps in (64, 1000)]
    ['hf', 'unsloth']
    >>> cpu = resolve(recipe(4096, 1), choose_backend(recipe(4096, 1), Machine("cpu", _unsloth_problem)))
    >>> cpu.backend, cpu.backend_reason, cpu.dtype, cpu.quantization, cpu.tiled_mlp, cpu.plan
    ('hf', 'auto on a machine without CUDA', 'float32', 'none', False, None)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from ft.errors import FtError, RecipeError

if TYPE_CHECKING:
    from ft.memory import MemoryPlan, ParamCounts
    from ft.recipe import Recipe

BackendName = Literal["hf", "unsloth"]
Device = Literal["cuda", "cpu"]
# auto's largest micro-batch for unsloth, in tokens (batch_size x max_seq_length): up to it unsloth trains faster,
# past it ft's hf path does (unsloth's step grows with the square of the row length and recompiles for each new
# padded width; hf's fixed cost a step is spread over more tokens), so the bound is on the step's tokens, not the
# row's. Measured in docs/BENCHMARKS.md, "Training backends at the Gemma 4 12B shape".
UNSLOTH_STEP_TOKENS = 6144
# auto's fewest optimizer steps for unsloth: it compiles its kernels before its first step, which comes minutes after
# start on a fresh machine where ft's own path starts in well under a minute, and over a short run its faster steps
# never win that time back (a 64-step epoch of varied rows: ft's path finished long before unsloth did). The bound is
# the break-even of a 2048-token row measured in one call (unsloth's later first step over its faster steps, rounded
# down), which unsloth's recompiles for each new shape on varied rows only push further out: docs/BENCHMARKS.md,
# "Training speed on users' data"; past this many steps unsloth's steps are the faster bet.
UNSLOTH_MIN_STEPS = 800
UNSLOTH_WAIT = ("unsloth compiles its kernels before the first step: minutes on a fresh machine, less once its "
                "compile cache is warm (docs/BENCHMARKS.md#training-speed-on-users-data)")


@dataclass(frozen=True)
class Machine:
    """What the choices depend on besides the recipe."""

    device: Device
    unsloth_problem: Callable[[], str | None]  # why unsloth cannot run here (None: it imported); asked only when needed


def this_machine() -> Machine:
    """The machine this process runs on."""
    import torch

    return Machine("cuda" if torch.cuda.is_available() else "cpu", _unsloth_problem)


CUDA_WITH_UNSLOTH = Machine("cuda", lambda: None)  # what `ft plan` plans for, without importing unsloth


@dataclass(frozen=True)
class Backend:
    name: BackendName
    device: Device
    reason: str


@dataclass(frozen=True)
class Settings:
    """How a run trains, every `auto` decided (the module docstring gives the rules)."""

    backend: BackendName
    backend_reason: str
    device: Device
    dtype: Literal["float32", "bfloat16", "float16"]
    quantization: Literal["nf4", "none"]
    gradient_checkpointing: bool
    offload_activations: bool
    tiled_mlp: bool
    compiled_layers: bool
    wandb: Literal["disabled", "offline", "online"]
    plan: MemoryPlan | None  # the CUDA step's memory estimate the tiling and budget decisions used; None on a CPU

    def as_dict(self) -> dict[str, Any]:
        """The decisions, as summary.json's `settings` holds them (the plan has a key of its own there)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "plan"}

    def header(self) -> str:
        """The run header's line: the backend and why, then every other decision and the planned peak."""
        rest = ", ".join(f"{key} {value}" for key, value in self.as_dict().items()
                         if key not in ("backend", "backend_reason", "device"))
        line = f"{self.backend} backend ({self.backend_reason}) on {self.device}: {rest}"
        if self.plan is not None:
            line += f"; planned peak {self.plan.total_gib:.1f} GiB for a step of {self.plan.tokens} tokens"
        return line


def optimizer_steps(recipe: Recipe, rows: int | None) -> int | None:
    """The optimizer steps a run of `rows` training rows takes (train.max_steps where set); None when unknown.

    >>> from ft.recipe import Recipe
    >>> r = Recipe.model_validate({"model": {"name": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"},
    ...                            "train": {"batch_size": 4, "grad_accum": 2, "epochs": 3}})
    >>> optimizer_steps(r, 100), optimizer_steps(r, None)  # 25 micro-batches an epoch, 12 steps of 2
    (36, None)
    """
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    if rows is None:
        return None
    return math.ceil(t.epochs * max(math.ceil(rows / t.batch_size) // t.grad_accum, 1))


def choose_backend(recipe: Recipe, machine: Machine, steps: int | None = None) -> Backend:
    """The backend and device a run of the recipe uses on `machine`, for a run of `steps` optimizer steps (None: a
    long run, as `ft plan` assumes). Where unsloth may be the one, asking the machine imports it, so `ft train` calls
    this before importing `ft.train` (and with it trl); an import failure is the reason auto gives for hf, and a
    RecipeError when the recipe asks for unsloth."""
    device, setting = machine.device, recipe.train.backend
    if setting == "hf":
        return Backend("hf", device, "the recipe asks for hf")
    if device != "cuda":
        if setting == "unsloth":
            raise RecipeError(f"{recipe.where('train.backend')}: unsloth needs a CUDA GPU and this machine has none; "
                              "use hf (or auto, which picks hf here)")
        return Backend("hf", device, "auto on a machine without CUDA")
    rows, batch = recipe.data.max_seq_length, recipe.train.batch_size
    step = f"auto on CUDA with micro-batches up to {batch * rows} tokens ({batch} x {rows})"
    if setting == "auto" and batch * rows > UNSLOTH_STEP_TOKENS:
        return Backend("hf", device, f"{step}, where ft's own path is faster than unsloth (past {UNSLOTH_STEP_TOKENS})")
    if setting == "auto" and steps is not None and steps <= UNSLOTH_MIN_STEPS:
        return Backend("hf", device, f"auto on CUDA for a run of {steps} optimizer steps, too few for unsloth's faster "
                                     f"steps to win back its compile wait (up to {UNSLOTH_MIN_STEPS})")
    problem = machine.unsloth_problem()
    if problem is None:
        chosen = ("the recipe asks for unsloth" if setting == "unsloth" else
                  f"{step}, where unsloth is the faster (up to {UNSLOTH_STEP_TOKENS}) over "
                  f"{'a long run' if steps is None else f'{steps} optimizer steps'}")
        return Backend("unsloth", device, f"{chosen}; {UNSLOTH_WAIT}")
    if setting == "unsloth":
        raise RecipeError(f"{recipe.where('train.backend')}: unsloth cannot run here: {problem}; use hf (or auto)")
    return Backend("hf", device, f"auto on CUDA, but unsloth cannot run here: {problem}")


def resolve(recipe: Recipe, backend: Backend, step_tokens: int | None = None) -> Settings:
    """Every other decision for a run on `backend`. On CUDA the memory plan is for micro-batches of `step_tokens`
    (default: the recipe's worst case, a batch of max-length rows), and a run it does not fit raises a FtError
    naming `train.memory_budget_gb`. Only CUDA reads the model's config (the planner counts its parameters)."""
    device, quantization = backend.device, _quantization(recipe, backend.device)
    plan, offload = None, False  # trl's offloading streams CUDA tensors
    tiled = _ft_checkpointing(recipe, backend.name) and recipe.train.tiled_mlp == "on"  # no budget to weigh on a CPU
    if device == "cuda":
        counts = _counts(recipe)
        plan = _plan(recipe, counts, backend.name, quantization, step_tokens)
        _check_budget(recipe, plan, counts, quantization)
        offload, tiled = plan.offload, plan.tiled_mlp
    return Settings(
        backend=backend.name,
        backend_reason=backend.reason,
        device=device,
        dtype=_dtype(recipe, device),
        quantization=quantization,
        gradient_checkpointing=_checkpointing(recipe, backend.name),
        offload_activations=offload,
        tiled_mlp=tiled,
        compiled_layers=_compiled_layers(recipe, backend),
        wandb=_wandb(recipe),
        plan=plan,
    )


def _dtype(recipe: Recipe, device: Device) -> Literal["float32", "bfloat16", "float16"]:
    if recipe.model.dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return recipe.model.dtype


def _quantization(recipe: Recipe, device: Device) -> Literal["nf4", "none"]:
    if recipe.model.quantization == "auto":
        return "nf4" if device == "cuda" else "none"
    return recipe.model.quantization


def _checkpointing(recipe: Recipe, backend: BackendName) -> bool:
    return recipe.train.gradient_checkpointing or backend == "unsloth"


def _ft_checkpointing(recipe: Recipe, backend: BackendName) -> bool:
    """Whether ft's memory work (offloading, MLP tiles) can run: it hooks into the hf backend's checkpointing."""
    return backend == "hf" and _checkpointing(recipe, backend)


def _compiled_layers(recipe: Recipe, backend: Backend) -> bool:
    return backend.name == "hf" and recipe.train.compile_layers


def _wandb(recipe: Recipe) -> Literal["disabled", "offline", "online"]:
    if recipe.logging.wandb == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return recipe.logging.wandb


def _counts(recipe: Recipe) -> ParamCounts:
    from ft.memory import count_parameters
    from ft.models import load_config

    with recipe.blame("model.name"):
        config = load_config(recipe.model.name)
    return count_parameters(config, recipe.lora)


def _plan(recipe: Recipe, counts: ParamCounts, backend: BackendName, quantization: str,
          step_tokens: int | None) -> MemoryPlan:
    """The CUDA step's memory plan with offloading and tiling decided: the MLP is tiled when the recipe says `on`, or
    `auto` and the untiled step would not fit the budget."""
    from ft.memory import estimate

    t = recipe.train
    ft_memory = _ft_checkpointing(recipe, backend)

    def plan(tiled: bool) -> MemoryPlan:
        return estimate(counts, step_tokens or t.batch_size * recipe.data.max_seq_length, backend,
                        quantized=quantization == "nf4", gradient_checkpointing=_checkpointing(recipe, backend),
                        offload=ft_memory and t.offload_activations != "off", tiled_mlp=ft_memory and tiled)

    untiled = plan(t.tiled_mlp == "on")
    if t.tiled_mlp == "auto" and untiled.total_gib > t.memory_budget_gb:
        return plan(True)
    return untiled


def _check_budget(recipe: Recipe, plan: MemoryPlan, counts: ParamCounts, quantization: str) -> None:
    """Raise a FtError naming `train.memory_budget_gb` when the plan does not fit the budget; for an unsloth plan,
    the message says whether ft's own hf path (offloaded checkpoints, tiled MLP) would fit instead."""
    budget = recipe.train.memory_budget_gb
    if plan.total_gib <= budget:
        return
    hint = ""
    if plan.backend == "unsloth":
        hf = _plan(recipe, counts, "hf", quantization, plan.tokens)
        if hf.total_gib <= budget:
            hint = (f"train.backend=hf fits: ft's own path plans {hf.total_gib:.1f} GiB for this step (checkpointed "
                    "layer inputs in CPU memory, the MLP run in tiles).\n")
    raise FtError(
        f"{recipe.where('train.memory_budget_gb')}: this run needs about {plan.total_gib:.1f} GiB of GPU memory, "
        f"more than the budget of {budget:g} GiB ({plan.backend} backend, {plan.base} base):\n{plan.table()}\n{hint}"
        "Lower data.max_seq_length or train.batch_size (the largest step sets the peak), lower lora.r, turn on "
        "train.gradient_checkpointing, or raise train.memory_budget_gb if the GPU has more memory."
    )


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
