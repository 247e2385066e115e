"""llama.cpp K/IQ quantization of the tiny model's GGUF, with ft's own importance matrix."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from conftest import DEMO_DATA
from gguf.quants import dequantize

from ft.data import load_rows
from ft.encode import collate, encode_row
from ft.tiny import save_tiny
from quantize.gguf_lm import write_language_model
from quantize.imatrix import (
    ImatrixError,
    collect_imatrix,
    gguf_tensor_name,
    normalized,
    read_imatrix_gguf,
    write_imatrix_gguf,
)
from quantize.llama_quant import NEEDS_IMATRIX, QUANT_TYPES, QuantizeError, quantize

THREADS = 2
PROMPT = b"What is 3 + 4? The answer is"


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("llama_quant")
    return write_language_model(save_tiny(work / "tiny"), work / "tiny-F32.gguf", "F32")


@pytest.fixture(scope="module")
def calibration(tiny) -> list[dict[str, torch.Tensor]]:
    """Four padded batches of demo rows with text, images and audio, encoded as training encodes them."""
    _, processor = tiny
    every = load_rows(DEMO_DATA / "train.jsonl")
    audio = [r for r in every if r.media("audio")][:4]
    image = [r for r in every if r.media("image") and not r.media("audio")][:4]
    text = [r for r in every if not r.media("image") and not r.media("audio")][:8]
    rows = [row for group in zip(text[:4], image, audio, text[4:]) for row in group]  # each batch: every kind
    return [
        collate([encode_row(row, processor) for row in rows[i : i + 4]], processor.tokenizer.pad_token_id)
        for i in range(0, len(rows), 4)
    ]


@pytest.fixture(scope="module")
def stats(tiny, calibration):
    return collect_imatrix(tiny[0], calibration, progress=False)


@pytest.fixture
def safe_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load models without llama.cpp's extra CPU buffer types.

    The AMX kernels of llama-cpp-python's CPU build segfault in llama_decode on quantized weights on this test
    machine (a KVM guest reporting AMX_INT8); F32/F16 and the plain CPU kernels are fine.
    """
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers() -> llama_cpp.llama_model_params:
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)


def weight_types(path: Path) -> dict[str, str]:
    """Type of every 2-D tensor (the ones llama.cpp quantizes) in a GGUF."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}


def relative_errors(quantized: Path, reference: Path) -> dict[str, float]:
    """RMS error of each dequantized 2-D weight, relative to the weight's RMS in the F32 file."""
    ref = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(reference).tensors}
    errors = {}
    for t in gguf.GGUFReader(quantized).tensors:
        if len(t.shape) == 2:
            w = ref[t.name]
            errors[t.name] = float(np.sqrt(np.mean((dequantize(t.data, t.tensor_type) - w) ** 2) / np.mean(w**2)))
    return errors


def greedy_continuation(path: Path, steps: int = 8) -> list[int]:
    """Argmax-decode `steps` tokens after PROMPT with llama.cpp.

    One thread: the tiny model needs no more, and llama.cpp's spinning OpenMP barriers crawl on a busy machine.
    """
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(llm.tokenize(PROMPT))
        tokens: list[int] = []
        for _ in range(steps):
            logits = llm.scores[llm.n_tokens - 1]
            assert np.isfinite(logits).all()
            tokens.append(int(np.argmax(logits)))
            llm.eval(tokens[-1:])
        return tokens
    finally:
        llm.close()


def test_type_table_matches_llama_cpp():
    constant = {name: f"LLAMA_FTYPE_MOSTLY_{name}" for name in QUANT_TYPES} | {"F32": "LLAMA_FTYPE_ALL_F32"}
    assert QUANT_TYPES == {name: getattr(llama_cpp, constant[name]) for name in QUANT_TYPES}
    brief = "Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_L Q3_K_M Q3_K_S Q2_K Q2_K_S IQ4_XS IQ4_NL IQ3_M IQ3_S IQ3_XS"
    assert set(f"{brief} IQ3_XXS IQ2_M IQ2_S IQ2_XS IQ2_XXS IQ1_M IQ1_S BF16 F16 Q4_0".split()) < QUANT_TYPES.keys()
    assert NEEDS_IMATRIX < QUANT_TYPES.keys()


@pytest.mark.parametrize("qtype", sorted(NEEDS_IMATRIX))
def test_llama_cpp_itself_refuses_needs_imatrix_types(f32_gguf: Path, tmp_path: Path, qtype: str):
    """NEEDS_IMATRIX agrees with llama.cpp: called directly (without ft's check), it refuses each of them."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = THREADS
    out = tmp_path / "out.gguf"
    assert llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), ctypes.byref(params)) != 0


@pytest.mark.parametrize(
    "qtype, main, allowed, max_error",
    [("Q8_0", "Q8_0", {"Q8_0"}, 0.01), ("Q6_K", "Q6_K", {"Q6_K"}, 0.03), ("Q4_K_M", "Q4_K", {"Q4_K", "Q6_K"}, 0.1)],
)
def test_k_quants_load_and_generate(f32_gguf, tmp_path, safe_decode, qtype, main, allowed, max_error):
    out = quantize(f32_gguf, tmp_path / f"tiny-{qtype}.gguf", qtype, threads=THREADS)

    types = weight_types(out)
    # Rows are multiples of 256, so no tensor may fall back to another block type (Q8_0, Q5_0, IQ4_NL, ...).
    assert set(types.values()) <= allowed, Counter(types.values())
    assert Counter(types.values()).most_common(1)[0][0] == main
    reader = gguf.GGUFReader(out)
    assert all(t.tensor_type.name == "F32" for t in reader.tensors if len(t.shape) == 1)
    assert reader.fields["general.file_type"].contents() == QUANT_TYPES[qtype]
    assert max(relative_errors(out, f32_gguf).values()) < max_error

    tokens = greedy_continuation(out)
    assert len(tokens) == 8 and all(0 <= t < 1024 for t in tokens)


@pytest.mark.parametrize("qtype, max_error", [("IQ3_XXS", 0.3), ("IQ2_XXS", 0.45)])
def test_iq_quants_with_ft_imatrix(f32_gguf, tmp_path, safe_decode, stats, qtype, max_error):
    out = quantize(f32_gguf, tmp_path / f"tiny-{qtype}.gguf", qtype, imatrix=normalized(stats), threads=THREADS)

    assert Counter(weight_types(out).values()).most_common(1)[0][0] == qtype
    assert max(relative_errors(out, f32_gguf).values()) < max_error
    assert len(greedy_continuation(out)) == 8


@pytest.mark.parametrize("qtype", ["IQ3_XXS", "IQ2_XXS"])
def test_iq_quants_without_imatrix_fail_clearly(f32_gguf, tmp_path, qtype):
    with pytest.raises(QuantizeError, match=f"^{qtype} needs an importance matrix: enable export.imatrix"):
        quantize(f32_gguf, tmp_path / "out.gguf", qtype, threads=THREADS)
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_failures_become_quantize_errors(f32_gguf, tmp_path):
    # ft's own check passes (Q4_K_M needs no imatrix); llama.cpp refuses the IQ3_XXS override and says why.
    with pytest.raises(QuantizeError, match=r"requires an importance matrix.*offending tensor: blk\.0\.ffn_down"):
        quantize(f32_gguf, tmp_path / "out.gguf", "Q4_K_M", tensor_types={"ffn_down": "IQ3_XXS"}, threads=THREADS)
    not_gguf = tmp_path / "config.json"
    not_gguf.write_text("{}")
    with pytest.raises(QuantizeError, match="failed to load model"):
        quantize(not_gguf, tmp_path / "out.gguf", "Q8_0", threads=THREADS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no output, no leftover temporary


def test_bad_type_names_are_rejected(f32_gguf, tmp_path):
    with pytest.raises(QuantizeError, match="unknown quantization type 'Q4_K_X'"):
        quantize(f32_gguf, tmp_path / "out.gguf", "Q4_K_X")
    with pytest.raises(QuantizeError, match="unknown tensor type 'Q9'"):
        quantize(f32_gguf, tmp_path / "out.gguf", "Q4_K_M", tensor_types={"ffn_down": "Q9"})
    # ggml would abort the whole process here: the embedding table never has imatrix data.
    with pytest.raises(QuantizeError, match="token_embd.weight has no importance matrix"):
        quantize(f32_gguf, tmp_path / "out.gguf", "Q4_K_M", tensor_types={"token_embd": "IQ2_XXS"}, imatrix={})


def test_tensor_type_overrides(f32_gguf, tmp_path):
    overrides = {"token_embd.weight": "Q8_0", r"blk\.\d+\.ffn_down": "q5_k"}
    out = quantize(f32_gguf, tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M", tensor_types=overrides, threads=THREADS)

    types = weight_types(out)
    assert types.pop("token_embd.weight") == "Q8_0"
    assert {types.pop(f"blk.{i}.ffn_down.weight") for i in range(6)} == {"Q5_K"}
    assert set(types.values()) <= {"Q4_K", "Q6_K"}


def test_imatrix_steers_the_iq_quantization(f32_gguf, tmp_path, stats):
    """Another matrix gives other bytes, and ft's matrix gives the lowest error where the data puts its weight."""
    values = normalized(stats)
    rng = np.random.default_rng(0)
    skewed = {name: v * rng.uniform(0.01, 100.0, v.shape).astype(np.float32) for name, v in values.items()}
    ours = quantize(f32_gguf, tmp_path / "ours.gguf", "IQ2_XXS", imatrix=values, threads=THREADS)
    again = quantize(f32_gguf, tmp_path / "again.gguf", "IQ2_XXS", imatrix=values, threads=THREADS)
    other = quantize(f32_gguf, tmp_path / "other.gguf", "IQ2_XXS", imatrix=skewed, threads=THREADS)

    assert ours.read_bytes() == again.read_bytes()  # deterministic, so a difference comes from the matrix
    assert ours.read_bytes() != other.read_bytes()

    reference = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(f32_gguf).tensors}

    def weighted_errors(path: Path) -> dict[str, float]:
        return {
            t.name: float(np.sum((dequantize(t.data, t.tensor_type) - reference[t.name]) ** 2 * values[t.name]))
            for t in gguf.GGUFReader(path).tensors
            if t.name in values
        }

    mine, theirs = weighted_errors(ours), weighted_errors(other)
    assert len(mine) == 41  # every blk weight got its matrix row
    assert all(mine[name] < theirs[name] for name in mine)


def test_statistics_match_an_independent_computation(tiny, calibration):
    model = tiny[0]
    captured: list[torch.Tensor] = []
    layer = model.model.language_model.layers[2].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().double()))
    try:
        stats = collect_imatrix(model, calibration, progress=False)
    finally:
        handle.remove()

    masks = [batch["attention_mask"].bool() for batch in calibration]
    expected = sum(x[mask].pow(2).sum(dim=0) for x, mask in zip(captured, masks, strict=True))
    sum2, count = stats["blk.2.ffn_down.weight"]
    assert sum2.dtype == np.float32 and sum2.shape == (512,)
    np.testing.assert_allclose(sum2, expected.numpy(), rtol=1e-5)
    tokens = sum(int(mask.sum()) for mask in masks)
    assert count == tokens < sum(mask.numel() for mask in masks)  # the batches are padded; padding is not counted

    patches = sum(int((b["image_position_ids"] != -1).all(-1).sum()) for b in calibration if "image_position_ids" in b)
    frames = sum(int(b["input_features_mask"].sum()) for b in calibration if "input_features_mask" in b)
    assert stats["mm.input_projection.weight"][1] == patches > 0
    assert stats["mm.a.input_projection.weight"][1] == frames > 0


def test_imatrix_names_match_the_gguf(f32_gguf, stats):
    """Every language-model entry names a real GGUF weight, with one value per input column (ne[0])."""
    columns = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(f32_gguf).tensors}
    blocks = {name: sum2 for name, (sum2, _) in stats.items() if name.startswith("blk.")}
    assert len(blocks) == 6 * 7 - 1  # the full-attention layer has no attn_v (k_eq_v)
    assert all(columns[name] == sum2.size for name, sum2 in blocks.items())
    assert gguf_tensor_name("model.language_model.layers.5.mlp.down_proj") == "blk.5.ffn_down.weight"
    projection = "model.embed_vision.multimodal_embedder.embedding_projection"
    assert gguf_tensor_name(projection) == "mm.input_projection.weight"
    assert gguf_tensor_name("model.embed_vision.patch_dense") is None


def test_normalized_is_the_mean_square():
    values = normalized({"w": (np.array([3.0, 0.0], np.float32), 3), "unseen": (np.zeros(2, np.float32), 0)})
    np.testing.assert_array_equal(values["w"], [1.0, 0.0])
    np.testing.assert_array_equal(values["unseen"], [1.0, 1.0])


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml_gguf() -> ctypes.CDLL:
    """ggml's own GGUF parser (llama-imatrix and llama-quantize read imatrix files with it), from the bindings."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _GGUFInitParams], ctypes.c_void_p),
        "gguf_free": ([ctypes.c_void_p], None),
        "gguf_find_key": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
        "gguf_get_kv_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_n": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_arr_str": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t], ctypes.c_char_p),
        "gguf_get_val_u32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_uint32),
        "gguf_get_val_str": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_get_tensor_name": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_tensor_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_tensor_ne": ([ctypes.c_void_p, ctypes.c_int64], ctypes.POINTER(ctypes.c_int64)),
        "gguf_get_tensor_offset": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_data_offset": ([ctypes.c_void_p], ctypes.c_size_t),
    }
    for name, (argtypes, restype) in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = restype
    return lib


GGUF_TYPE_UINT32, GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 4, 8, 9


def test_imatrix_gguf_round_trips_in_llama_cpp_layout(stats, tmp_path):
    path = write_imatrix_gguf(stats, tmp_path / "imatrix.gguf", [str(DEMO_DATA / "train.jsonl")], 4, 512)

    back = read_imatrix_gguf(path)
    assert list(back) == list(stats)
    for name, (sum2, count) in stats.items():
        np.testing.assert_array_equal(back[name][0], sum2)
        assert back[name][1] == count

    # Read it as common_imatrix_load does (common/imatrix-loader.cpp), with ggml's parser.
    lib = _ggml_gguf()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert ctx, "ggml cannot parse the file"
    try:
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")) == b"imatrix"
        assert lib.gguf_find_key(ctx, b"general.architecture") == -1  # as llama-imatrix writes it
        datasets = lib.gguf_find_key(ctx, b"imatrix.datasets")
        assert lib.gguf_get_kv_type(ctx, datasets) == GGUF_TYPE_ARRAY
        assert lib.gguf_get_arr_type(ctx, datasets) == GGUF_TYPE_STRING
        assert lib.gguf_get_arr_n(ctx, datasets) == 1
        assert lib.gguf_get_arr_str(ctx, datasets, 0) == str(DEMO_DATA / "train.jsonl").encode()
        for key, value in ((b"imatrix.chunk_count", 4), (b"imatrix.chunk_size", 512)):
            key_id = lib.gguf_find_key(ctx, key)
            assert lib.gguf_get_kv_type(ctx, key_id) == GGUF_TYPE_UINT32
            assert lib.gguf_get_val_u32(ctx, key_id) == value

        raw = path.read_bytes()
        names = [lib.gguf_get_tensor_name(ctx, i).decode() for i in range(lib.gguf_get_n_tensors(ctx))]
        assert names == [f"{name}{suffix}" for name in sorted(stats) for suffix in (".in_sum2", ".counts")]
        for i, name in enumerate(names):
            assert lib.gguf_get_tensor_type(ctx, i) == gguf.GGMLQuantizationType.F32
            ne = lib.gguf_get_tensor_ne(ctx, i)[:4]
            start = lib.gguf_get_data_offset(ctx) + lib.gguf_get_tensor_offset(ctx, i)
            data = np.frombuffer(raw, np.float32, count=int(np.prod(ne)), offset=start)
            weight = name.rsplit(".", 1)[0]
            if name.endswith(".in_sum2"):
                assert ne == [stats[weight][0].size, 1, 1, 1]
                np.testing.assert_array_equal(data, stats[weight][0])
            else:
                assert ne == [1, 1, 1, 1]
                assert round(float(data[0])) == stats[weight][1]
    finally:
        lib.gguf_free(ctx)


def test_reading_a_non_imatrix_file_fails_clearly(f32_gguf, tmp_path):
    with pytest.raises(ImatrixError, match="no imatrix entries"):
        read_imatrix_gguf(f32_gguf)
    with pytest.raises(ImatrixError, match="not found"):
        read_imatrix_gguf(tmp_path / "missing.gguf")


def test_llama_cpp_is_loaded_by_its_loader_only() -> None:
    """ft's packages, its training stage and its CLI import without loading llama.cpp (`ft train` loads it only to
    export); `quantize.llama_lib` loads it (see that module for why it is the only way in)."""
    code = (
        "import sys, ft, ft.cli, ft.train, quantize, quantize.gguf_lm, eval, eval.tasks\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'\n"
        "from quantize.llama_lib import llama_cpp\n"
        "print(llama_cpp.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["llama_cpp"]
