"""The language-model GGUF converter, checked by running its output in llama.cpp (llama-cpp-python's CPU build).

All tests share one tiny checkpoint converted once per type. Logits are compared on identical token ids (from
the Hugging Face tokenizer), so they test the weights and metadata; the tokenizer metadata is tested on its own.
The relative error of logits is max|a - b| / max|b| over the whole (tokens × vocab) array of one prompt (the tiny
model's attention temperature, `ft.tiny.temper_attention`, is what makes such comparisons meaningful).
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import Llama
from transformers import GemmaTokenizer

from ft.tiny import build_tiny
from quantize import gguf_lm
from quantize.checkpoint import Checkpoint
from quantize.gguf_lm import OUT_TYPES, write_language_model
from quantize.gguf_vocab import GGUFConversionError

N_CTX = 256
TEXT_PROMPTS = {
    "plain": "The quick brown fox jumps over the lazy dog.",
    "multilingual": "Привет, как дела? 你好，世界。 こんにちは\n\nNumbers: 0 1 2 3 4 5 6 7 8 9 10 11 12.",
    # Longer than the sliding window (64): a window off by one moves these logits by ~50 %.
    "long": " ".join(["Hello, how are you? I am fine, thank you."] * 10),
}
CHAT = [{"role": "user", "content": "What is 3 + 4?"}]
# The 14 tensors of a layer; k_eq_v full layers lack attn_v.
LAYER_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "post_attention_norm",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm", "layer_output_scale",
)
TOKENIZER_CASES = (
    "The quick brown fox jumps over the lazy dog.", "What is 3 + 4? 7.", "1234567890",
    "3.14159 2.71828", "(a + b) * [c - d] / {e}", "Hello, world! How's it going?", "quote \"this\" 'that'",
    "  leading spaces", "trailing spaces   ", "multiple   spaces  inside", " ", "   ",
    "\n", "\n\n", "\n\n\n\n", "line one\nline two\n\nline four", "end with newline\n", " \n \n ",
    "tab\tseparated\tvalues", "\t\tdouble tab",
    "emoji 😀🎉👍🏽", "👨‍👩‍👧‍👦 family", "你好，世界。", "こんにちは、世界。", "カタカナとひらがな", "مرحبا بالعالم",
    "नमस्ते दुनिया।", "Привет, как дела?", "Ünïcödé àccénts: café, naïve, façade", "¿Dónde está la biblioteca?",
    "Guten Tag, wie geht es Ihnen?", "안녕하세요", "mixed English и русский 和中文", "x" * 50,
    "<|turn>user\nHello there<turn|>\n<|turn>model\n",
    "<|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat colour?<turn|>\n"
    "<|turn>model\n<|channel>thought\n<channel|>Red.<turn|>",
    "<|image|>", "<|image><|image|><|image|><|image|><image|>", "<|audio>", "<|audio><|audio|><audio|>", "<|video|>",
    "<bos>text<eos>", "<|think|>", "<|tool><tool|>", "<|tool_call>call<tool_call|><|tool_response>ok<tool_response|>",
    '<|"|>quoted<|"|>', "a<pad>b<mask>c<unk>", "Describe the picture.\n<|image|>\nA red circle.", "<|turn", "turn|>",
)


@dataclass
class TinyLM:
    model: torch.nn.Module
    tokenizer: GemmaTokenizer
    checkpoint: Path
    ggufs: dict[str, Path]
    prompts: dict[str, list[int]]


def _token_ids(tokenizer: GemmaTokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id, *ids]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    model, processor = build_tiny()
    checkpoint = tmp_path_factory.mktemp("gguf_lm") / "tiny"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    ggufs = {t: write_language_model(checkpoint, checkpoint.parent / f"tiny-{t}.gguf", t) for t in OUT_TYPES}
    texts = {**TEXT_PROMPTS, "chat": processor.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)}
    prompts = {name: _token_ids(processor.tokenizer, text) for name, text in texts.items()}
    return TinyLM(model, processor.tokenizer, checkpoint, ggufs, prompts)


@pytest.fixture(scope="module", autouse=True)
def quiet_llama_cpp() -> Iterator[None]:
    """Drop llama.cpp's log lines (context set-up prints them even with verbose=False)."""
    silent = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(silent, None)
    yield
    llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, None)


@contextlib.contextmanager
def _llama(path: Path, **kwargs: object) -> Iterator[Llama]:
    """A llama.cpp model, closed afterwards, with CPU weight repacking off.

    On Intel AMX hosts (like this machine) the repacked Q8_0 matmul of this llama.cpp build segfaults as soon as a
    batch has more than one token (`ggml_backend_amx_mul_mat`); llama-cli's `--no-repack` does the same as this.
    """
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params() -> llama_cpp.llama_model_params:
        p = default_params()
        p.use_extra_bufts = False
        return p

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)
        model = Llama(model_path=str(path), verbose=False, **kwargs)
    try:
        yield model
    finally:
        model.close()


@pytest.fixture(scope="module")
def llama_logits(tiny_lm: TinyLM) -> dict[str, dict[str, np.ndarray]]:
    """{GGUF type: {prompt: logits}}, with an F32 KV cache so that only the weights differ between types."""
    out = {}
    for out_type, path in tiny_lm.ggufs.items():
        f32 = llama_cpp.GGML_TYPE_F32
        with _llama(path, logits_all=True, n_ctx=N_CTX, type_k=f32, type_v=f32) as model:
            out[out_type] = {name: _eval(model, ids) for name, ids in tiny_lm.prompts.items()}
    return out


def _eval(model: Llama, ids: list[int]) -> np.ndarray:
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)])


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("prompt", ["plain", "chat", "multilingual", "long"])
def test_f32_logits_match_transformers(tiny_lm: TinyLM, llama_logits: dict, prompt: str) -> None:
    ids = tiny_lm.prompts[prompt]
    with torch.no_grad():
        reference = tiny_lm.model(torch.tensor([ids])).logits[0].float().numpy()
    # Measured: 4.1e-4 to 4.6e-4 (an F16 KV cache, llama.cpp's default, gives 6.5e-4 to 8.2e-4).
    assert _rel_err(llama_logits["F32"][prompt], reference) < 1e-3


def test_chat_prompt_uses_turn_tokens(tiny_lm: TinyLM) -> None:
    assert tiny_lm.tokenizer.convert_tokens_to_ids("<|turn>") in tiny_lm.prompts["chat"]


@pytest.fixture(scope="module")
def llama_vocab(tiny_lm: TinyLM) -> Iterator[Llama]:
    with _llama(tiny_lm.ggufs["F32"], vocab_only=True) as model:
        yield model


@pytest.mark.parametrize("text", TOKENIZER_CASES, ids=lambda s: ascii(s)[1:25])
def test_tokenization_matches_transformers(tiny_lm: TinyLM, llama_vocab: Llama, text: str) -> None:
    ids = llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    # Byte tokens must decode to raw bytes and '▁' to spaces.
    assert llama_vocab.detokenize(ids, special=True) == text.encode()


@pytest.mark.parametrize("out_type", ["F16", "BF16", "Q8_0"])
def test_quantized_types_generate(tiny_lm: TinyLM, out_type: str) -> None:
    ids = tiny_lm.prompts["chat"]
    with _llama(tiny_lm.ggufs[out_type], logits_all=True, n_ctx=N_CTX) as model:
        logits = _eval(model, ids)
        continuation = []
        for _ in range(4):
            continuation.append(int(np.argmax(model.scores[model.n_tokens - 1])))
            model.eval(continuation[-1:])
        n_vocab = model.n_vocab()
    assert np.isfinite(logits).all() and logits.shape == (len(ids), n_vocab)
    assert len(continuation) == 4 and all(0 <= t < n_vocab for t in continuation)


def test_quantized_logits_are_close_to_f32_and_ordered_by_precision(llama_logits: dict) -> None:
    f32 = llama_logits["F32"]
    errors = {t: max(_rel_err(llama_logits[t][p], f32[p]) for p in f32) for t in ("F16", "BF16", "Q8_0")}
    # Measured: F16 1.9e-3, BF16 1.2e-2, Q8_0 3.6e-2 (llama.cpp also quantizes the activations for Q8_0 matmuls).
    assert errors["F16"] < errors["BF16"] < errors["Q8_0"] < 5e-2, errors


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_metadata_and_tensors_match_the_checkpoint(tiny_lm: TinyLM) -> None:
    reader = gguf.GGUFReader(tiny_lm.ggufs["F32"])
    text = tiny_lm.model.config.text_config
    sliding = [t == "sliding_attention" for t in text.layer_types]
    full = sliding.index(False)
    assert _field(reader, "general.architecture") == "gemma4"
    assert _field(reader, "general.name") == "tiny" and _field(reader, "general.file_type") == 0  # ALL_F32
    assert _field(reader, "gemma4.block_count") == text.num_hidden_layers == 6
    assert _field(reader, "gemma4.context_length") == text.max_position_embeddings
    assert _field(reader, "gemma4.attention.head_count") == text.num_attention_heads
    kv_heads = [text.per_layer_config[i].num_key_value_heads for i in range(6)]
    assert _field(reader, "gemma4.attention.head_count_kv") == kv_heads
    assert _field(reader, "gemma4.attention.key_length") == text.per_layer_config[full].head_dim == 256
    assert _field(reader, "gemma4.attention.key_length_swa") == text.per_layer_config[0].head_dim == 128
    assert _field(reader, "gemma4.rope.dimension_count") == 256
    assert _field(reader, "gemma4.rope.dimension_count_swa") == 128
    assert _field(reader, "gemma4.attention.sliding_window") == text.sliding_window == 64
    assert _field(reader, "gemma4.attention.sliding_window_pattern") == sliding
    assert _field(reader, "gemma4.rope.freq_base") == text.rope_parameters["full_attention"]["rope_theta"]
    assert _field(reader, "gemma4.rope.freq_base_swa") == text.rope_parameters["sliding_attention"]["rope_theta"]
    assert _field(reader, "gemma4.final_logit_softcapping") == text.final_logit_softcapping == 30.0
    assert _field(reader, "gemma4.embedding_length_per_layer_input") == 0

    names = {t.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(6) for t in LAYER_TENSORS if not (t == "attn_v" and i == full)
    }
    assert names == expected and len(reader.tensors) == 3 + 14 * 5 + 13
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(tensors["rope_freqs.weight"].data, np.float32([1.0] * 32 + [1e30] * 96))
    embedding = Checkpoint(tiny_lm.checkpoint).get("model.language_model.embed_tokens.weight").numpy()
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, embedding)


def test_token_types_and_quantized_tensor_types(tiny_lm: TinyLM) -> None:
    reader = gguf.GGUFReader(tiny_lm.ggufs["Q8_0"])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = dict(zip(tokens, _field(reader, "tokenizer.ggml.token_type"), strict=True))
    assert types["<|turn>"] == types["<turn|>"] == types["<|image|>"] == types["<bos>"] == gguf.TokenType.CONTROL
    assert types["<|channel>"] == types['<|"|>'] == gguf.TokenType.USER_DEFINED
    assert types["<0x0A>"] == gguf.TokenType.BYTE and types["▁the"] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokens.index("<bos>")
    qtypes = {t.name: t.tensor_type.name for t in reader.tensors}
    assert qtypes["blk.0.ffn_gate.weight"] == qtypes["token_embd.weight"] == "Q8_0"
    assert qtypes["blk.0.attn_q_norm.weight"] == qtypes["blk.0.layer_output_scale.weight"] == "F32"


def test_tensors_stream_one_block_at_a_time(tiny_lm: TinyLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint rows are read only while their own tensor is being written, in blocks, with identical output."""
    events: list[tuple[str, str]] = []
    read, write = gguf_lm._Shards.rows, gguf.GGUFWriter.write_tensor_data

    def recording_read(self: object, name: str, start: int, stop: int) -> np.ndarray:
        events.append(("read", name))
        return read(self, name, start, stop)

    def recording_write(self: gguf.GGUFWriter, tensor: gguf_lm._StreamedTensor) -> None:
        events.append(("begin", tensor.tensor.source if isinstance(tensor.tensor.source, str) else ""))
        write(self, tensor)
        events.append(("end", ""))

    monkeypatch.setattr(gguf_lm._Shards, "rows", recording_read)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", recording_write)
    monkeypatch.setattr(gguf_lm, "CHUNK_ELEMENTS", 1 << 14)  # 64 KiB blocks: the 1 MiB embedding takes 16
    out = write_language_model(tiny_lm.checkpoint, tmp_path / "tiny.gguf", "Q8_0")

    writing = None
    for kind, name in events:
        if kind == "read":
            assert name == writing, f"{name} read outside its own write"
        writing = name if kind == "begin" else None if kind == "end" else writing
    assert events.count(("read", "model.language_model.embed_tokens.weight")) == 16
    assert out.read_bytes() == tiny_lm.ggufs["Q8_0"].read_bytes()


def test_peak_memory_is_far_below_the_model_size(tiny_lm: TinyLM, tmp_path: Path) -> None:
    """numpy allocations peak near the largest tensor (1 MiB), not near all of them (15 MiB in F32)."""
    model_bytes = gguf.GGUFReader(tiny_lm.ggufs["F32"]).tensors
    total = sum(int(t.n_bytes) for t in model_bytes)
    tracemalloc.start()
    try:
        write_language_model(tiny_lm.checkpoint, tmp_path / "tiny.gguf", "BF16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total)


def test_unsupported_type_is_refused_before_writing(tiny_lm: TinyLM, tmp_path: Path) -> None:
    with pytest.raises(GGUFConversionError, match="Q4_K"):
        write_language_model(tiny_lm.checkpoint, tmp_path / "tiny.gguf", "Q4_K")
    assert not any(tmp_path.iterdir())
