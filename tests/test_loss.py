"""ft's chunked loss over labelled positions equals transformers' own loss, and gives the same LoRA gradients, on a
real multimodal batch (text, image and audio rows of the demo data) through the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import DEMO_DATA

from ft.data import load_rows
from ft.encode import collate, encode_row
from ft.lora import apply_lora
from ft.loss import causal_lm_loss
from ft.recipe import LoraSection
from ft.tiny import build_tiny


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_and_gradients_match_transformers(chunk: int) -> None:
    model, processor = build_tiny()
    model = apply_lora(model, LoraSection(vision=True, audio=True))
    rows = load_rows(DEMO_DATA / "train.jsonl")
    kinds = {"image": None, "audio": None, "text": None}
    for row in rows:
        kind = "image" if row.media("image") else "audio" if row.media("audio") else "text"
        kinds[kind] = kinds[kind] or row
    batch = collate([encode_row(r, processor) for r in kinds.values()], processor.tokenizer.pad_token_id)
    assert "pixel_values" in batch and "input_features" in batch

    def lora_grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = model(**batch).loss  # transformers: full logits, softcap, shift, mean over labels
    expected = lora_grads(reference)
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
    ours = causal_lm_loss(hidden, causal_lm.lm_head, batch["labels"],
                          causal_lm.config.get_text_config().final_logit_softcapping, chunk=chunk)
    got = lora_grads(ours)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert expected.keys() == got.keys() and any(g.abs().sum() > 0 for g in got.values())
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
