"""Where the LoRA goes: the language model's projections in every layer, and optionally the image/audio projections.

peft has no default targets for `gemma4_unified`, and Gemma 4's full-attention layers have no `v_proj` (keys double
as values), so ft names the modules itself with one anchored regex.

    >>> from ft.recipe import LoraSection
    >>> pattern = target_regex(LoraSection(targets=["q_proj"], vision=True))
    >>> bool(re.fullmatch(pattern, "model.language_model.layers.3.self_attn.q_proj"))
    True
    >>> bool(re.fullmatch(pattern, "model.embed_vision.patch_dense"))
    True
"""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ft.recipe import LoraSection

VISION_MODULES = ("embed_vision.patch_dense", "embed_vision.multimodal_embedder.embedding_projection")
AUDIO_MODULES = ("embed_audio.embedding_projection",)
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def target_regex(lora: LoraSection) -> str:
    """A regex that peft matches against full module names (re.fullmatch)."""
    language = "|".join(f"{_PARENT[t]}\\.{t}" for t in lora.targets)
    alternatives = [f"language_model\\.layers\\.\\d+\\.(?:{language})"]
    if lora.vision:
        alternatives += [re.escape(m) for m in VISION_MODULES]
    if lora.audio:
        alternatives += [re.escape(m) for m in AUDIO_MODULES]
    return rf"(?:.*\.)?model\.(?:{'|'.join(alternatives)})"


def apply_lora(model: nn.Module, lora: LoraSection) -> PeftModel:
    """Freeze the base model and wrap it with one LoRA over all requested modules."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_regex(lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_modules(model: nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA (peft's `lora_A` holders), base-model relative."""
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A")) > 0
    )
