"""Batch rows of similar token length together, so that little of each batch is padding.

Multimodal rows vary widely in length (a 30 s clip is 750 audio tokens, an image 70-1120), and a batch is as long as
its longest row; random batches of such rows are mostly padding. transformers' length grouping (shuffle, cut into
mega-batches, sort each by length) does the grouping, with mega-batches of 64 batches: its default (a quarter of the
data at most) left several times as much padding on the mixed set of tests/test_batching.py
(docs/BENCHMARKS.md#measurements-behind-design-decisions). Sorted mega-batches come out longest
first, so ft then shuffles the order of whole batches (the longest batch stays first, so that an
out-of-memory error comes at step 1, not hours in; a short batch of the rows left over comes last). ft feeds it the
token lengths it already measured while checking the data, and draws each epoch's order from (seed, epoch) so that
`--resume` replays the same order.

With several processes (`ft.distributed`) the grouping is by global batch (`batch_size` rows for each of `ranks`
processes): accelerate hands the DataLoader's batches to the ranks in turn, so the ranks of one step get rows of
similar length and none idles behind a much longer row, and the order is the one a single process with batches of
`batch_size x ranks` rows trains on. A short last global batch is dealt out row by row (every rank gets rows, as
long as there are as many rows as ranks) and each rank's share filled up to `batch_size` with fillers: copies of
the shortest row that carry no loss (`ft.encode.encoded_dataset`), items `len(lengths)` and up. Every rank then has
the same number of full batches, so accelerate never repeats rows to even them out: every row is trained once an
epoch, none twice.

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
    """Row indices in length-grouped order (shuffled only, with `group=False`); consecutive `batch_size x ranks`
    slices hold rows of similar length, then fillers where `ranks` > 1 (see the module docstring)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, ranks: int = 1, group: bool = True) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.ranks = ranks
        self.group = group
        self.epoch = 0
        self.fillers = -len(self.lengths) % (batch_size * ranks) if ranks > 1 else 0

    @property
    def filler_rows(self) -> list[int]:
        """The row each filler copies (the shortest: it never lengthens a batch)."""
        shortest = min(range(len(self.lengths)), key=self.lengths.__getitem__)
        return [shortest] * self.fillers

    @property
    def item_lengths(self) -> list[int]:
        """Token length of every item the sampler yields, fillers included."""
        return self.lengths + [self.lengths[row] for row in self.filler_rows]

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) at the start of each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) + self.fillers

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        step = self.batch_size * self.ranks
        if self.group:
            order = get_length_grouped_indices(self.lengths, step, MEGA_BATCHES, generator)
        else:
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = [order[i : i + step] for i in range(0, len(order), step)]
        # a short batch (the rows left over) goes last: anywhere else the DataLoader's batches would straddle it
        short = [batches.pop()] if len(batches[-1]) < step else []
        first, rest = batches[:1], batches[1:]
        shuffled = first + [rest[i] for i in torch.randperm(len(rest), generator=generator)] + short
        return iter([i for batch in shuffled for i in self._deal(batch)])

    def _deal(self, batch: list[int]) -> list[int]:
        """A global batch as the ranks' micro-batches in turn; a short one dealt out row by row, and filled."""
        if self.ranks == 1 or len(batch) == self.batch_size * self.ranks:
            return batch
        fillers = iter(range(len(self.lengths), len(self.lengths) + self.fillers))
        shares = [batch[rank :: self.ranks] for rank in range(self.ranks)]
        return [i for share in shares for i in share + [next(fillers) for _ in range(self.batch_size - len(share))]]


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
