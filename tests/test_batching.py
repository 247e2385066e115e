"""Length-grouped batching: on a mixed-length multimodal dataset, measured by ft's own data path, under 10% of each
batch is padding (random batches of the same rows are mostly padding), and the order replays exactly on resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from ft.batching import LengthGroupedEpochSampler, padding_share
from ft.data import load_rows
from ft.tiny import tiny_processor
from ft.data_checks import check_rows
from ft.recipe import DataSection

BATCH = 8
WORDS = ["the", "a", "lighthouse", "keeper", "storm", "wave", "light", "ship", "rock", "night", "sea", "wind", "rain",
         "harbour", "boat"]


def mixed_dataset(folder: Path, n: int = 240, seed: int = 0) -> Path:
    """Chat rows like a real multimodal mix: short and long text, images, and audio clips of 1-30 s."""
    rng = random.Random(seed)
    (folder / "media").mkdir(parents=True)
    Image.new("RGB", (96, 96), (200, 30, 30)).save(folder / "media" / "image.png")
    for seconds in (1, 5, 15, 30):
        tone = np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, 16_000 * seconds)).astype(np.float32)
        soundfile.write(folder / "media" / f"clip{seconds}.wav", 0.2 * tone, 16_000)
    lines = []
    for _ in range(n):
        kind = rng.choices(["short", "long", "image", "audio"], weights=[4, 2, 2, 2])[0]
        words = rng.randint(5, 40) if kind != "long" else rng.randint(150, 900)
        user: list[dict] = [{"type": "text", "text": " ".join(rng.choices(WORDS, k=words))}]
        if kind == "image":
            user.insert(0, {"type": "image", "path": "media/image.png"})
        if kind == "audio":
            user.insert(0, {"type": "audio", "path": f"media/clip{rng.choice([1, 5, 15, 30])}.wav"})
        answer = " ".join(rng.choices(WORDS, k=rng.randint(3, 60)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": answer}]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lengths(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    path = mixed_dataset(tmp_path_factory.mktemp("mixed"))
    processor = tiny_processor()
    processor.image_processor.max_soft_tokens = 280
    data = DataSection(train=path, max_seq_length=8192, too_long="error")  # every row kept: lengths row by row
    return check_rows(load_rows(path), processor, data, "train")[1]


def test_grouped_batches_are_under_ten_percent_padding(lengths: list[int]) -> None:
    assert len(lengths) >= 200 and max(lengths) > 10 * min(lengths)  # a genuinely mixed set
    grouped = padding_share(lengths, list(LengthGroupedEpochSampler(lengths, BATCH, seed=0)), BATCH)
    shuffled = padding_share(lengths, torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)), BATCH)
    print(f"\npad share over {len(lengths)} rows, batch {BATCH}: grouped {grouped:.3f}, random {shuffled:.3f}")
    assert grouped < 0.10
    assert shuffled > 0.40


def test_order_is_a_shuffled_permutation_that_replays(lengths: list[int]) -> None:
    sampler = LengthGroupedEpochSampler(lengths, BATCH, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths)))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    again = LengthGroupedEpochSampler(lengths, BATCH, seed=3)  # a resumed run builds a new sampler
    again.set_epoch(1)
    assert list(again) == second
    assert list(LengthGroupedEpochSampler(lengths, BATCH, seed=4)) != first
