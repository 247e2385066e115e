"""The data checks' encoding: rows without media tokenized together give what the processor gives, and a second check
of the same rows with the same processor and settings reads the kept encoding instead of tokenizing again."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from ft import encode as encode_module
from ft.data import load_rows
from ft.data_checks import check_rows
from ft.data import load_audio, load_image
from ft.encode import (IGNORE_INDEX, assistant_mask, encode_row, encode_rows, encoded_dataset, render,
                       truncate)
from ft.recipe import DataSection
from conftest import DEMO_DATA


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_text_rows_encoded_together_equal_the_processor(processor, monkeypatch):
    monkeypatch.setattr(processor.image_processor, "max_soft_tokens", 70)
    rows = list(load_rows(DEMO_DATA / "train.jsonl"))[:60]
    assert any(r.media("image") for r in rows) and any(not r.media("image") and not r.media("audio") for r in rows)
    for row, features in zip(rows, encode_rows(rows, processor), strict=True):
        # the reference: the processor's own call on the rendered text, labels from the token-by-token mask
        batch = processor(text=[render(row, processor)], return_tensors="pt", padding=False,
                          images=None if not row.media("image") else [[load_image(p)
                                                                        for p in row.media("image")]],
                          audio=[load_audio(p) for p in row.media("audio")] or None)
        ids = batch["input_ids"][0]
        assert torch.equal(features["input_ids"], ids), row.where
        assert torch.equal(features["mm_token_type_ids"], batch["mm_token_type_ids"][0])
        spoke = torch.tensor([bool(m) for m in assistant_mask(ids.tolist(), processor)]) & (
            batch["mm_token_type_ids"][0] == 0)
        assert torch.equal(features["labels"], torch.where(spoke, ids, IGNORE_INDEX)), row.where


def test_second_check_reads_the_kept_encoding(processor, monkeypatch, datasets_cache):
    monkeypatch.setattr(processor.image_processor, "max_soft_tokens", 70)
    data = DataSection(train=Path("t.jsonl"), max_seq_length=48, too_long="truncate", max_dropped=1.0)
    first_rows = load_rows(DEMO_DATA / "heldout.jsonl")
    kept, lengths = check_rows(first_rows, processor, data, "data.train")
    assert list((datasets_cache / "ft-encoded").glob("*.npz"))

    calls = []
    real = encode_module.encode_rows
    monkeypatch.setattr("ft.data_checks.encode_rows", lambda rows, p: calls.append(len(rows)) or real(rows, p))
    again_rows = load_rows(DEMO_DATA / "heldout.jsonl")
    again, again_lengths = check_rows(again_rows, processor, data, "data.train")
    assert calls == []  # nothing tokenized
    assert {r.encoding is None for r in again} == {True, False}  # rows with media, and rows without
    assert [r.where for r in again] == [r.where for r in kept] and again_lengths == lengths
    assert [r.tokens for r in again] == [r.tokens for r in kept]
    # what training reads: rows without media from the kept ids, the others encoded (and cut) on reading; both as
    # encode_row and truncate give them
    dataset = encoded_dataset(again, processor, data.max_seq_length)
    for i, row in enumerate(again):
        want = truncate(encode_row(row, processor), data.max_seq_length, processor)
        got = dataset[i]["features"]
        assert (row.encoding is not None) == (not row.media("image") and not row.media("audio"))
        for key in ("input_ids", "labels", "attention_mask", "mm_token_type_ids"):
            assert torch.equal(got[key], want[key]), (row.where, key)
    # another setting is another encoding
    check_rows(load_rows(DEMO_DATA / "heldout.jsonl"), processor, data.model_copy(update={"max_seq_length": 64}),
               "data.train")
    assert calls
