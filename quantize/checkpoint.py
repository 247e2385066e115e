"""Lazy, layout-agnostic reading of a Hugging Face Gemma 4 checkpoint directory.

Tensors are read one at a time from the safetensors shards (memory-mapped), so converting or merging a 24 GB
checkpoint never holds more than one tensor beyond what the caller keeps. Names are normalised to the names
transformers uses in memory (`model.embed_vision.*`, `model.embed_vision.multimodal_embedder.embedding_projection`),
whichever spelling the files use: transformers' saved layout and Google's published layout both name the vision
embedder `model.vision_embedder.*` and its projection `model.embed_vision.embedding_projection`.

    >>> import tempfile, pathlib
    >>> from ft.tiny import save_tiny
    >>> ckpt = Checkpoint(save_tiny(pathlib.Path(tempfile.mkdtemp()) / "tiny"))
    >>> ckpt.get("model.embed_vision.patch_dense.weight").shape
    torch.Size([256, 6912])
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# (on-disk prefix, in-memory prefix); the more specific entry first.
_DISK_TO_MEMORY = (
    ("model.embed_vision.embedding_projection.", "model.embed_vision.multimodal_embedder.embedding_projection."),
    ("model.vision_embedder.", "model.embed_vision."),
)


def memory_name(disk_name: str) -> str:
    """The in-memory (transformers) name of a tensor stored under `disk_name`."""
    for disk, memory in _DISK_TO_MEMORY:
        if disk_name.startswith(disk):
            return memory + disk_name[len(disk) :]
    return disk_name


class Checkpoint:
    """A checkpoint directory: its config and its tensors under in-memory names, loaded on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.directory}: no config.json (not a Hugging Face checkpoint)")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self._where: dict[str, tuple[Path, str]] = {}
        for shard in self.shards():
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    self._where[memory_name(key)] = (shard, key)

    def shards(self) -> list[Path]:
        """Safetensors files in index order (or sorted, for a single-file checkpoint)."""
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            return [self.directory / f for f in files]
        shards = sorted(self.directory.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"{self.directory}: no .safetensors files")
        return shards

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        shard, key = self._where[name]
        with safe_open(shard, framework="pt") as f:
            return f.get_tensor(key)

    def shape(self, name: str) -> list[int]:
        """A tensor's shape from the file header, without reading its data."""
        shard, key = self._where[name]
        with safe_open(shard, framework="pt") as f:
            return list(f.get_slice(key).get_shape())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)

    def shard_names(self, shard: Path) -> list[str]:
        """In-memory names of the tensors stored in one shard, in file order."""
        return [name for name, (path, _) in self._where.items() if path == shard]

    def disk_name(self, name: str) -> str:
        return self._where[name][1]

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", self.config)
