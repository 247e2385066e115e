"""Datasets as users have them: every format (messages, sharegpt, alpaca) and source (jsonl, json, parquet, csv,
arrow, a datasets folder, a cached hub id) gives the same encoded rows as the same conversations in ft's own form."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import datasets
import pytest
import torch

from ft.data import load_rows
from ft.data_formats import detect_format
from ft.encode import encode_row
from ft.errors import DataError
from ft.recipe import ColumnsSection, HubDataset
from conftest import DEMO_DATA

IMAGE, AUDIO = DEMO_DATA / "images" / "train_0007.png", DEMO_DATA / "audio" / "train_0033.wav"

# The reference: ft's own form, with text, an image and audio clip at the start of a turn, a system prompt and a
# second exchange.
OWN = [
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6."}],
    [{"role": "user", "content": [{"type": "image", "path": str(IMAGE)}, {"type": "text", "text": "What shape?"}]},
     {"role": "assistant", "content": "A square."}],
    [{"role": "user", "content": [{"type": "image", "path": str(IMAGE)}, {"type": "audio", "path": str(AUDIO)},
                                  {"type": "text", "text": "Describe both."}]},
     {"role": "assistant", "content": "A square and a tone."}],
]
# The same conversations as sharegpt rows: from/value turns, media in columns placed at <image> / <audio> markers.
SHAREGPT = [
    {"system": "Answer briefly.",
     "conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4."},
                       {"from": "human", "value": "And 3 + 3?"}, {"from": "gpt", "value": "6."}],
     "images": [], "audios": []},
    {"conversations": [{"from": "human", "value": "<image>What shape?"}, {"from": "gpt", "value": "A square."}],
     "images": [str(IMAGE)], "audios": []},
    {"conversations": [{"from": "human", "value": "<image><audio>Describe both."},
                       {"from": "gpt", "value": "A square and a tone."}],
     "images": [str(IMAGE)], "audios": [str(AUDIO)]},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A datasets cache of the test's own (media given as bytes are written there too)."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _assert_same_encoding(rows, reference, processor) -> None:
    assert len(rows) == len(reference)
    for row, own in zip(rows, reference, strict=True):
        assert not row.problems, (row.where, row.problems)
        got, want = encode_row(row, processor), encode_row(own, processor)
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (row.where, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("own") / "own.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in OWN))
    rows = load_rows(path)
    assert rows.format == "messages"
    return rows


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sharegpt_jsonl_with_media_columns(tmp_path, reference, processor):
    rows = load_rows(_write_jsonl(tmp_path / "share.jsonl", SHAREGPT))
    assert rows.format == "sharegpt" and "{from, value}" in rows.why
    _assert_same_encoding(rows, reference, processor)


def test_openai_messages_with_media_columns_and_mapped_roles(tmp_path, reference, processor):
    names = {"user": "customer", "assistant": "agent"}
    records = [{"chat": [{"speaker": names.get({"human": "user", "gpt": "assistant"}[t["from"]]), "text": t["value"]}
                         for t in r["conversations"]],
                "sys": r.get("system"), "pictures": r["images"], "sounds": r["audios"]} for r in SHAREGPT]
    columns = ColumnsSection(messages="chat", role="speaker", content="text", roles={"customer": "user",
                             "agent": "assistant"}, system="sys", images="pictures", audios="sounds")
    rows = load_rows(_write_jsonl(tmp_path / "mapped.jsonl", records), "sharegpt", columns)
    _assert_same_encoding(rows, reference, processor)


def test_alpaca_json_array_and_csv(tmp_path, processor):
    own = [[{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}],
           [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Red."}]]
    records = [{"instruction": "Add.", "input": "2 + 2", "output": "4", "system": ""},
               {"instruction": "Name a colour.", "input": "", "output": "Red.", "system": "Be terse."}]
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_csv(tmp_path / "alpaca.csv", index=False)
    reference = load_rows(_write_jsonl(tmp_path / "own.jsonl", [{"messages": m} for m in own]))
    for path in (array, tmp_path / "alpaca.csv"):
        rows = load_rows(path)
        assert rows.format == "alpaca", path
        _assert_same_encoding(rows, reference, processor)


def test_alpaca_media_without_markers_go_before_the_first_user_text(tmp_path, processor):
    own = [[{"role": "user", "content": [{"type": "image", "path": str(IMAGE)}, {"type": "audio", "path": str(AUDIO)},
                                         {"type": "text", "text": "Describe both."}]},
            {"role": "assistant", "content": "A square and a tone."}]]
    records = [{"instruction": "Describe both.", "output": "A square and a tone.", "images": [str(IMAGE)],
                "audios": str(AUDIO)}]
    reference = load_rows(_write_jsonl(tmp_path / "own.jsonl", [{"messages": m} for m in own]))
    _assert_same_encoding(load_rows(_write_jsonl(tmp_path / "a.jsonl", records)), reference, processor)


def _media_table() -> datasets.Dataset:
    """SHAREGPT as a table whose media are datasets Image and Audio values holding the files' bytes (audio cast from
    its stored {bytes, path} form: encoding audio values would need torchcodec)."""
    clip = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({
        "system": datasets.Value("string"),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "images": datasets.List(datasets.Image()), "audios": datasets.List(clip),
    })
    rows = [{"system": r.get("system"), "conversations": r["conversations"],
             "images": [{"bytes": Path(p).read_bytes(), "path": None} for p in r["images"]],
             "audios": [{"bytes": Path(p).read_bytes(), "path": "clip.wav"} for p in r["audios"]]} for r in SHAREGPT]
    table = datasets.Dataset.from_list(rows, features=features)
    return table.cast_column("audios", datasets.List(datasets.Audio(decode=False)))


def test_image_and_audio_features_from_parquet_arrow_and_saved_folder(tmp_path, reference, processor):
    table = _media_table()
    table.to_parquet(tmp_path / "share.parquet")
    table.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "share.parquet", tmp_path / "saved", arrow):
        rows = load_rows(source)
        assert rows.format == "sharegpt", source
        _assert_same_encoding(rows, reference, processor)
        # the bytes became files of the same content, named by their hash
        media = [p for r in rows for p in r.media("image") + r.media("audio")]
        assert {p.read_bytes() for p in media} == {IMAGE.read_bytes(), AUDIO.read_bytes()}


def test_marker_count_must_match_the_media(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "<image><image>Two?"}, {"from": "gpt", "value": "No."}],
                "images": [str(IMAGE)]}]
    rows = load_rows(_write_jsonl(tmp_path / "bad.jsonl", records))
    assert rows[0].problems == ["2 <image> markers in the text but 1 images in its column"]


def test_auto_names_the_keys_of_a_file_that_fits_no_format(tmp_path):
    with pytest.raises(DataError, match=r"bad.jsonl:1: fits no known format \(keys: prompt, reply\)"):
        load_rows(_write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "reply": "b"}]))
    fmt, why = detect_format({"instruction": "a", "output": "b"}, ColumnsSection(), "x")
    assert (fmt, why) == ("alpaca", "it has 'instruction' and 'output' columns")


def _cache_as_hub_dataset(cache: Path, repo_id: str, jsonl: Path) -> None:
    """Put `jsonl` into the datasets cache where a download of hub dataset `repo_id` lands: prepared by datasets' own
    JSON builder under that id, in the 'default' configuration a hub dataset without subsets has."""
    from datasets.packaged_modules.json.json import Json

    builder = Json(cache_dir=str(cache), data_files={"train": str(jsonl)}, repo_id=repo_id,
                   dataset_name=repo_id.split("/")[1], hash="0" * 16)
    builder.download_and_prepare()
    config = Path(builder.cache_dir).parents[1]  # <cache>/<owner>___<name>/<config>/<version>/<hash>
    config.rename(config.with_name("default"))


def test_hub_id_offline_cached_loads_and_uncached_fails_fast(tmp_path, datasets_cache, reference, processor,
                                                            monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    _cache_as_hub_dataset(datasets_cache, "someone/chats", _write_jsonl(tmp_path / "share.jsonl", SHAREGPT))
    rows = load_rows(HubDataset(hub="someone/chats"))
    assert rows[0].where == "someone/chats[train]:row 0"
    _assert_same_encoding(rows, reference, processor)

    started = time.monotonic()
    with pytest.raises(DataError, match="dataset 'someone/missing' is not in the datasets cache"):
        load_rows(HubDataset(hub="someone/missing", split="test"))
    assert time.monotonic() - started < 5
