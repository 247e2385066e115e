"""The hf backend: transformers + peft + bitsandbytes, with ft's own memory work on CUDA.

The base model loads in the resolved dtype and base (`ft.resolve`, `ft.models`); ft's chunked attention
(`ft.attention`), Liger's kernels on CUDA (`ft.kernels`) and, where the settings say so, MLP tiles (`ft.tiling`) go
in before peft wraps the model with one LoRA over the recipe's modules (`ft.lora`); where the recipe asks, the decoder
layers are then compiled (`ft.compiled`, in place of Liger's kernels, which Dynamo cannot trace).
"""

from __future__ import annotations

from peft import PeftModel

from ft import attention
from ft.compiled import compile_layers
from ft.kernels import use_liger_kernels
from ft.lora import apply_lora
from ft.models import load_model
from ft.recipe import Recipe
from ft.resolve import Settings
from ft.tiling import tile_mlps


def load(recipe: Recipe, settings: Settings) -> PeftModel:
    with recipe.blame("model.name"):
        model = load_model(recipe.model.name, settings.dtype, settings.device, settings.quantization)
    model.set_attn_implementation(attention.register())
    if settings.device == "cuda" and not settings.compiled_layers:  # compiled layers fuse the same work themselves
        use_liger_kernels(model)
    if settings.tiled_mlp:
        tile_mlps(model)
    model = apply_lora(model, recipe.lora)
    if settings.compiled_layers:
        compile_layers(model)
    return model
