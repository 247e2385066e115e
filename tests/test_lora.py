"""Where the LoRA lands, and that training it moves the image and audio paths, not only text."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ft.data import load_rows
from ft.encode import collate, encode_row
from ft.lora import apply_lora, lora_modules
from ft.recipe import LoraSection
from ft.tiny import build_tiny
from conftest import DEMO_DATA


def test_targets_cover_every_layer_and_only_requested_media():
    model, _ = build_tiny()
    peft_model = apply_lora(model, LoraSection(vision=True, audio=False))
    modules = lora_modules(peft_model)
    layers = model.config.text_config.layer_types
    expected = set()
    for i, kind in enumerate(layers):
        attn = ["q_proj", "k_proj", "o_proj"] + ([] if kind == "full_attention" else ["v_proj"])
        expected |= {f"model.language_model.layers.{i}.self_attn.{p}" for p in attn}
        expected |= {f"model.language_model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {"model.embed_vision.patch_dense", "model.embed_vision.multimodal_embedder.embedding_projection"}
    assert set(modules) == expected
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_language_only_lora_leaves_media_projections_alone():
    model, _ = build_tiny()
    modules = lora_modules(apply_lora(model, LoraSection(targets=["q_proj", "down_proj"])))
    assert not any("embed_" in m for m in modules)
    assert all(m.endswith(("q_proj", "down_proj")) for m in modules)


def _media_batch(processor):
    rows = load_rows(DEMO_DATA / "train.jsonl")
    picked = [r for r in rows if r.media("image")][:2] + [r for r in rows if r.media("audio")][:2]
    return collate([encode_row(r, processor) for r in picked], processor.tokenizer.pad_token_id)


def test_gradients_reach_vision_and_audio_projections():
    model, processor = build_tiny()
    peft_model = apply_lora(model, LoraSection(vision=True, audio=True))
    peft_model.train()
    peft_model(**_media_batch(processor)).loss.backward()
    for name in ("embed_vision.patch_dense", "embed_vision.multimodal_embedder.embedding_projection",
                 "embed_audio.embedding_projection"):
        grads = [p.grad for n, p in peft_model.named_parameters() if name in n and "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_trained_media_lora_changes_image_only_and_audio_only_outputs():
    torch.manual_seed(0)
    model, processor = build_tiny()
    peft_model = apply_lora(model, LoraSection(targets=["q_proj"], vision=True, audio=True))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = _media_batch(processor)
    peft_model.train()
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()
    peft_model.eval()
    image_only = processor(images=[[Image.new("RGB", (96, 96), "green")]], return_tensors="pt")
    audio_only = processor(audio=[np.sin(np.linspace(0, 600, 8000)).astype(np.float32)], return_tensors="pt")
    q_loras = [m for n, m in peft_model.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling")]
    for inputs in (image_only, audio_only):
        with torch.no_grad():
            adapted = peft_model(**inputs).logits
            with peft_model.disable_adapter():
                base = peft_model(**inputs).logits
            # Switch the q_proj LoRA off alone: what remains of the change comes from the media projections.
            saved = [dict(m.scaling) for m in q_loras]
            for m in q_loras:
                m.scaling = {k: 0.0 for k in m.scaling}
            media_only = peft_model(**inputs).logits
            for m, scaling in zip(q_loras, saved, strict=True):
                m.scaling = scaling
        assert (adapted - base).abs().max() > 1e-3
        assert (media_only - base).abs().max() > 1e-3
