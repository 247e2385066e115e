"""Merge a LoRA adapter into its 16-bit base checkpoint, one safetensors shard at a time.

peft's `merge_and_unload` needs the whole model in memory (24 GB for the 12B in bf16); this reads one base shard,
adds `scale * B @ A` to the weights the adapter touches (in float32, then back to the shard's dtype), and writes the
shard under the same name. Peak memory is about one shard plus the adapter. Everything else in the checkpoint
(config, tokenizer, processor, chat template) is copied, so the result is a normal checkpoint transformers loads.

    >>> import tempfile, pathlib
    >>> from ft.tiny import save_tiny
    >>> base = save_tiny(pathlib.Path(tempfile.mkdtemp()) / "base")
    >>> sorted(p.name for p in base.glob("*.safetensors"))
    ['model.safetensors']
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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
    with staged_dir(out_dir) as tmp:
        for shard in track(base.shards(), description="merge", transient=True):
            with safe_open(shard, framework="pt") as f:
                metadata = f.metadata()
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            for name in base.shard_names(shard):
                if name in deltas:
                    a, b = deltas[name]
                    key = base.disk_name(name)
                    merged = tensors[key].float() + scale * (b.float() @ a.float())
                    tensors[key] = merged.to(tensors[key].dtype)
            save_file(tensors, tmp / shard.name, metadata=metadata)
            del tensors
        _copy_side_files(base.directory, tmp)
    return out_dir
