"""Importance matrix for llama.cpp's low-bit quants, measured on ft's own model and data path.

llama.cpp's IQ and low K-quants weigh each weight's rounding error by how strongly its input channel is driven:
for every linear layer, the mean of x² per input channel over calibration tokens. `collect_imatrix` measures that
with forward hooks on the PyTorch model, fed by the same encoding as training (`ft.encode`), so images and audio
pass through the multimodal projections and padding tokens are left out. The result is stored in llama.cpp's
imatrix GGUF format (what `llama-imatrix` writes and `llama-quantize --imatrix` reads), and `normalized` turns it
into what `quantize.llama_quant.quantize` takes.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from ft.data import load_rows
    >>> from ft.encode import collate, encode_row
    >>> from ft.tiny import build_tiny
    >>> model, processor = build_tiny()
    >>> rows = load_rows(Path("data/demo/train.jsonl"))[:4]
    >>> batch = collate([encode_row(row, processor) for row in rows], processor.tokenizer.pad_token_id)
    >>> stats = collect_imatrix(model, [batch], progress=False)
    >>> stats["blk.0.attn_q.weight"][0].shape
    (256,)
    >>> path = write_imatrix_gguf(stats, Path(tempfile.mkdtemp()) / "imatrix.gguf", ["demo"], 1, 512)
    >>> sorted(read_imatrix_gguf(path)) == sorted(stats)
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from ft.atomic import staged_file
from ft.errors import FtError

Stats = dict[str, tuple[np.ndarray, int]]

console = Console(stderr=True)

_SUM2, _COUNTS = ".in_sum2", ".counts"

# HF module name -> GGUF weight name (see docs of the GGUF layout: notes/gguf_gemma4_spec.md §1.2 and §4.2).
_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
_LAYER_WEIGHTS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
_PROJECTIONS = {
    re.compile(r"(?:^|\.)embed_vision\.multimodal_embedder\.embedding_projection$"): "mm.input_projection.weight",
    re.compile(r"(?:^|\.)embed_audio\.embedding_projection$"): "mm.a.input_projection.weight",
}


class ImatrixError(FtError):
    """An importance matrix file is missing, malformed, or holds data ft cannot use."""


def gguf_tensor_name(hf_module_name: str) -> str | None:
    """The GGUF weight a linear module becomes, or None if it has none llama.cpp quantizes with an imatrix.

    The LM head is left out on purpose: Gemma ties it to `token_embd`, which llama.cpp never looks up in an
    imatrix, and llama-imatrix skips `output.weight` by default too.

    >>> gguf_tensor_name("model.language_model.layers.3.self_attn.q_proj")
    'blk.3.attn_q.weight'
    >>> gguf_tensor_name("model.embed_audio.embedding_projection")
    'mm.a.input_projection.weight'
    >>> gguf_tensor_name("lm_head") is None
    True
    """
    layer = _LAYER.search(hf_module_name)
    if layer and layer.group(2) in _LAYER_WEIGHTS:
        return f"blk.{layer.group(1)}.{_LAYER_WEIGHTS[layer.group(2)]}.weight"
    for pattern, name in _PROJECTIONS.items():
        if pattern.search(hf_module_name):
            return name
    return None


def _mask_kind(hf_module_name: str) -> str:
    """Which validity mask applies to a module's input rows: text tokens, image patches or audio frames."""
    if ".embed_vision." in f".{hf_module_name}":
        return "image"
    if ".embed_audio." in f".{hf_module_name}":
        return "audio"
    return "text"


def _row_masks(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean masks of the real (non-padding) rows, shaped like the leading dims of each module's input."""
    masks = {"text": batch["attention_mask"].bool()}
    if "image_position_ids" in batch:
        masks["image"] = (batch["image_position_ids"] != -1).all(dim=-1)  # padding patches sit at (-1, -1)
    if "input_features_mask" in batch:
        masks["audio"] = batch["input_features_mask"].bool()
    return masks


class _Accumulator:
    """Running per-input-channel sum of x² (float64, on the model's device) and the number of rows seen."""

    def __init__(self) -> None:
        self.sum2: torch.Tensor | None = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        # Squares in float32 are exact enough; summing millions of them needs float64.
        sum2 = rows.float().square().sum(dim=0, dtype=torch.float64)
        self.sum2 = sum2 if self.sum2 is None else self.sum2 + sum2
        self.count += rows.shape[0]


def _recorder(acc: _Accumulator, kind: str, masks: dict[str, torch.Tensor]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        mask = masks.get(kind)
        if mask is not None and mask.shape == x.shape[:-1]:
            acc.add(x[mask])
        else:  # no mask describes this input's layout, so there is no padding to tell apart: count every row
            acc.add(x.reshape(-1, x.shape[-1]))

    return hook


def collect_imatrix(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True
) -> Stats:
    """Run `batches` (from `ft.encode.collate`) through `model`; returns {GGUF weight name: (sum2, rows)}.

    sum2 is the float32 sum of x² per input channel of that weight, rows the number of input rows counted. Padding
    tokens, padding image patches and padding audio frames are left out. Only modules that saw a row appear.
    """
    targets = {
        gguf_name: (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (gguf_name := gguf_tensor_name(name)) is not None
    }
    if not targets:
        raise ImatrixError("the model has no linear layers with a GGUF name; is it a Gemma 4 unified model?")
    device = next(model.parameters()).device
    masks: dict[str, torch.Tensor] = {}
    accumulators = {gguf_name: _Accumulator() for gguf_name in targets}
    handles = [
        module.register_forward_pre_hook(_recorder(accumulators[gguf_name], _mask_kind(name), masks))
        for gguf_name, (name, module) in targets.items()
    ]
    try:
        with torch.inference_mode():
            for batch in track(batches, description="importance matrix", console=console, transient=True,
                               disable=not progress):
                inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
                masks.clear()
                masks.update(_row_masks(inputs))
                # Only the hooks' inputs matter: skip the cache and all but one position of the (large) LM head.
                model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: (acc.sum2.cpu().numpy().astype(np.float32), acc.count)
        for name, acc in sorted(accumulators.items())
        if acc.sum2 is not None
    }


def normalized(stats: Stats) -> dict[str, np.ndarray]:
    """Mean x² per input channel (1.0 where nothing was seen): the values llama.cpp's quantizer takes.

    >>> normalized({"w": (np.array([2.0, 6.0], np.float32), 2), "v": (np.zeros(2, np.float32), 0)})
    {'w': array([1., 3.], dtype=float32), 'v': array([1., 1.], dtype=float32)}
    """
    return {
        name: (sum2 / count).astype(np.float32) if count > 0 else np.ones_like(sum2, dtype=np.float32)
        for name, (sum2, count) in stats.items()
    }


def write_imatrix_gguf(stats: Stats, path: Path, datasets: list[str], chunk_count: int, chunk_size: int) -> Path:
    """Write `stats` as llama.cpp's imatrix GGUF (as llama-imatrix saves it), atomically; returns `path`.

    Per weight W, sorted by name: `W.in_sum2` (F32, ne [n_in, 1]) and `W.counts` (F32, ne [1, 1]); keys
    `general.type = imatrix`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size` (tokens per chunk).
    llama-quantize refuses a file without all three `imatrix.*` keys, so `datasets` must not be empty.
    """
    if not datasets:
        raise ValueError("datasets must name at least one calibration source (llama-quantize requires the key)")
    path = Path(path)
    with staged_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="imatrix")
        # GGUFWriter always adds general.architecture; llama-imatrix files have none, so keep them identical.
        del writer.kv_data[0][gguf.Keys.General.ARCHITECTURE]
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [str(d) for d in datasets])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
        for name in sorted(stats):
            sum2, count = stats[name]
            writer.add_tensor(name + _SUM2, np.asarray(sum2, dtype=np.float32).reshape(1, -1))
            writer.add_tensor(name + _COUNTS, np.array([[count]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_imatrix_gguf(path: Path) -> Stats:
    """Read an imatrix GGUF (ft's or llama-imatrix's): {weight name: (sum of x² per input channel, rows)}."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"importance matrix not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ImatrixError(f"{path}: not a GGUF file ({exc})") from exc
    sums, counts = {}, {}
    for tensor in reader.tensors:
        for suffix, into in ((_SUM2, sums), (_COUNTS, counts)):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ImatrixError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, must be F32")
                into[tensor.name.removesuffix(suffix)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if sums.keys() != counts.keys() or not sums:
        odd = sorted(sums.keys() ^ counts.keys())
        problem = f"in_sum2 and counts do not pair up for: {', '.join(odd)}" if odd else "no imatrix entries"
        raise ImatrixError(f"{path}: {problem}")
    stats = {}
    for name in sorted(sums):
        if counts[name].size != 1:
            raise ImatrixError(f"{path}: {name} has per-expert (MoE) statistics, which ft does not use")
        stats[name] = (sums[name], int(round(float(counts[name][0]))))
    return stats
