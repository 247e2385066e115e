"""Gemma 4 unified image/audio projector → one llama.cpp `clip` GGUF (projector types `gemma4uv` + `gemma4ua`).

Gemma 4 unified has no vision or audio tower: images are cut into 48×48 patches that go through
LayerNorm → Linear → LayerNorm → +2-D position table → LayerNorm → RMSNorm → Linear, and audio is
raw 640-sample frames through RMSNorm → Linear. llama.cpp's mtmd runs the same graphs from this file; the
only value changes are the patch-pixel order (llama.cpp's im2col is channel-major, Hugging Face's patches
are pixel-major) and the layout of the position table (x table then y table).

The tensors are streamed one at a time from the checkpoint into the GGUF file (also used by `quantize.gguf_drafter`).

    >>> import tempfile, pathlib
    >>> from ft.tiny import save_tiny
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_projector(save_tiny(d / "tiny"), d / "mmproj.gguf", "F16").name
    'mmproj.gguf'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors import safe_open
from transformers import AutoConfig

from ft.atomic import staged_file
from quantize.checkpoint import Checkpoint
from quantize.gguf_lm import OUT_TYPES
from quantize.gguf_vocab import GGUFConversionError

VISION_PROJECTOR = "gemma4uv"
AUDIO_PROJECTOR = "gemma4ua"
# Unused by gemma4uv (images keep their own size), but clip's loader requires the key.
DUMMY_IMAGE_SIZE = 224
# clip hard-codes gemma4uv's patch merge (HF pooling_kernel_size); its patch is 3× the GGUF patch_size.
GEMMA4UV_MERGE = 3
_VISION, _AUDIO = "model.embed_vision.", "model.embed_audio."
# (in-memory checkpoint name, GGUF name, value transform: see `_transforms`)
_PROJECTOR_TENSORS = (
    (_VISION + "patch_dense.weight", "v.patch_embd.weight", "patch_columns"),
    (_VISION + "patch_dense.bias", "v.patch_embd.bias", None),
    (_VISION + "patch_ln1.weight", "v.patch_norm.1.weight", "patch_vector"),
    (_VISION + "patch_ln1.bias", "v.patch_norm.1.bias", "patch_vector"),
    (_VISION + "patch_ln2.weight", "v.patch_norm.2.weight", None),
    (_VISION + "patch_ln2.bias", "v.patch_norm.2.bias", None),
    (_VISION + "pos_norm.weight", "v.patch_norm.3.weight", None),
    (_VISION + "pos_norm.bias", "v.patch_norm.3.bias", None),
    (_VISION + "pos_embedding", "v.position_embd.weight", "position_table"),
    (_VISION + "multimodal_embedder.embedding_projection.weight", "mm.input_projection.weight", None),
    (_AUDIO + "embedding_projection.weight", "mm.a.input_projection.weight", None),
)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its GGUF name, numpy shape, type, and how to produce its float data when written."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    load: Callable[[], torch.Tensor]


def resolve_out_type(name: str) -> tuple[QType, gguf.LlamaFileType]:
    """(type of the 2-D weights, general.file_type) for an output type name, as the language model uses them."""
    if name not in OUT_TYPES:
        raise GGUFConversionError(f"unknown GGUF output type {name!r}; choose one of {', '.join(OUT_TYPES)}")
    return OUT_TYPES[name]


def tensor_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Shapes of all checkpoint tensors from the safetensors headers, without reading any data."""
    shapes = {}
    for shard in checkpoint.shards():
        with safe_open(shard, framework="pt") as f:
            for name in checkpoint.shard_names(shard):
                shapes[name] = tuple(f.get_slice(checkpoint.disk_name(name)).get_shape())
    return shapes


def write_gguf(writer: gguf.GGUFWriter, jobs: Iterable[TensorJob]) -> None:
    """Write the writer's metadata, then each tensor in turn; only one tensor's data is in memory at a time."""
    jobs = list(jobs)
    for job in jobs:
        stored = _stored_shape(job)
        nbytes = prod(stored) * _stored_dtype(job.qtype).itemsize
        writer.add_tensor_info(job.name, stored, _stored_dtype(job.qtype), nbytes, raw_dtype=job.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for job in jobs:
            data = job.load().to(torch.float32).contiguous().numpy()
            if data.shape != job.shape:
                raise GGUFConversionError(f"{job.name}: expected shape {job.shape}, got {data.shape}")
            writer.write_tensor_data(np.ascontiguousarray(gguf.quants.quantize(data, job.qtype)))
    finally:
        writer.close()


def _stored_dtype(qtype: QType) -> np.dtype:
    return np.dtype({QType.F32: np.float32, QType.F16: np.float16}.get(qtype, np.uint8))


def _stored_shape(job: TensorJob) -> tuple[int, ...]:
    """The numpy shape of the encoded data (bytes per row for block types), which the writer maps back to elements."""
    if job.qtype in (QType.F32, QType.F16):
        return job.shape
    return gguf.quants.quant_shape_to_byte_shape(job.shape, job.qtype)


def patch_permutation(patch: int) -> torch.Tensor:
    """perm[i] = Hugging Face (row, col, channel) index of llama.cpp's (channel, row, col) patch input i."""
    i = torch.arange(patch * patch * 3)
    channel, row, col = i // (patch * patch), (i % (patch * patch)) // patch, i % patch
    return (row * patch + col) * 3 + channel


def image_normalization(checkpoint_dir: Path) -> tuple[list[float], list[float]]:
    """(mean, std) that clip must apply after dividing by 255, from the saved image processor."""
    processor = _image_processor_config(checkpoint_dir)
    if not processor.get("do_rescale", True) or abs(processor.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise GGUFConversionError(f"{checkpoint_dir}: llama.cpp always scales pixels by 1/255; this processor does not")
    # Gemma 4 unified skips normalization (do_normalize=False) even though its mean/std fields are filled in.
    if not processor.get("do_normalize", False):
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return [float(v) for v in processor["image_mean"]], [float(v) for v in processor["image_std"]]


def _image_processor_config(checkpoint_dir: Path) -> dict[str, Any]:
    """transformers 5 nests the image processor in processor_config.json; older layouts use preprocessor_config.json."""
    combined = checkpoint_dir / "processor_config.json"
    if combined.is_file() and "image_processor" in (config := json.loads(combined.read_text())):
        return config["image_processor"]
    separate = checkpoint_dir / "preprocessor_config.json"
    return json.loads(separate.read_text()) if separate.is_file() else {}


def add_projector_metadata(writer: gguf.GGUFWriter, config: Any, checkpoint_dir: Path, file_type: int) -> None:
    vision, audio, text = config.vision_config, config.audio_config, config.get_text_config()
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(f"{checkpoint_dir.name} projector")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_has_audio_encoder(True)
    # Per-modality projector types: a plain clip.projector_type would apply to both modalities.
    writer.add_clip_vision_projector_type(VISION_PROJECTOR)
    writer.add_clip_audio_projector_type(AUDIO_PROJECTOR)

    writer.add_vision_embedding_length(vision.mm_embed_dim)
    writer.add_vision_projection_dim(text.hidden_size)
    # No transformer blocks: a non-zero block count would make clip look for layer tensors.
    writer.add_vision_feed_forward_length(0)
    writer.add_vision_block_count(0)
    writer.add_vision_head_count(0)
    writer.add_vision_attention_layernorm_eps(vision.rms_norm_eps)
    writer.add_vision_image_size(DUMMY_IMAGE_SIZE)
    # The teacher patch size: clip multiplies it by the fixed merge factor 3 for gemma4uv.
    writer.add_vision_patch_size(vision.patch_size)
    mean, std = image_normalization(checkpoint_dir)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)

    writer.add_audio_embedding_length(audio.audio_embed_dim)
    writer.add_audio_projection_dim(text.hidden_size)
    writer.add_audio_feed_forward_length(0)
    writer.add_audio_block_count(0)
    writer.add_audio_head_count(0)
    writer.add_audio_attention_layernorm_eps(audio.rms_norm_eps)
    # One "mel bin" per raw sample of a 40 ms frame (clip overrides it to 640 for gemma4ua anyway).
    writer.add_audio_num_mel_bins(audio.audio_embed_dim)


def projector_jobs(checkpoint: Checkpoint, config: Any, matrix_type: QType) -> list[TensorJob]:
    """The 11 projector tensors in clip's names, with the permutations llama.cpp's graph needs."""
    vision = config.vision_config
    if vision.pooling_kernel_size != GEMMA4UV_MERGE:
        kernel = vision.pooling_kernel_size
        raise GGUFConversionError(f"llama.cpp's gemma4uv merges 3×3 patches, this model {kernel}×{kernel}")
    patch = vision.patch_size * vision.pooling_kernel_size
    transforms = _transforms(patch_permutation(patch))
    shapes = tensor_shapes(checkpoint)
    jobs = []
    for source, name, kind in _PROJECTOR_TENSORS:
        if source not in shapes:
            raise GGUFConversionError(f"{checkpoint.directory}: no tensor {source} (not a Gemma 4 unified checkpoint?)")
        if kind == "patch_columns" and shapes[source][1] != 3 * patch * patch:
            raise GGUFConversionError(f"{source} takes {shapes[source][1]} inputs, not 3·{patch}²")
        transform = transforms[kind]
        shape = tuple(transform(torch.empty(shapes[source], device="meta")).shape)
        qtype = _projector_type(name, shape, matrix_type)
        jobs.append(TensorJob(name, shape, qtype, _loader(checkpoint, source, transform)))
    return jobs


def _transforms(perm: torch.Tensor) -> dict[str | None, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        None: lambda t: t,
        "patch_columns": lambda w: w[:, perm],
        "patch_vector": lambda v: v[perm],
        # (P, 2, D) → (2, P, D): clip reads the first P rows as the x table and the next P rows as the y table.
        "position_table": lambda t: t.permute(1, 0, 2),
    }


def _projector_type(name: str, shape: tuple[int, ...], matrix_type: QType) -> QType:
    """Vectors and the position table stay F32; patch_embd is F16 only in F16 files (as llama.cpp's converter does)."""
    if len(shape) == 1 or name == "v.position_embd.weight":
        return QType.F32
    if name == "v.patch_embd.weight":
        return QType.F16 if matrix_type == QType.F16 else QType.F32
    return matrix_type


def _loader(
    checkpoint: Checkpoint, source: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[], torch.Tensor]:
    return lambda: transform(checkpoint.get(source).to(torch.float32))


def write_projector(checkpoint_dir: Path, out_path: Path, out_type: str = "F32") -> Path:
    """Write the vision + audio projector of a Gemma 4 unified checkpoint as one clip GGUF; returns `out_path`."""
    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    matrix_type, file_type = resolve_out_type(out_type)
    checkpoint = Checkpoint(checkpoint_dir)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    if getattr(config, "vision_config", None) is None or getattr(config, "audio_config", None) is None:
        raise GGUFConversionError(f"{checkpoint_dir}: the model has no vision and audio embedders to export")
    jobs = projector_jobs(checkpoint, config, matrix_type)
    with staged_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="clip")
        add_projector_metadata(writer, config, checkpoint_dir, file_type)
        write_gguf(writer, jobs)
    return out_path
