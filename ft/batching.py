"""Batch rows of similar token length together, so that little of each batch is padding.

Multimodal rows vary widely in length (a 30 s clip is 750 audio tokens, an image 70-1120), and a batch is as long as
its longest row; random batches of such rows are mostly padding. transformers' length grouping (shuffle, cut into
mega-batches, sort each by length) does the grouping, with mega-batches of 64 batches: its default (a quarter of the
data at most) left several times as much padding on the mixed set of tests/test_batching.py
(docs/BENCHMARKS.md#measurements-behind-design-decisions). Sorted mega-batches come out longest
first, so ft then shuffles the order of whole batches (the longest batch stays first, so that an
out-of-memory error comes at step 1, not hours in). ft feeds it the token lengths it already measured while checking
the data, and draws each epoch's order from (seed, epoch) so that `--resume` replays the same order.

    >>> lengths = [10, 500, 12, 480, 11, 510, 9, 495]
    >>> order = list(LengthGroupedEpochSampler(lengths, batch_size=2, seed=0))
    >>> round(padding_share(lengths, order, 2), 3) < round(padding_share(lengths, list(range(8)), 2), 3)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

MEGA_BATCHES = 64  # batches per sorted mega-batch


class LengthGroupedEpochSampler(torch.utils.data.Sampler[int]):
    """Row indices in length-grouped order; consecutive `batch_size` slices hold rows of similar length."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) at the start of each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, MEGA_BATCHES, generator)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        first, rest = batches[0], batches[1:]
        shuffled = [first] + [rest[i] for i in torch.randperm(len(rest), generator=generator)]
        return iter([i for batch in shuffled for i in batch])


def padding_share(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of pad tokens when rows are taken in `order`, `batch_size` at a time, each batch right-padded.

    >>> padding_share([4, 2, 4, 4], [0, 1, 2, 3], 2)  # batches [4, 2] and [4, 4]: 2 pad tokens in 16
    0.125
    """
    padded = used = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        used += sum(batch)
    return 1.0 - used / padded if padded else 0.0
