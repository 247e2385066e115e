"""Merge a LoRA adapter into its 16-bit base checkpoint, one tensor at a time.

peft's `merge_and_unload` needs the whole model in memory (24 GB for the 12B in bf16); this streams each base
shard tensor by tensor, adds `scale * B @ A` to the weights the adapter touches (in float32, then back to the
shard's dtype), and writes the shard under the same name. Peak memory is about the largest tensor plus the adapter.
Everything else in the checkpoint (config, tokenizer, processor, chat template) is copied, so the result is a
normal checkpoint transformers loads.

    >>> import tempfile, pathlib
    >>> from ft.tiny import save_tiny
    >>> base = save_tiny(pathlib.Path(tempfile.mkdtemp()) / "base")
    >>> sorted(p.name for p in base.glob("*.safetensors"))
    ['model.safetensors']
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import load_file

from ft.atomic import staged_dir
from ft.errors import FtError
from quantize.checkpoint import Checkpoint

ADAPTER_PREFIX = "base_model.model."


class MergeError(FtError):
    """The adapter does not fit the base checkpoint."""


def lora_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{base weight name (in-memory spelling): (A, B)} and the scale alpha/r (alpha/sqrt(r) with rsLoRA)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise MergeError(f"{adapter_dir}: DoRA and per-module rank/alpha patterns are not supported by the merge")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(ADAPTER_PREFIX).split(".lora_A.")[0]
        pairs[f"{module}.weight"] = (a, weights[key.replace(".lora_A.", ".lora_B.")])
    return pairs, scale


# Bytes per element of the safetensors dtypes a checkpoint may hold.
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _stream_shard(source: Path, target: Path, update: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Copy a safetensors file tensor by tensor, passing each through `update(key, tensor)`.

    safetensors' own `save_file` serialises a whole shard in memory first (twice the shard's size at peak); the
    format is a length-prefixed JSON header and the raw tensors, so it is written here directly, one tensor at a
    time. Shapes and dtypes are unchanged, so the header is known before any data is read.
    """
    with safe_open(source, framework="pt") as f, target.open("wb") as out:
        keys = list(f.keys())
        header: dict[str, object] = {"__metadata__": f.metadata()} if f.metadata() else {}
        offset = 0
        for key in keys:
            piece = f.get_slice(key)
            size = math.prod(piece.get_shape()) * _ITEMSIZE[piece.get_dtype()]
            header[key] = {
                "dtype": piece.get_dtype(), "shape": piece.get_shape(), "data_offsets": [offset, offset + size]
            }
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
        out.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            tensor = update(key, f.get_tensor(key)).contiguous()
            out.write(tensor.view(torch.uint8).numpy().data)
        out.flush()
        os.fsync(out.fileno())


def _copy_side_files(base: Path, out: Path) -> None:
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter as a merged checkpoint in `out_dir` (atomically: a complete folder or none)."""
    base = Checkpoint(base_dir)
    deltas, scale = lora_deltas(adapter_dir)
    missing = sorted(set(deltas) - set(base.names()))
    if missing:
        raise MergeError(f"adapter {adapter_dir} adapts weights the base {base_dir} does not have: {missing[:3]}")
    by_disk_name = {base.disk_name(name): delta for name, delta in deltas.items()}

    def update(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in by_disk_name:
            return tensor
        a, b = by_disk_name[key]
        return (tensor.float() + scale * (b.float() @ a.float())).to(tensor.dtype)

    with staged_dir(out_dir) as tmp:
        for shard in track(base.shards(), description="merge", transient=True):
            _stream_shard(shard, tmp / shard.name, update)
        _copy_side_files(base.directory, tmp)
    return out_dir
