"""ft's machinery for long rows and fast steps against references, on the tiny model and a padded batch with image
and audio rows: its chunked attention (ft.attention) against transformers' own eager attention, with query chunks
small enough that every row spans many chunks and the sliding window crosses chunk borders (same logits, same LoRA
gradients), its per-chunk masks against the dense mask, the tiled MLP (ft.tiling) against the untiled one, the
compiled decoder layers (ft.compiled) against eager ones, and the fused LoRA projections (ft.fused_lora) against
peft's own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from conftest import DEMO_DATA
from peft import LoraConfig, get_peft_model
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    or_masks,
    padding_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from ft import attention
from ft.data import load_rows
from ft.encode import collate, encode_row
from ft.compiled import compile_layers, compiled_graphs
from ft.fused_lora import fuse_lora_projections
from ft.lora import apply_lora, lora_modules
from ft.models import load_model
from ft.recipe import LoraSection
from ft.tiling import tile_mlps


@pytest.fixture(scope="module")
def batch(processor):
    rows = load_rows(DEMO_DATA / "train.jsonl")
    with_image = next(r for r in rows if r.media("image"))
    with_audio = next(r for r in rows if r.media("audio"))
    text = next(r for r in rows if not r.media("image") and not r.media("audio"))
    encoded = [encode_row(r, processor) for r in (with_image, text, with_audio)]
    assert len({int(e["input_ids"].numel()) for e in encoded}) == 3  # right padding in the batch
    return collate(encoded, processor.tokenizer.pad_token_id)


def lora_model(tiny, implementation: str, base: torch.nn.Module | None = None,
               lora: LoraSection = LoraSection(r=4)) -> torch.nn.Module:
    model = copy.deepcopy(tiny[0]).float() if base is None else base
    model.set_attn_implementation(implementation)
    torch.manual_seed(0)
    model = apply_lora(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # nonzero B, so the LoRA path is part of the comparison
    return model


def forward_backward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Logits at real tokens, the loss and every LoRA gradient."""
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits[batch["attention_mask"].bool()].detach(), out.loss.item(), grads


def assert_same(result: tuple, reference: tuple) -> None:
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = result, reference
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4), (logits - ref_logits).abs().max()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6, rtol=1e-3), name


@pytest.mark.parametrize("kept", [True, False], ids=["masks-kept", "chunks-recomputed"])
def test_chunked_attention_equals_eager(tiny, batch, monkeypatch, kept: bool) -> None:
    """Under gradient checkpointing, with the chunks' masks kept for the backward pass or each chunk recomputed
    there (long rows' masks past `KEPT_MASKS_BYTES`)."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)  # the sliding window is 64: it spans several chunks
    monkeypatch.setattr(attention, "KEPT_MASKS_BYTES", attention.KEPT_MASKS_BYTES if kept else 0)
    recomputed = []
    monkeypatch.setattr(attention, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    assert batch["input_ids"].shape[1] > 5 * attention.QUERY_CHUNK
    reference, model = lora_model(tiny, "eager"), lora_model(tiny, attention.register())
    for m in (reference, model):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(forward_backward(model, batch), forward_backward(reference, batch))
    assert bool(recomputed) != kept


def test_tiled_mlp_equals_untiled(tiny, batch) -> None:
    reference = forward_backward(lora_model(tiny, "eager"), batch)
    model = lora_model(tiny, "eager")
    assert tile_mlps(model, tile=24) == 6  # every decoder layer's MLP, each row cut into several tiles
    assert batch["input_ids"].shape[1] > 3 * 24
    assert_same(forward_backward(model, batch), reference)


def test_compiled_layers_equal_eager_without_recompiling(tiny, batch) -> None:
    """Compiled layers under gradient checkpointing give eager's logits, loss and LoRA gradients on the padded
    image/audio batch (chunked attention) and on a plain text row (one causal call), and a row of a new length
    compiles nothing more: the graphs are shape-dynamic. Traced with "aot_eager" here (Dynamo and AOTAutograd, as on
    the GPU; Inductor's code generation is torch's own and runs on the GPU in tests/test_gpu.py)."""
    end = int(batch["attention_mask"][1].sum())  # the text row, unpadded, and its last tokens (the answer's among
    assert 16 < end <= 64  # them): both within the sliding window, so both take the plain causal attention
    text, longer = ({key: batch[key][1:2, end - length : end] for key in ("input_ids", "attention_mask", "labels")}
                    for length in (end - 8, end))
    eager, compiled = (lora_model(tiny, attention.register()) for _ in range(2))
    for model in (eager, compiled):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert compile_layers(compiled, backend="aot_eager") == 6
    for inputs in (batch, text):
        for model in (eager, compiled):
            model.zero_grad()
        assert_same(forward_backward(compiled, inputs), forward_backward(eager, inputs))
    graphs = compiled_graphs()
    compiled.zero_grad()
    eager.zero_grad()
    assert_same(forward_backward(compiled, longer), forward_backward(eager, longer))
    assert compiled_graphs() == graphs


@pytest.mark.parametrize("base", ["float32", "nf4"])
def test_fused_lora_projections_equal_peft(tiny, batch, base) -> None:
    """Every LoRA projection as one fused autograd node gives peft's logits, loss and LoRA gradients on the padded
    image/audio batch under gradient checkpointing, with LoRA on the image and audio projections too, over a float32
    base and over an NF4 base (bitsandbytes' CPU kernels); under bfloat16 autocast it stays within bfloat16's
    rounding of peft's; a projection with dropout keeps peft's forward."""
    lora = LoraSection(r=4, vision=True, audio=True)

    def model() -> torch.nn.Module:
        source = None if base == "float32" else load_model("tiny-random:gemma4-unified", "float32", "cpu", "nf4")
        built = lora_model(tiny, attention.register(), source, lora)
        built.train()
        built.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return built

    reference, fused = model(), model()
    assert fuse_lora_projections(fused) == len(lora_modules(fused)) > 40
    assert_same(forward_backward(fused, batch), forward_backward(reference, batch))
    for m in (reference, fused):
        m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = (forward_backward(m, batch)
                                                                    for m in (fused, reference))
    assert logits.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads.values())
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, grad in grads.items():
        assert torch.linalg.norm(grad - ref_grads[name]) <= 0.05 * torch.linalg.norm(ref_grads[name]), name
    assert fuse_lora_projections(lora_model(tiny, "eager", lora=LoraSection(r=4, dropout=0.1))) == 0


def test_fused_lora_follows_every_update_of_the_weights() -> None:
    """The fused projection's bfloat16 copies of A and B (cast once per optimizer step) follow AdamW's steps and any
    other in-place change: after each, the fused forward equals peft's on the same weights, and differs from the one
    before the update."""
    torch.manual_seed(0)
    reference = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 16)),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    fused = copy.deepcopy(reference)
    assert fuse_lora_projections(fused) == 1
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (reference, fused)]
    x = torch.randn(3, 5, 32)
    before = None
    for update in ("adamw", "adamw", "in place", "none: the last check"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = [m(x) for m in (reference, fused)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-2, atol=2e-2)
        assert before is None or not torch.allclose(outputs[1], before, atol=1e-2)
        before = outputs[1].detach()
        if update == "adamw":
            for out, optimizer in zip(outputs, optimizers):
                out.float().square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        elif update == "in place":
            with torch.no_grad():
                for m in (reference, fused):
                    m.base_model.model[0].lora_B["default"].weight.mul_(-2)


def test_chunk_masks_tile_the_dense_mask() -> None:
    """Every chunk's mask, put back at its key span, rebuilds transformers' dense mask (sliding window, padding and
    a bidirectional block that reaches past the window), and nothing outside the spans is allowed."""
    length, window = 50, 8
    blocks = torch.full((2, length), -1)
    blocks[0, 10:30] = 0  # an image of 20 tokens: attends both ways, beyond the 8-token window
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, 41:] = False
    function = or_masks(sliding_window_causal_mask_function(window), blockwise_overlay(blocks))
    dense = sdpa_mask(batch_size=2, q_length=length, kv_length=length, mask_function=function, attention_mask=padding,
                      allow_is_causal_skip=False, use_vmap=True)
    chunked = attention.chunked_mask(batch_size=2, q_length=length, kv_length=length, mask_function=function,
                                     attention_mask=padding, chunk=7)
    rebuilt = torch.zeros_like(dense)
    for c in chunked.chunks:
        rebuilt[:, :, c.q_start : c.q_end, c.k_start : c.k_end] = c.allowed
    assert torch.equal(rebuilt, dense)
    assert not chunked.causal
    assert max(c.k_end - c.k_start for c in chunked.chunks) < length  # a chunk sees a span, not every key
    plain = attention.chunked_mask(batch_size=1, q_length=length, kv_length=length,
                                   mask_function=and_masks(
                                       padding_mask_function(torch.ones(1, length, dtype=torch.bool)),
                                       lambda b, h, q, k: k <= q))
    assert plain.causal


def test_chunk_masks_hold_memory_linear_in_length() -> None:
    """What the masks of a step keep grows with length x (chunk + window), not length x length: each chunk owns its
    span's entries (no view into its row over every key), and a plain causal mask keeps no chunks at all."""
    length, window, chunk = 4096, 64, 64
    sliding = attention.chunked_mask(batch_size=1, q_length=length, kv_length=length, chunk=chunk,
                                     mask_function=sliding_window_causal_mask_function(window))
    held = sum(c.allowed.untyped_storage().nbytes() for c in sliding.chunks)
    assert held <= length * (chunk + window) < length * length // 16
    causal = attention.chunked_mask(batch_size=1, q_length=length, kv_length=length, chunk=chunk)
    assert causal.causal and causal.chunks == []
