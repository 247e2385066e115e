"""Deterministic tiny Gemma 4 MTP drafter (`gemma4_unified_assistant`) that pairs with the tiny target of `ft.tiny`.

The drafter owns no K/V projections: every layer attends to the target's KV of the target's last sliding
(resp. full) layer. Its attention geometry (head dims, KV heads, layer-type order) must therefore match the
target's last two layers, while its own width is deliberately different from the target's (llama.cpp refuses
a `gemma4-assistant` whose width equals the backbone width).

    >>> from ft.tiny import tiny_config, tiny_tokenizer
    >>> drafter = build_tiny_drafter(tiny_config(tiny_tokenizer()))
    >>> drafter.config.backbone_hidden_size, drafter.config.text_config.hidden_size
    (256, 128)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedConfig,
    Gemma4UnifiedTextConfig,
)

from ft.tiny import tiny_config, tiny_tokenizer

TINY_DRAFTER = "tiny-random:gemma4-unified-assistant"
DRAFTER_HIDDEN = 128  # half the tiny target's 256, as the 12B drafter is narrower than its target
DRAFTER_FF = 256
DRAFTER_HEADS = 2


def _last_layer_geometry(target_text: Gemma4UnifiedTextConfig, layer_type: str) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of the target's last layer of `layer_type`: the KV the drafter reuses."""
    index = max(i for i, t in enumerate(target_text.layer_types) if t == layer_type)
    layer = target_text.per_layer_config[index]
    return layer.head_dim, layer.num_key_value_heads


def tiny_drafter_config(target_config: Gemma4UnifiedConfig) -> Gemma4UnifiedAssistantConfig:
    """Two drafter layers [sliding, full] whose KV geometry is read from the target config."""
    target_text = target_config.get_text_config()
    if target_text.layer_types[-2:] != ["sliding_attention", "full_attention"]:
        raise ValueError("the target must end with a sliding and then a full attention layer")
    swa_dim, swa_kv = _last_layer_geometry(target_text, "sliding_attention")
    full_dim, full_kv = _last_layer_geometry(target_text, "full_attention")
    if DRAFTER_HIDDEN == target_text.hidden_size:
        raise ValueError("the drafter width must differ from the target width")
    text_config = {
        "model_type": "gemma4_unified_text",
        "vocab_size": target_text.vocab_size,
        "hidden_size": DRAFTER_HIDDEN,
        "intermediate_size": DRAFTER_FF,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_attention_heads": DRAFTER_HEADS,
        "num_key_value_heads": swa_kv,
        "head_dim": swa_dim,
        "global_head_dim": full_dim,
        "num_global_key_value_heads": full_kv,
        "attention_k_eq_v": target_text.attention_k_eq_v,
        "sliding_window": target_text.sliding_window,
        "final_logit_softcapping": target_text.final_logit_softcapping,
        "max_position_embeddings": target_text.max_position_embeddings,
        "rope_parameters": target_text.rope_parameters,
        "rms_norm_eps": target_text.rms_norm_eps,
        "pad_token_id": target_text.pad_token_id,
        "eos_token_id": target_text.eos_token_id,
        "bos_token_id": target_text.bos_token_id,
    }
    return Gemma4UnifiedAssistantConfig(text_config=text_config, backbone_hidden_size=target_text.hidden_size)


def build_tiny_drafter(target_config: Gemma4UnifiedConfig, seed: int = 0) -> Gemma4UnifiedAssistantForCausalLM:
    """Build the tiny drafter; the same seed gives bit-identical weights."""
    config = tiny_drafter_config(target_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4UnifiedAssistantForCausalLM(config)
        # Random, non-unit layer scalars so that a converter dropping them is caught by numerical checks.
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    return model.eval()


def save_tiny_drafter(directory: Path, seed: int = 0) -> Path:
    """Write the tiny drafter (for the target of `ft.tiny.build_tiny()`) as a Hugging Face checkpoint directory."""
    model = build_tiny_drafter(tiny_config(tiny_tokenizer()), seed)
    model.save_pretrained(directory)
    return Path(directory)
