"""The decoder's MLP run over the sequence a tile of tokens at a time, for long rows under gradient checkpointing.

Gemma 4 12B's MLP is 15,360 wide against a 3,840-wide residual stream: while gradient checkpointing recomputes a
layer, its gate, up and product rows are most of what the layer holds, about 90 KB a token in bf16 (1.4 GiB at
16,384 tokens). The MLP treats tokens independently, so each tile of `TILE` tokens runs under its own activation
checkpoint: its intermediate rows exist for one tile at a time, in the forward and in the backward pass. The price
is one more forward of the MLP in the backward pass, so ft tiles only when the memory plan says a step needs it
(`train.tiled_mlp`, decided in `ft.resolve`), and never a row that fits in one tile.

    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(2, 10, 4)
    >>> torch.allclose(tiled(mlp.forward, x, tile=3), mlp(x), atol=1e-6)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

TILE = 2048  # tokens: one tile's MLP rows are about 190 MB at the 12B shape, and still a full-speed matmul


def tiled(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """forward(x) over the sequence dimension (1) a tile at a time, each tile recomputed in the backward pass."""
    if x.shape[1] <= tile or not torch.is_grad_enabled():
        return forward(x)
    return torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in x.split(tile, dim=1)], dim=1)


def tile_mlps(model: nn.Module, tile: int = TILE) -> int:
    """Make every decoder MLP of `model` run tiled (whatever its forward is, Liger's included); returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Gemma4UnifiedTextMLP":
            module.forward = functools.partial(tiled, module.forward, tile=tile)
            count += 1
    return count
