"""A target GGUF and its MTP drafter GGUF rewritten so that the drafter's every guess is the target's next token.

This is how bench/eval_speed.py measures the ceiling of a speculative loop (acceptance 1.0) through *any*
implementation, llama.cpp's own included, on files of the benchmark's exact shapes and types. Decoding time does not
depend on weight values, so only values change, in the tensors' bytes:

- target (`silence_layers`, in place): every layer's output projections (attention output, MLP down) become zero.
  Each layer then adds nothing to the residual stream, the final hidden state is the scaled embedding of the last
  token, and with the tied output head that token's own logit leads by far (a random embedding's dot product with
  itself against its dot products with 262,143 others): greedy decoding repeats the last token.
- drafter (`echo_drafter`, a new file): its input projection keeps the first `width` coordinates of the target's
  token embedding and ignores the target's hidden state, its layers' output projections are zero, and its own tied
  embedding is made of those same coordinates of the target's embedding: it proposes the token it is given, which
  the silenced target then accepts.

Zero bytes decode to zero in every ggml type (each block's scales are zero), so quantized files are silenced as
they are. The acceptance that results is measured, not assumed: the bench reports it.

    silence_layers(Path("model-Q4_K_M.gguf"))
    echo_drafter(Path("drafter-BF16.gguf"), Path("model-BF16.gguf"), Path("drafter-echo.gguf"))
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader

OUTPUT_PROJECTIONS = re.compile(r"blk\.\d+\.(attn_output|ffn_down)\.weight")
BF16_ONE = 0x3F80  # 1.0 in bfloat16 bits


def silence_layers(path: Path) -> None:
    """Zero every layer's attention-output and MLP-down weights of a GGUF, in place, and its final norm to ones;
    leaves `<path>.silenced` beside it so that nobody takes the file for the model it was."""
    reader = GGUFReader(path, "r+")
    for tensor in reader.tensors:
        if OUTPUT_PROJECTIONS.fullmatch(tensor.name):
            tensor.data[...] = 0
        elif tensor.name == "output_norm.weight":
            _set_ones(tensor)
    reader.data.flush()
    Path(f"{path}.silenced").touch()


def echo_drafter(drafter: Path, target_bf16: Path, out: Path) -> Path:
    """A copy of the BF16 `drafter` that proposes its input token (see the module docstring), its embedding taken
    from the BF16 `target_bf16` whose token embedding llama.cpp feeds the drafter."""
    target = _tensors(GGUFReader(target_bf16, "r"))
    staged = out.with_name(out.name + ".partial")
    shutil.copyfile(drafter, staged)
    reader = GGUFReader(staged, "r+")
    tensors = _tensors(reader)
    own = _bf16(tensors["token_embd.weight"])
    width = own.shape[1]
    own[...] = _bf16(target["token_embd.weight"])[:, :width]
    projection = _bf16(tensors["nextn.pre_projection.weight"])  # [width, 2 * target width]: (embedding, hidden)
    projection[...] = 0
    projection[np.arange(width), np.arange(width)] = BF16_ONE
    for name, tensor in tensors.items():
        if OUTPUT_PROJECTIONS.fullmatch(name):
            tensor.data[...] = 0
    _set_ones(tensors["output_norm.weight"])
    reader.data.flush()
    del reader, tensors, own, projection
    staged.replace(out)
    return out


def _tensors(reader: GGUFReader) -> dict:
    return {tensor.name: tensor for tensor in reader.tensors}


def _bf16(tensor) -> np.ndarray:
    if tensor.tensor_type != QType.BF16:
        raise ValueError(f"{tensor.name} is {tensor.tensor_type.name}; the drafter and reference must be BF16")
    return tensor.data.view(np.uint16)


def _set_ones(tensor) -> None:
    if tensor.tensor_type == QType.F32:
        tensor.data[...] = 1.0
    else:
        _bf16(tensor)[...] = BF16_ONE
