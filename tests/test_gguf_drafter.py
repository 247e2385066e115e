"""The MTP drafter GGUF: parsed with gguf, loaded by llama.cpp as `gemma4-assistant`, and one draft step run against
the target's KV cache compared with transformers. Also checks that the tiny drafter assists the tiny target in
transformers itself."""

from __future__ import annotations

import copy
import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ft.tiny import build_tiny
from ft.tiny_drafter import build_tiny_drafter, save_tiny_drafter
from quantize.gguf_drafter import check_against_target, write_drafter
from quantize.gguf_lm import write_language_model
from quantize.gguf_vocab import GGUFConversionError

llama_cpp = pytest.importorskip("llama_cpp")
ext = pytest.importorskip("llama_cpp.llama_cpp_ext")

GGML_TYPE_F32 = 0
PROMPT = "Hello, how are you? I am fine, thank you."
# The tiny target's logits already differ from transformers by ~2e-3 (ggml's GELU table), the draft inherits that.
TOLERANCE = 1e-2

_silent_log = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept alive for the C side


@pytest.fixture(scope="module")
def models():
    """(target, drafter, processor) in memory, identical to the checkpoints below."""
    target, processor = build_tiny()
    return target, build_tiny_drafter(target.config), processor


@pytest.fixture(scope="module")
def files(tmp_path_factory, models) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("drafter")
    target, _, processor = models
    target.save_pretrained(work / "tiny")
    processor.save_pretrained(work / "tiny")
    drafter_dir = save_tiny_drafter(work / "drafter")
    return {
        "target": work / "tiny",
        "drafter_bf16": write_drafter(drafter_dir, work / "tiny", work / "drafter-BF16.gguf", "BF16"),
        "drafter_f32": write_drafter(drafter_dir, work / "tiny", work / "drafter-F32.gguf", "F32"),
        "lm_f32": write_language_model(work / "tiny", work / "lm-F32.gguf", "F32"),
    }


@pytest.fixture(scope="module")
def llama():
    llama_cpp.llama_log_set(_silent_log, None)
    llama_cpp.llama_backend_init()
    return llama_cpp


def _load(path: Path) -> int:
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path.name}"
    return model


def _meta(model: int, key: bytes) -> str:
    buffer = ctypes.create_string_buffer(128)
    assert llama_cpp.llama_model_meta_val_str(model, key, buffer, len(buffer)) >= 0
    return buffer.value.decode()


def test_drafter_file_layout(files, models):
    reader = gguf.GGUFReader(files["drafter_bf16"])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = "gemma4-assistant"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.embedding_length_out"] == models[0].config.text_config.hidden_size == 256
    assert fields[f"{arch}.embedding_length"] == 128
    assert fields[f"{arch}.block_count"] == fields[f"{arch}.nextn_predict_layers"] == 2
    # The target's last sliding layer has 128-wide heads and 1 KV head, its last full layer 256 and 1.
    assert (fields[f"{arch}.attention.key_length_swa"], fields[f"{arch}.attention.key_length"]) == (128, 256)
    assert fields[f"{arch}.attention.head_count_kv"] in (1, [1, 1])
    assert fields[f"{arch}.attention.sliding_window_pattern"] == [True, False]
    assert reader.fields[f"{arch}.embedding_length_out"].types == [gguf.GGUFValueType.UINT32]
    target_tokens = gguf.GGUFReader(files["lm_f32"]).fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.tokens"] == target_tokens and len(target_tokens) == 1024

    tensors = {t.name: t for t in reader.tensors}
    per_layer = ("attn_norm", "attn_q", "attn_q_norm", "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down", "post_ffw_norm", "layer_output_scale")
    expected = {"token_embd.weight", "output_norm.weight", "nextn.pre_projection.weight",
                "nextn.post_projection.weight", "rope_freqs.weight"}
    expected |= {f"blk.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert set(tensors) == expected
    assert tensors["nextn.pre_projection.weight"].shape.tolist() == [512, 128]
    assert tensors["nextn.post_projection.weight"].shape.tolist() == [128, 256]
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["blk.1.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    rope = np.array([1.0] * 32 + [1e30] * 96, dtype=np.float32)  # 0.25 of the 128 frequency pairs rotate
    np.testing.assert_array_equal(np.asarray(tensors["rope_freqs.weight"].data), rope)
    scale = np.asarray(tensors["blk.1.layer_output_scale.weight"].data)
    np.testing.assert_array_equal(scale, models[1].model.layers[1].layer_scalar.numpy())


def test_llama_cpp_loads_drafter_as_gemma4_assistant(files, llama):
    model = _load(files["drafter_bf16"])
    try:
        assert _meta(model, b"general.architecture") == "gemma4-assistant"
        assert llama.llama_model_n_layer_nextn(model) == 2
        assert (llama.llama_model_n_embd(model), llama.llama_model_n_embd_out(model)) == (128, 256)
    finally:
        llama.llama_model_free(model)


def test_draft_step_on_target_kv_matches_transformers(files, models, llama):
    """Target decodes the prompt; the drafter (context linked by ctx_other) drafts from its KV and hidden state."""
    target, drafter, processor = models
    ids = processor.tokenizer(PROMPT, return_tensors="pt").input_ids[0].tolist()
    prompt, last = ids[:-1], ids[-1]
    actual_logits, actual_h = _llama_draft_step(files["lm_f32"], files["drafter_f32"], prompt, last)

    with torch.no_grad():
        out = target(input_ids=torch.tensor([prompt]), output_hidden_states=True, return_shared_kv_states=True)
        inputs = torch.cat([target.get_input_embeddings()(torch.tensor([[last]])), out.hidden_states[-1][:, -1:]], -1)
        draft = drafter(
            inputs_embeds=inputs,
            position_ids=torch.tensor([[len(prompt)]]),
            shared_kv_states=out.shared_kv_states,
            attention_mask=torch.ones(1, len(prompt) + 1, dtype=torch.long),
        )
    expected_logits, expected_h = draft.logits[0, 0].numpy(), draft.last_hidden_state[0, 0].numpy()
    assert np.abs(actual_logits - expected_logits).max() < TOLERANCE * np.abs(expected_logits).max()
    assert np.abs(actual_h - expected_h).max() < TOLERANCE * np.abs(expected_h).max()
    assert actual_logits.argmax() == expected_logits.argmax()


def _llama_draft_step(lm_path: Path, drafter_path: Path, prompt: list[int], last: int) -> tuple[np.ndarray, np.ndarray]:
    """(draft logits, draft h) for token `last` at position len(prompt), as llama.cpp's MTP loop computes them."""
    target_model, drafter_model = _load(lm_path), _load(drafter_path)
    target_ctx = llama_cpp.llama_init_from_model(target_model, _context_params(128, len(prompt)))
    params = _context_params(llama_cpp.llama_n_ctx(target_ctx), 1)
    # The drafter has no KV of its own: it needs the target context to read from.
    params.ctx_type, params.ctx_other, params.n_rs_seq = llama_cpp.LLAMA_CONTEXT_TYPE_MTP, target_ctx, 0
    drafter_ctx = llama_cpp.llama_init_from_model(drafter_model, params)
    width = llama_cpp.llama_model_n_embd_out(target_model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(target_model))
    target_batch, drafter_batch = llama_cpp.llama_batch_init(len(prompt), 0, 1), llama_cpp.llama_batch_init(1, width, 1)
    token = (llama_cpp.llama_token * 1)(last)
    try:
        assert target_ctx and drafter_ctx
        ext.llama_set_embeddings_nextn(target_ctx, True, False)  # export h for every target row
        ext.llama_set_embeddings_nextn(drafter_ctx, True, True)
        for i, t in enumerate(prompt):
            _set_row(target_batch, i, t, i)
        target_batch.n_tokens = len(prompt)
        assert llama_cpp.llama_decode(target_ctx, target_batch) == 0
        h = ext.llama_get_embeddings_nextn_ith(target_ctx, len(prompt) - 1)
        # A drafter row carries both a token and an embedding: attach a Python-owned token array.
        drafter_batch.token = ctypes.cast(token, ctypes.POINTER(llama_cpp.llama_token))
        ctypes.memmove(drafter_batch.embd, h, width * ctypes.sizeof(ctypes.c_float))
        _set_row(drafter_batch, 0, last, len(prompt))
        drafter_batch.n_tokens = 1
        assert llama_cpp.llama_decode(drafter_ctx, drafter_batch) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(drafter_ctx, 0), shape=(n_vocab,)).copy()
        h_next = np.ctypeslib.as_array(ext.llama_get_embeddings_nextn_ith(drafter_ctx, 0), shape=(width,)).copy()
        return logits, h_next
    finally:
        drafter_batch.token = ctypes.POINTER(llama_cpp.llama_token)()  # llama_batch_free must not free it
        llama_cpp.llama_batch_free(drafter_batch)
        llama_cpp.llama_batch_free(target_batch)
        llama_cpp.llama_free(drafter_ctx)  # before the target context it reads from
        llama_cpp.llama_free(target_ctx)
        llama_cpp.llama_model_free(drafter_model)
        llama_cpp.llama_model_free(target_model)


def _context_params(n_ctx: int, n_batch: int):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_threads = params.n_threads_batch = 2
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    # F32 KV cache and no flash attention (which computes in F16): on this random model, whose attention logits are
    # large (Gemma 4 scales them by 1.0), either F16 path alone moves the target's own logits by ~2e-2 relative.
    params.type_k = params.type_v = GGML_TYPE_F32
    return params


def _set_row(batch, i: int, token: int, position: int) -> None:
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, 1
    batch.seq_id[i][0] = 0


def test_tiny_drafter_assists_tiny_target_in_transformers(models):
    target, drafter, processor = models
    calls = []
    handle = drafter.register_forward_hook(lambda *_: calls.append(1))
    ids = processor.tokenizer(PROMPT, return_tensors="pt").input_ids
    try:
        plain = target.generate(ids, max_new_tokens=6, do_sample=False)
        assisted = target.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=drafter)
    finally:
        handle.remove()
    assert calls, "generate() did not use the drafter"
    assert assisted.tolist() == plain.tolist()


def test_drafter_must_match_target_geometry(models):
    target, drafter, _ = models
    wider = copy.deepcopy(target.config.text_config)
    wider.hidden_size = 512
    with pytest.raises(GGUFConversionError, match="backbone_hidden_size"):
        check_against_target(drafter.config, wider)
    narrower_heads = copy.deepcopy(target.config.text_config)
    narrower_heads.head_dim = 64  # the sliding layers' width: the drafter's sliding layer would read 64-wide KV
    with pytest.raises(GGUFConversionError, match="target layer 4"):
        check_against_target(drafter.config, narrower_heads)
