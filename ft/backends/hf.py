"""The hf backend: transformers + peft + bitsandbytes, with ft's own memory work on CUDA.

The base model loads in the resolved dtype and base (`ft.resolve`, `ft.models`); ft's chunked attention
(`ft.attention`), fused RMSNorm and GeGLU kernels on CUDA (`ft.kernels`) and, where the settings say so, MLP tiles
(`ft.tiling`) go in before peft wraps the model with one LoRA over the recipe's modules (`ft.lora`), whose
projections then run as one fused autograd node each (`ft.fused_lora`); where the recipe asks, the decoder layers
are then compiled (`ft.compiled`, in place of the fused kernels, as that module says why).
"""

from __future__ import annotations

from peft import PeftModel

from ft import attention
from ft.compiled import compile_layers
from ft.fused_lora import fuse_lora_projections
from ft.kernels import use_fused_kernels
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
        use_fused_kernels(model)
    if settings.tiled_mlp:
        tile_mlps(model)
    model = apply_lora(model, recipe.lora)
    fuse_lora_projections(model)
    if settings.compiled_layers:
        compile_layers(model)
    return model
