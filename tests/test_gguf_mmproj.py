"""The projector GGUF: parsed with gguf, and run by llama.cpp's mtmd against transformers' own embeddings.

The checkpoint is the tiny model with randomised vision LayerNorms (its defaults are all ones/zeros, which would
hide a wrong permutation of patch_ln1).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ft.tiny import build_tiny
from quantize.gguf_lm import write_language_model
from quantize.gguf_mmproj import patch_permutation, write_projector
from quantize.gguf_vocab import GGUFConversionError

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

# 7×10 patches of 48 px = 70 soft tokens: Hugging Face (max_soft_tokens=70) keeps this size exactly, and so does
# llama.cpp (it only resizes outside 70..1120 tokens), so both see the same pixels in the same patch grid.
IMAGE_HEIGHT, IMAGE_WIDTH, SOFT_TOKENS = 336, 480, 70
# Not a multiple of 640 samples: both sides zero-pad the last 40 ms frame.
AUDIO_SAMPLES = 16000 + 123
# Max abs error relative to the largest reference value: F32 is exact up to summation order, F16 about bf16-level.
TOLERANCE = {"F32": 1e-4, "F16": 8e-3}
TEXT_CHUNK = 0  # mtmd chunk types: 0 text, 1 image, 2 audio

_silent_log = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept alive for the C side


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """(checkpoint dir, the same model in memory, processor)."""
    model, processor = build_tiny()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embed = model.model.embed_vision
        for norm in (embed.patch_ln1, embed.patch_ln2, embed.pos_norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator))
    directory = tmp_path_factory.mktemp("mmproj") / "tiny"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


@pytest.fixture(scope="module")
def projectors(tiny_checkpoint) -> dict[str, Path]:
    directory = tiny_checkpoint[0]
    return {t: write_projector(directory, directory.parent / f"mmproj-{t}.gguf", t) for t in TOLERANCE}


class Mtmd:
    """A llama.cpp text model plus one mtmd context per projector file; returns embeddings of one media item."""

    def __init__(self, lm_path: Path, paths: dict[str, Path]) -> None:
        llama_cpp.llama_log_set(_silent_log, None)
        mtmd.mtmd_log_set(_silent_log, None)
        mtmd.mtmd_helper_log_set(_silent_log, None)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(lm_path).encode(), llama_cpp.llama_model_default_params())
        assert self.model, "llama.cpp could not load the language model GGUF"
        self.width = llama_cpp.llama_model_n_embd_inp(self.model)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
        self.contexts = {t: mtmd.mtmd_init_from_file(str(p).encode(), self.model, params) for t, p in paths.items()}
        assert all(self.contexts.values()), "mtmd could not load the projector GGUF"

    def close(self) -> None:
        for context in self.contexts.values():
            mtmd.mtmd_free(context)
        llama_cpp.llama_model_free(self.model)

    def image(self, out_type: str, pixels: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
        """(embeddings, text tokens of the chunks around them) for an (H, W, 3) uint8 image."""
        pixels = np.ascontiguousarray(pixels)
        height, width, _ = pixels.shape
        bitmap = mtmd.mtmd_bitmap_init(width, height, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        return self._embed(out_type, bitmap)

    def audio(self, out_type: str, samples: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        bitmap = mtmd.mtmd_bitmap_init_from_audio(len(samples), samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        return self._embed(out_type, bitmap)

    def _embed(self, out_type: str, bitmap: int) -> tuple[np.ndarray, list[list[int]]]:
        context, chunks = self.contexts[out_type], mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        text.text = mtmd.mtmd_default_marker()
        text.text_len, text.add_special, text.parse_special = len(text.text), False, True
        try:
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            assert mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text), bitmaps, 1) == 0
            embeddings, texts = None, []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == TEXT_CHUNK:
                    texts.append(_text_tokens(chunk))
                    continue
                assert mtmd.mtmd_encode_chunk(context, chunk) == 0
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                output = mtmd.mtmd_get_output_embd(context)
                # The buffer belongs to the context and is overwritten by the next encode.
                embeddings = np.ctypeslib.as_array(output, shape=(n * self.width,)).reshape(n, self.width).copy()
            return embeddings, texts
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)


def _text_tokens(chunk: int) -> list[int]:
    count = ctypes.c_size_t()
    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
    return [tokens[i] for i in range(count.value)]


@pytest.fixture(scope="module")
def runner(tiny_checkpoint, projectors):
    directory = tiny_checkpoint[0]
    lm_path = write_language_model(directory, directory.parent / "lm-F32.gguf", "F32")
    runner = Mtmd(lm_path, projectors)
    yield runner
    runner.close()


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_projector_file_layout(tiny_checkpoint, projectors):
    directory, model, _ = tiny_checkpoint
    reader = gguf.GGUFReader(projectors["F16"])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.vision.projector_type"] == "gemma4uv" and fields["clip.audio.projector_type"] == "gemma4ua"
    assert "clip.projector_type" not in fields and "clip.vision.projector.scale_factor" not in fields
    assert fields["clip.has_vision_encoder"] and fields["clip.has_audio_encoder"]
    assert fields["clip.vision.patch_size"] == 16
    assert fields["clip.vision.block_count"] == fields["clip.audio.block_count"] == 0
    assert (fields["clip.vision.embedding_length"], fields["clip.vision.projection_dim"]) == (256, 256)
    assert (fields["clip.audio.embedding_length"], fields["clip.audio.projection_dim"]) == (640, 256)
    assert fields["clip.vision.image_mean"] == [0.0, 0.0, 0.0] and fields["clip.vision.image_std"] == [1.0, 1.0, 1.0]
    assert reader.fields["clip.vision.patch_size"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["clip.vision.image_mean"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]

    tensors = {t.name: t for t in reader.tensors}
    layout = {name: (t.shape.tolist(), t.tensor_type.name) for name, t in tensors.items()}
    assert layout == {
        "v.patch_embd.weight": ([6912, 256], "F16"),
        "v.patch_embd.bias": ([256], "F32"),
        "v.patch_norm.1.weight": ([6912], "F32"),
        "v.patch_norm.1.bias": ([6912], "F32"),
        "v.patch_norm.2.weight": ([256], "F32"),
        "v.patch_norm.2.bias": ([256], "F32"),
        "v.patch_norm.3.weight": ([256], "F32"),
        "v.patch_norm.3.bias": ([256], "F32"),
        "v.position_embd.weight": ([256, 128, 2], "F32"),
        "mm.input_projection.weight": ([256, 256], "F16"),
        "mm.a.input_projection.weight": ([640, 256], "F16"),
    }

    # llama.cpp's input i = (channel 1, row 2, col 5) of the 48×48 patch; Hugging Face's index is pixel-major.
    i, j = 1 * 48 * 48 + 2 * 48 + 5, (2 * 48 + 5) * 3 + 1
    assert patch_permutation(48)[i] == j
    embed = model.model.embed_vision
    dense = np.asarray(tensors["v.patch_embd.weight"].data)  # numpy [out, in]
    np.testing.assert_array_equal(dense[:, i], embed.patch_dense.weight[:, j].detach().numpy().astype(np.float16))
    ln1 = np.asarray(tensors["v.patch_norm.1.weight"].data)
    assert ln1[i] == embed.patch_ln1.weight[j].item() and ln1[i] != ln1[j]
    positions = np.asarray(tensors["v.position_embd.weight"].data)  # (2, P, D): the x table, then the y table
    np.testing.assert_array_equal(positions[0, 3], embed.pos_embedding[3, 0].detach().numpy())
    np.testing.assert_array_equal(positions[1, 3], embed.pos_embedding[3, 1].detach().numpy())


@pytest.mark.parametrize("out_type", list(TOLERANCE))
def test_image_embedding_matches_transformers(tiny_checkpoint, runner, out_type):
    _, model, processor = tiny_checkpoint
    pixels = np.random.default_rng(0).integers(0, 256, size=(IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    actual, texts = runner.image(out_type, pixels)

    inputs = processor.image_processor(images=[pixels], max_soft_tokens=SOFT_TOKENS, return_tensors="pt")
    # llama.cpp orders soft tokens row-major over the 10×7 patch grid; so must the reference.
    columns = IMAGE_WIDTH // 48
    assert inputs["image_position_ids"][0].tolist() == [[i % columns, i // columns] for i in range(SOFT_TOKENS)]
    with torch.no_grad():
        expected = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output[0]
    assert _relative_error(actual, expected.numpy()) < TOLERANCE[out_type]
    ids = processor.tokenizer.convert_tokens_to_ids
    assert texts == [[ids("<|image>")], [ids("<image|>")]]


@pytest.mark.parametrize("out_type", list(TOLERANCE))
def test_audio_embedding_matches_transformers(tiny_checkpoint, runner, out_type):
    _, model, processor = tiny_checkpoint
    samples = (0.1 * np.random.default_rng(0).standard_normal(AUDIO_SAMPLES)).astype(np.float32)
    actual, texts = runner.audio(out_type, samples)

    features = processor.feature_extractor(samples, sampling_rate=16000, return_tensors="pt")
    frames = features["input_features"][0][features["input_features_mask"][0].bool()]
    assert len(frames) == -(-AUDIO_SAMPLES // 640)
    with torch.no_grad():
        expected = model.model.embed_audio(frames)
    assert _relative_error(actual, expected.numpy()) < TOLERANCE[out_type]
    ids = processor.tokenizer.convert_tokens_to_ids
    assert texts == [[ids("<|audio>")], [ids("<audio|>")]]


def test_unknown_out_type_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(GGUFConversionError, match="Q4_K_M"):
        write_projector(tiny_checkpoint[0], tmp_path / "x.gguf", "Q4_K_M")
    assert not list(tmp_path.iterdir())
