"""QLoRA on the transformers path: an NF4 base (bitsandbytes) for the decoder's linear layers, LoRA exactly where the
recipe says, and a short training run that learns. bitsandbytes' 4-bit kernels run on the CPU too, so this is
checked here; on CUDA the same code is what `model.quantization: auto` picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from conftest import run_ft, write_recipe
from torch import nn

from ft.lora import apply_lora, lora_modules
from ft.models import load_model
from ft.recipe import LoraSection
from ft.tiny import build_tiny

TINY = "tiny-random:gemma4-unified"


@pytest.fixture
def nf4_model() -> nn.Module:
    """A fresh NF4 tiny model for each test: tests change it (LoRA layers, train mode), and none may see another's."""
    return load_model(TINY, "float32", "cpu", quantization="nf4")


def test_decoder_linears_are_nf4_and_media_projections_are_not(nf4_model) -> None:
    reference = build_tiny()[0]
    decoder = {n: m for n, m in nf4_model.named_modules() if ".language_model.layers." in f".{n}"
               and isinstance(m, nn.Linear)}
    assert decoder and all(isinstance(m, Linear4bit) for m in decoder.values())
    for name in ("model.embed_vision.patch_dense", "model.embed_vision.multimodal_embedder.embedding_projection",
                 "model.embed_audio.embedding_projection"):
        assert type(nf4_model.get_submodule(name)) is nn.Linear, name
    # Dequantized weights stay close to the originals (NF4 keeps 16 levels per block of 64 values).
    for name in ("model.language_model.layers.0.mlp.up_proj", "model.language_model.layers.5.self_attn.q_proj"):
        layer = nf4_model.get_submodule(name)
        restored = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        original = reference.get_submodule(name).weight
        assert torch.linalg.norm(restored - original) / torch.linalg.norm(original) < 0.12, name


def test_nf4_forward_equals_full_precision_with_dequantized_weights(nf4_model) -> None:
    """The 4-bit model computes what the fp32 model computes with each NF4 weight dequantized: an independent
    forward through plain nn.Linear layers, so only the quantized storage differs."""
    reference = build_tiny()[0]
    with torch.no_grad():
        for name, layer in nf4_model.named_modules():
            if isinstance(layer, Linear4bit):
                weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
                reference.get_submodule(name).weight.copy_(weight)
        ids = torch.tensor([[2, 10, 11, 12, 40, 41, 42, 43]])
        # In training mode, as QLoRA runs: in eval mode, on CPUs with AVX512-BF16, bitsandbytes 0.50 swaps in a
        # fused bf16 inference kernel that is about 1e-2 off.
        expected, got = reference.train()(input_ids=ids).logits, nf4_model.train()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_lora_lands_on_the_same_modules_as_without_quantization(nf4_model) -> None:
    lora = LoraSection(vision=True, audio=True)
    quantized = lora_modules(apply_lora(nf4_model, lora))
    assert quantized == lora_modules(apply_lora(build_tiny()[0], lora))
    assert "model.embed_vision.patch_dense" in quantized and "model.embed_audio.embedding_projection" in quantized


def test_qlora_training_run_learns(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", model={"quantization": "nf4"},
                          train={"max_steps": 30, "eval_every": 15, "save_every": 30})
    sections = yaml.safe_load(recipe.read_text())
    del sections["export"], sections["eval"]  # training alone
    recipe.write_text(yaml.safe_dump(sections))
    result = run_ft("train", str(recipe))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_last"] < 0.8 * summary["eval_loss_first"], summary
