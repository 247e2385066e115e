"""Chat rendering, loss masks and batching against hand-written expectations."""

from __future__ import annotations

import numpy as np
import soundfile
import torch
from PIL import Image

from ft.data import Row, load_audio, load_rows
from ft.encode import IGNORE_INDEX, collate, encode_row, render
from conftest import DEMO_DATA


def _row(messages, base=DEMO_DATA) -> Row:
    return Row(messages, "test:1", base)


def _learned_text(features, processor) -> str:
    ids, labels = features["input_ids"], features["labels"]
    return processor.tokenizer.decode(ids[labels != IGNORE_INDEX])


def test_render_uses_gemma4_turn_markers(processor):
    row = _row([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is 3 + 4?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "7."}]},
    ])
    assert render(row, processor) == (
        "<bos><|turn>system\nAnswer briefly.<turn|>\n"
        "<|turn>user\nWhat is 3 + 4?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>7.<turn|>\n"  # as the template opens a turn it asks for
    )


def test_loss_only_on_assistant_turns_including_turn_end(processor):
    row = _row([
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
    ])
    features = encode_row(row, processor)
    assert _learned_text(features, processor) == "2.<turn|>4.<turn|>"
    assert features["labels"][0] == IGNORE_INDEX


def test_placeholders_never_carry_loss(processor):
    row = _row([
        {"role": "user", "content": [{"type": "image", "path": "images/train_0007.png"},
                                     {"type": "audio", "path": "audio/train_0033.wav"},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
    ])
    features = encode_row(row, processor)
    media = features["mm_token_type_ids"] != 0
    assert media.sum() > 0
    assert (features["labels"][media] == IGNORE_INDEX).all()
    assert _learned_text(features, processor) == "A red circle.<turn|>"
    tokenizer = processor.tokenizer
    n_image = int((features["input_ids"] == tokenizer.image_token_id).sum())
    n_audio = int((features["input_ids"] == tokenizer.audio_token_id).sum())
    assert n_image == int((features["image_position_ids"] != -1).all(-1).sum())
    assert n_audio == int(features["input_features_mask"].sum())


def test_collate_pads_right_and_keeps_media_in_row_order(processor):
    rows = load_rows(DEMO_DATA / "train.jsonl")
    with_audio = [r for r in rows if r.media("audio")][:2]
    with_image = [r for r in rows if r.media("image")][:1]
    text_only = [r for r in rows if not r.media("audio") and not r.media("image")][:1]
    features = [encode_row(r, processor) for r in with_audio + with_image + text_only]
    batch = collate(features, pad_token_id=0)
    width = max(f["input_ids"].numel() for f in features)
    assert batch["input_ids"].shape == (4, width)
    for i, f in enumerate(features):
        n = f["input_ids"].numel()
        assert torch.equal(batch["input_ids"][i, :n], f["input_ids"])
        assert (batch["input_ids"][i, n:] == 0).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n
    clips = [f["input_features"][0] for f in features[:2]]
    for k, clip in enumerate(clips):
        assert torch.equal(batch["input_features"][k, : clip.shape[0]], clip)
        assert batch["input_features_mask"][k].sum() == clip.shape[0]
    assert batch["pixel_values"].shape[0] == 1


def test_audio_is_resampled_to_16k_mono(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", stereo * 0.5, 8000)
    wave = load_audio(tmp_path / "a.wav")
    assert wave.ndim == 1 and wave.shape[0] == 16000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 2


def test_jsonl_parquet_and_datasets_folder_give_the_same_inputs(processor, tmp_path):
    import datasets

    rows = load_rows(DEMO_DATA / "heldout.jsonl")[:6]
    table = datasets.Dataset.from_list([{"messages": r.messages} for r in rows])
    parquet = tmp_path / "held.parquet"
    table.to_parquet(str(parquet))
    folder = tmp_path / "held_ds"
    table.save_to_disk(str(folder))
    for other in (parquet, folder):
        # Media paths are relative to the data file's folder; copy the media beside the copies.
        for sub in ("images", "audio"):
            target = (other if other.is_dir() else other.parent) / sub
            if not target.exists():
                target.symlink_to(DEMO_DATA / sub)
        loaded = load_rows(other)
        assert [r.where for r in loaded][:1] == [f"{other}:row 0"]
        for a, b in zip(rows, loaded, strict=True):
            assert not b.problems, b.problems
            fa, fb = encode_row(a, processor), encode_row(b, processor)
            assert fa.keys() == fb.keys()
            for key in fa:
                assert torch.equal(fa[key], fb[key]), key


def test_image_sizes_follow_image_soft_tokens(processor):
    image = Image.new("RGB", (640, 480), "blue")
    processor.image_processor.max_soft_tokens = 140
    try:
        out = processor(images=[[image]], return_tensors="pt")
    finally:
        processor.image_processor.max_soft_tokens = 70
    assert out["pixel_values"].shape[1] == 140
