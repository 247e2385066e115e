"""Exact attention for long training rows that never holds a sequence x sequence tensor.

Gemma 4 builds, for every step, a boolean mask of sequence x sequence entries for each layer type (its image tokens
attend to each other both ways, so the mask is never plain causal), and transformers' `sdpa` attention hands it to
PyTorch, which then runs a masked kernel over every query and every key: on the 40 sliding-window layers (1024
tokens) too, and on the full layers (head_dim 512, past the flash kernel's 256) with the key/value head copied 16
times: memory and time that grow with the square of the row length at the 12B shape
(docs/BENCHMARKS.md#measurements-behind-design-decisions).

ft registers its own attention with transformers (`IMPLEMENTATION`), with a mask of its own (`ChunkedMask`): the
mask function transformers composes for a layer type (causal, sliding window, padding, bidirectional image blocks)
is evaluated once per forward, one chunk of `QUERY_CHUNK` queries at a time, and each chunk keeps only the span of
keys it may see. Attention then runs chunk by chunk through PyTorch's fused kernels, over that span alone: a sliding
layer costs O(length x window) and a full layer's largest temporary is one chunk's row of keys. A full layer whose
mask is plain causal (text without padding) takes one `is_causal` call instead.

Written here because none of the libraries does this for Gemma 4: FlashAttention-2 and PyTorch's flash kernel stop
at head_dim 256, and FlexAttention compiles once per sequence length (every batch's length differs).

    >>> import torch
    >>> from transformers.masking_utils import causal_mask_function
    >>> mask = chunked_mask(batch_size=1, q_length=5, kv_length=5, mask_function=causal_mask_function, chunk=2)
    >>> mask.causal, mask.chunks
    (True, [])
    >>> from transformers.masking_utils import sliding_window_causal_mask_function
    >>> window = chunked_mask(batch_size=1, q_length=5, kv_length=5, chunk=2,
    ...                       mask_function=sliding_window_causal_mask_function(2))
    >>> [(c.q_start, c.q_end, c.k_start, c.k_end) for c in window.chunks], window.causal
    ([(0, 2, 0, 2), (2, 4, 1, 4), (4, 5, 3, 5)], False)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
)

IMPLEMENTATION = "ft_chunked"
QUERY_CHUNK = 1024  # queries per chunk: the sliding window's length, so a sliding chunk sees at most 2 windows
KEPT_MASKS_BYTES = 256 << 20  # masks of a layer's chunks kept for the backward up to this size; past it, recomputed


@dataclass(frozen=True)
class MaskChunk:
    """Queries [q_start, q_end) attend to keys [k_start, k_end) where `allowed` (batch, 1, queries, keys) is True."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    allowed: torch.Tensor


@dataclass(frozen=True)
class ChunkedMask:
    """A layer type's attention mask, cut into query chunks; `causal` (and no chunks kept) when it is the plain
    causal mask."""

    chunks: list[MaskChunk]
    causal: bool


def chunked_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
    **_: object,
) -> ChunkedMask:
    """transformers' mask interface for `IMPLEMENTATION`: the mask `mask_function` describes (and the 2D padding
    mask), evaluated a chunk of queries at a time and cropped to the keys each chunk can see."""
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    batch = torch.arange(batch_size, device=device)[:, None, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    keys = torch.arange(kv_offset, kv_offset + kv_length, device=device)[None, None, :]
    chunk = chunk or QUERY_CHUNK
    chunks, causal = [], True
    for q_start in range(0, q_length, chunk):
        q_end = min(q_start + chunk, q_length)
        queries = torch.arange(q_offset + q_start, q_offset + q_end, device=device)[None, :, None]
        allowed = torch.broadcast_to(
            mask_function(batch, head, queries, keys), (batch_size, q_end - q_start, kv_length)
        )
        causal = causal and bool(torch.equal(allowed, torch.broadcast_to(keys <= queries, allowed.shape)))
        seen = allowed.any(dim=1).any(dim=0).nonzero()
        k_start, k_end = (int(seen[0]), int(seen[-1]) + 1) if len(seen) else (0, 1)
        # A copy of the span, not a view: a view would keep the chunk's row over every key alive, which is the
        # sequence x sequence mask again, one chunk at a time.
        chunks.append(MaskChunk(q_start, q_end, k_start, k_end, allowed[:, None, :, k_start:k_end].clone()))
    return ChunkedMask([] if causal else chunks, causal)


@torch.compiler.disable  # the chunk layout differs per row: compiled layers (`ft.compiled`) would recompile for each
def chunked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: ChunkedMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for `IMPLEMENTATION`: query (batch, heads, length, head_dim), key and
    value (batch, kv_heads, length, head_dim); returns (batch, length, heads, head_dim)."""
    heads = query.shape[1]

    def widen(states: torch.Tensor) -> torch.Tensor:
        # One key/value head (the full layers) becomes a stride-0 view; sliding layers' 8 heads are copied once.
        if states.shape[1] == 1:
            return states.expand(-1, heads, -1, -1)
        return states.repeat_interleave(heads // states.shape[1], dim=1)

    key, value = widen(key), widen(value)
    if attention_mask is None or attention_mask.causal:
        output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                is_causal=query.shape[2] > 1)
    else:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling)

        # A masked kernel keeps its mask for the backward pass, possibly widened to every head (the measured peaks
        # show less, so this counts the widened size as an upper bound): on long rows (many chunks, KEPT_MASKS_BYTES)
        # each chunk is recomputed there instead, so that one chunk's mask exists at a time; short rows keep theirs
        # and save the recomputation's host time (docs/BENCHMARKS.md, "Training speed on users' data")
        widened = sum(heads * c.allowed[:, 0].numel() for c in attention_mask.chunks)
        recompute = torch.is_grad_enabled() and widened * query.element_size() > KEPT_MASKS_BYTES
        run = functools.partial(checkpoint, attend, use_reentrant=False) if recompute else attend
        output = torch.cat([
            run(query[:, :, c.q_start : c.q_end], key[:, :, c.k_start : c.k_end], value[:, :, c.k_start : c.k_end],
                c.allowed)
            for c in attention_mask.chunks
        ], dim=2)
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `IMPLEMENTATION` known to transformers (idempotent); returns its name for `attn_implementation`."""
    AttentionInterface.register(IMPLEMENTATION, chunked_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, chunked_mask)
    return IMPLEMENTATION
