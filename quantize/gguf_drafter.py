"""Gemma 4 MTP drafter (`Gemma4UnifiedAssistantForCausalLM`) → llama.cpp GGUF of architecture `gemma4-assistant`.

The drafter predicts the next tokens from the target's last hidden state and the target's own token embeddings,
and attends to the target's KV cache instead of keeping one: in llama.cpp its sliding layers read the target's
second-to-last layer, its full layers the target's last layer, viewed with the *drafter's* head sizes. So the
converter checks that those geometries agree with the target checkpoint, and copies the target's tokenizer
(llama.cpp loads a vocabulary for every model and compares draft and target vocabularies).

At run time llama.cpp needs the target context as `ctx_other` of the drafter context (and `--spec-type draft-mtp`
on the command line); nothing about the link is stored in the file.

    >>> import tempfile, pathlib
    >>> from ft.tiny import save_tiny
    >>> from ft.tiny_drafter import save_tiny_drafter
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> out = write_drafter(save_tiny_drafter(d / "drafter"), save_tiny(d / "tiny"), d / "drafter.gguf", "BF16")
    >>> out.name
    'drafter.gguf'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType as QType
from transformers import AutoConfig

from ft.atomic import staged_file
from quantize.checkpoint import Checkpoint
from quantize.gguf_lm import LAYER_TENSORS, add_text_hparams, rope_freqs
from quantize.gguf_mmproj import TensorJob, resolve_out_type, tensor_shapes, write_gguf
from quantize.gguf_vocab import GGUFConversionError, add_tokenizer

ARCH = "gemma4-assistant"  # not in gguf 0.19.0's MODEL_ARCH; the writer takes any string
SLIDING, FULL = "sliding_attention", "full_attention"

_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",  # also the drafter's (tied) output head
    "model.norm.weight": "output_norm.weight",
    "pre_projection.weight": "nextn.pre_projection.weight",
    "post_projection.weight": "nextn.post_projection.weight",
}
# The target's layer tensors without k/v: every drafter layer reads the target's KV, and llama.cpp rejects unused
# tensors.
_LAYER_TENSORS = {
    hf: gguf_name for hf, gguf_name in LAYER_TENSORS.items()
    if hf not in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")
}
# Tied copy of embed_tokens, and the optional centroid head (llama.cpp computes full logits without it).
_SKIPPED_PREFIXES = ("lm_head.", "masked_embedding.")


def head_geometry(text_config: Any, layer: int) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of one layer; per_layer_config resolves both config.json layouts."""
    resolved = text_config.per_layer_config[layer]
    return resolved.head_dim, resolved.num_key_value_heads


def check_against_target(drafter: Any, target_text: Any) -> None:
    """Raise unless llama.cpp's KV sharing and embedding reuse line up between drafter and target."""
    text = drafter.get_text_config()
    if target_text.layer_types[-2:] != [SLIDING, FULL]:
        raise GGUFConversionError(
            "the drafter reads the KV of the target's last two layers, which must be a sliding then a full layer"
        )
    if drafter.backbone_hidden_size != target_text.hidden_size:
        raise GGUFConversionError(
            f"drafter backbone_hidden_size {drafter.backbone_hidden_size} != target hidden_size "
            f"{target_text.hidden_size}"
        )
    if text.hidden_size == drafter.backbone_hidden_size:
        raise GGUFConversionError("llama.cpp requires the drafter width to differ from the target width")
    if text.vocab_size != target_text.vocab_size:
        raise GGUFConversionError(f"drafter vocabulary {text.vocab_size} != target vocabulary {target_text.vocab_size}")
    n_target = len(target_text.layer_types)
    for layer_type, target_layer in ((SLIDING, n_target - 2), (FULL, n_target - 1)):
        want = head_geometry(target_text, target_layer)
        for i, t in enumerate(text.layer_types):
            if t == layer_type and head_geometry(text, i) != want:
                raise GGUFConversionError(
                    f"drafter layer {i} ({t}) has (head_dim, kv_heads) {head_geometry(text, i)}, but it reads the KV "
                    f"of target layer {target_layer} with {want}"
                )


def add_drafter_metadata(writer: gguf.GGUFWriter, drafter: Any, name: str, file_type: int) -> None:
    """General keys and the drafter's own keys (the decoder hyperparameters come from `add_text_hparams`)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # The backbone width: llama.cpp sizes the [token embedding, target hidden] input and the projected output with it.
    writer.add_embedding_length_out(drafter.backbone_hidden_size)
    # Every layer is a "nextn" layer: llama.cpp runs them all as the drafter body.
    writer.add_nextn_predict_layers(drafter.get_text_config().num_hidden_layers)


def drafter_jobs(checkpoint: Checkpoint, drafter: Any, matrix_type: QType) -> list[TensorJob]:
    """The loader's exact tensor set: 4 global tensors, 11 per layer, and rope_freqs."""
    text = drafter.get_text_config()
    shapes = tensor_shapes(checkpoint)
    mapping = dict(_GLOBAL_TENSORS)
    for i in range(text.num_hidden_layers):
        mapping.update({f"model.layers.{i}.{hf}": f"blk.{i}.{ours}" for hf, ours in _LAYER_TENSORS.items()})
    unexpected = [n for n in shapes if n not in mapping and not n.startswith(_SKIPPED_PREFIXES)]
    if unexpected:
        raise GGUFConversionError(f"{checkpoint.directory}: tensors gemma4-assistant cannot load: {unexpected}")
    missing = [n for n in mapping if n not in shapes]
    if missing:
        raise GGUFConversionError(f"{checkpoint.directory}: missing drafter tensors {missing}")
    jobs = [
        TensorJob(ours, shapes[hf], _tensor_type(ours, shapes[hf], matrix_type), _loader(checkpoint, hf))
        for hf, ours in mapping.items()
    ]
    # Proportional RoPE of the full layers (generated, as for the language model).
    divisors = torch.from_numpy(rope_freqs(text))
    jobs.append(TensorJob("rope_freqs.weight", tuple(divisors.shape), QType.F32, lambda: divisors))
    return jobs


def _tensor_type(name: str, shape: tuple[int, ...], matrix_type: QType) -> QType:
    return QType.F32 if len(shape) == 1 or name.endswith("_norm.weight") else matrix_type


def _loader(checkpoint: Checkpoint, name: str) -> Callable[[], torch.Tensor]:
    return lambda: checkpoint.get(name)


def write_drafter(drafter_dir: Path, target_checkpoint_dir: Path, out_path: Path, out_type: str = "F32") -> Path:
    """Write the drafter as a `gemma4-assistant` GGUF with the target's tokenizer; returns `out_path`."""
    drafter_dir, target_checkpoint_dir, out_path = Path(drafter_dir), Path(target_checkpoint_dir), Path(out_path)
    matrix_type, file_type = resolve_out_type(out_type)
    drafter = AutoConfig.from_pretrained(drafter_dir)
    if drafter.model_type != "gemma4_unified_assistant":
        raise GGUFConversionError(f"{drafter_dir}: model_type {drafter.model_type!r} is not a Gemma 4 unified drafter")
    if not drafter.tie_word_embeddings:
        raise GGUFConversionError(f"{drafter_dir}: gemma4-assistant needs the output head tied to embed_tokens")
    check_against_target(drafter, AutoConfig.from_pretrained(target_checkpoint_dir).get_text_config())
    jobs = drafter_jobs(Checkpoint(drafter_dir), drafter, matrix_type)
    with staged_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=ARCH)
        add_drafter_metadata(writer, drafter, drafter_dir.name, file_type)
        # The same decoder keys as the language model; it reads the MLP width from the jobs' names and shapes.
        add_text_hparams(writer, drafter.get_text_config(), jobs)
        n_tokens = add_tokenizer(writer, target_checkpoint_dir)
        rows = next(job.shape[0] for job in jobs if job.name == "token_embd.weight")
        if n_tokens != rows:
            raise GGUFConversionError(f"the target tokenizer has {n_tokens} tokens, the drafter {rows} embedding rows")
        write_gguf(writer, jobs)
    return out_path
