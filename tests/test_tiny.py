"""The tiny model factory: same architecture as Gemma 4 12B, deterministic, and loadable like a real checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ft.models import load_model, load_processor
from ft.tiny import build_tiny, save_tiny


def test_same_seed_same_weights_other_seed_differs(tiny):
    model, _ = tiny
    again, _ = build_tiny(seed=0)
    other, _ = build_tiny(seed=1)
    for (name, a), (_, b), (_, c) in zip(
        model.state_dict().items(), again.state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), other.state_dict().values()))


def test_architecture_matches_gemma4_unified(tiny):
    model, processor = tiny
    config = model.config
    text = config.text_config
    assert config.model_type == "gemma4_unified"
    assert {"sliding_attention", "full_attention"} == set(text.layer_types)
    assert text.layer_types[-1] == "full_attention" and text.attention_k_eq_v
    layers = model.model.language_model.layers
    for layer, kind in zip(layers, text.layer_types, strict=True):
        assert (layer.self_attn.v_proj is None) == (kind == "full_attention")
    # Rows that llama.cpp's K-quants will see are multiples of 256.
    for name, weight in model.named_parameters():
        if weight.ndim == 2 and "language_model.layers" in name:
            assert weight.shape[1] % 256 == 0, name
    assert model.model.embed_vision.patch_dense.in_features == 48 * 48 * 3
    assert model.model.embed_audio.embedding_projection.in_features == 640  # 40 ms of 16 kHz audio
    assert len(processor.tokenizer) == text.vocab_size


def test_image_only_and_audio_only_inputs_run(tiny):
    model, processor = tiny
    image = Image.new("RGB", (120, 80), "red")
    batch = processor(images=[[image]], return_tensors="pt")
    n_image = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image == int((batch["image_position_ids"][0] != -1).all(-1).sum()) > 0
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    audio = processor(audio=[np.zeros(16000, dtype=np.float32)], return_tensors="pt")
    assert int((audio["input_ids"] == model.config.audio_token_id).sum()) == 25  # 1 s at 40 ms a token
    with torch.no_grad():
        assert torch.isfinite(model(**audio).logits).all()


def test_saved_checkpoint_loads_through_the_real_path(tiny, tmp_path):
    """A local directory is what a real download looks like: load it the way users' models load."""
    model, processor = tiny
    directory = save_tiny(tmp_path / "gemma-4-tiny")
    loaded = load_model(str(directory), dtype="float32", device="cpu")
    loaded_processor = load_processor(str(directory), image_soft_tokens=70)
    text = "<|turn>user\nHello there<turn|>\n<|turn>model\n"
    ids = processor.tokenizer(text, return_tensors="pt")
    assert torch.equal(ids["input_ids"], loaded_processor.tokenizer(text, return_tensors="pt")["input_ids"])
    assert loaded_processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
