"""The hf backend: transformers + peft + bitsandbytes, with ft's own memory work on CUDA.

The base model loads in the training dtype (an NF4 base on CUDA, `ft.models`); ft's chunked attention
(`ft.attention`), Liger's kernels on CUDA (`ft.kernels`) and, where the memory plan says so, MLP tiles
(`ft.tiling`) go in before peft wraps the model with one LoRA over the recipe's modules (`ft.lora`).
"""

from __future__ import annotations

from peft import PeftModel

from ft import attention
from ft.kernels import use_liger_kernels
from ft.lora import apply_lora
from ft.memory import MemoryPlan
from ft.models import load_model
from ft.recipe import Recipe
from ft.tiling import tile_mlps


def load(recipe: Recipe, device: str, plan: MemoryPlan | None) -> PeftModel:
    with recipe.blame("model.name"):
        model = load_model(recipe.model.name, recipe.model.dtype, device, recipe.model.quantization)
    model.set_attn_implementation(attention.register())
    if device == "cuda":
        use_liger_kernels(model)
    if tiles_mlp(recipe, plan):
        tile_mlps(model)
    return apply_lora(model, recipe.lora)


def tiles_mlp(recipe: Recipe, plan: MemoryPlan | None) -> bool:
    """Whether the MLP runs a tile of tokens at a time (`ft.tiling`): as the CUDA memory plan decided, or, on a CPU
    (no plan), when the recipe says `on`; only with gradient checkpointing."""
    if plan is not None:
        return plan.tiled_mlp
    return recipe.train.gradient_checkpointing and recipe.train.tiled_mlp == "on"
