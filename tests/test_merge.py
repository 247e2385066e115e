"""The streamed merge against peft's unmerged adapter."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import Gemma4UnifiedForConditionalGeneration

from ft.lora import apply_lora
from ft.recipe import LoraSection
from ft.tiny import build_tiny, save_tiny
from quantize.merge import merge_lora


def test_merged_checkpoint_matches_base_plus_adapter(tmp_path, processor):
    base_dir = save_tiny(tmp_path / "base")
    model, _ = build_tiny()
    peft_model = apply_lora(model, LoraSection(r=4, alpha=8, vision=True, audio=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give it values so the merge has something to add
                param.normal_(std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")

    merged_dir = merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = Gemma4UnifiedForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
    unmerged = PeftModel.from_pretrained(build_tiny()[0], tmp_path / "adapter").eval()

    import numpy as np
    from PIL import Image

    inputs = [
        processor.tokenizer("<|turn>user\nWhat is 3 + 4?<turn|>\n<|turn>model\n", return_tensors="pt"),
        processor(images=[[Image.new("RGB", (96, 96), "red")]], return_tensors="pt"),
        processor(audio=[np.sin(np.linspace(0, 300, 6400)).astype(np.float32)], return_tensors="pt"),
    ]
    with torch.no_grad():
        for batch in inputs:
            expected = unmerged(**batch).logits
            with unmerged.disable_adapter():
                assert (unmerged(**batch).logits - expected).abs().max() > 1e-3  # the adapter matters here
            torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "processor_config.json").is_file()
