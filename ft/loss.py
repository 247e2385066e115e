"""The training loss without full-vocabulary logits for every position.

Gemma 4's vocabulary has 262,144 entries: transformers' loss builds bf16 logits, an fp32 copy, the softcap and the
gradient for every position, about 24 bytes per entry per token (6 MiB a token; 24 GiB for a 4096-token step). Only
positions with a label (assistant turns) need logits at all, and they can be computed a chunk at a time under
activation checkpointing, so that one chunk's logits exist at once, in the forward and in the backward pass.

On CUDA ft uses trl's fused LM head instead (`SFTTrainer`'s loss, a Triton kernel); this is plain PyTorch for the
CPU, where Triton does not run, and matches transformers' loss exactly. Like trl's, the sum is divided by
`num_items` (the labelled tokens of the whole accumulated batch) when the Trainer passes it, else by this batch's.

    >>> import torch
    >>> head = torch.nn.Linear(8, 50, bias=False)
    >>> hidden, labels = torch.randn(2, 5, 8), torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, 1, 2, 3]])
    >>> logits = head(hidden)
    >>> reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    >>> torch.allclose(causal_lm_loss(hidden, head, labels, softcap=None, chunk=2), reference)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK = 256  # labelled positions per chunk: 256 x 262,144 x ~14 bytes, under 1 GiB at Gemma 4's vocabulary


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


def causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, softcap: float | None,
                   chunk: int = CHUNK, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels -100 are ignored), as transformers computes it
    from `head(hidden)` with Gemma's final-logit softcap, but `chunk` labelled positions at a time."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    # An empty slice of the labelled states rather than a constant: a batch without labelled tokens (a rank's share
    # of fillers, `ft.batching`) still gives the model a zero gradient, as DistributedDataParallel needs.
    total = states[:0].float().sum()
    for start in range(0, len(targets), chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, states[piece], targets[piece], head, softcap, use_reentrant=False)
    return total / (num_items if num_items is not None else max(len(targets), 1))
