"""Rows over data.max_seq_length (data.too_long: drop, truncate, error; data.max_dropped), the held-out split
taken from data.train (data.eval_split), and `ft data`, which shows both before training."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from ft.data import Row, load_rows
from ft.data_checks import check_rows
from ft.data_split import held_out, recipe_rows
from ft.encode import IGNORE_INDEX, assistant_mask, encode_row, render, truncate
from ft.errors import DataError
from ft.recipe import DataSection
from ft.recipe_io import load_recipe
from conftest import DEMO_DATA, ROOT, run_ft_in_process, write_recipe

IMAGE = DEMO_DATA / "images" / "train_0007.png"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks keep their encoding in the datasets cache: a test's own, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _row(messages: list[dict], where: str = "t.jsonl:1") -> Row:
    return Row(messages, where, DEMO_DATA)


def _talk(words: int, where: str) -> Row:
    return _row([{"role": "user", "content": "Count."},
                 {"role": "assistant", "content": " ".join(["one"] * words)}], where)


def _data(**values) -> DataSection:
    return DataSection(train=Path("t.jsonl"), **values)


def _closing(processor) -> list[int]:
    """The template's end of a row, from an encoded row: its last `<turn|>` and what follows."""
    ids = encode_row(_talk(1, "x"), processor)["input_ids"].tolist()
    close = processor.tokenizer.convert_tokens_to_ids("<turn|>")
    return ids[max(i for i, t in enumerate(ids) if t == close):]


def test_drop_counts_and_names_the_rows(processor, capsys):
    rows = [_talk(3, f"t.jsonl:{i}") for i in range(1, 20)] + [_talk(300, "t.jsonl:20")]
    kept, lengths = check_rows(rows, processor, _data(max_seq_length=64), "data.train")
    assert [r.where for r in kept] == [f"t.jsonl:{i}" for i in range(1, 20)]
    assert lengths == [int(encode_row(r, processor)["input_ids"].numel()) for r in kept]
    assert "data.train: 1 of 20 rows (5.0%) longer than data.max_seq_length (64) dropped: t.jsonl:20" in (
        capsys.readouterr().err.replace("\n", " "))


def test_more_dropped_than_max_dropped_stops_with_the_numbers(processor):
    rows = [_talk(3, "t.jsonl:1"), _talk(300, "t.jsonl:2"), _talk(300, "t.jsonl:3")]
    with pytest.raises(DataError, match=r"data.train: 2 of 3 rows \(66.7%\) longer than data.max_seq_length \(64\) "
                                        r"would be dropped, more than data.max_dropped \(10.0%\): t.jsonl:2, t.jsonl:3"):
        check_rows(rows, processor, _data(max_seq_length=64), "data.train")
    kept, _ = check_rows(rows, processor, _data(max_seq_length=64, max_dropped=0.7), "data.train")
    assert [r.where for r in kept] == ["t.jsonl:1"]
    with pytest.raises(DataError, match=r"data.train: all 2 rows were dropped \(data.too_long: drop\)"):
        check_rows(rows[1:], processor, _data(max_seq_length=64, max_dropped=1.0), "data.train")


def test_error_reports_each_long_row(processor):
    rows = [_talk(3, "t.jsonl:1"), _talk(300, "t.jsonl:2")]
    n = int(encode_row(rows[1], processor)["input_ids"].numel())
    with pytest.raises(DataError, match=rf"t.jsonl:2: {n} tokens, longer than data.max_seq_length \(64\)"):
        check_rows(rows, processor, _data(max_seq_length=64, too_long="error"), "data.train")


def test_truncate_cuts_text_at_the_end_and_closes_the_turn(processor, capsys):
    row = _row([{"role": "user", "content": [{"type": "image", "path": str(IMAGE)},
                                             {"type": "text", "text": "What shape?"}]},
                {"role": "assistant", "content": " ".join(["square"] * 200)}])
    full = encode_row(row, processor)
    closing = _closing(processor)
    limit = int(full["input_ids"].numel()) - 50
    short = truncate(full, limit, processor)
    ids = short["input_ids"].tolist()
    cut = limit - len(closing)
    assert len(ids) == limit
    assert ids == full["input_ids"].tolist()[:cut] + closing
    assert torch.equal(short["pixel_values"], full["pixel_values"])  # the image came before the cut
    trained = (short["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
    spoke = [i for i, m in enumerate(assistant_mask(ids[:cut], processor)) if m]
    assert trained and set(trained) <= set(spoke)  # loss only where the assistant spoke; not on the added closing
    kept, lengths = check_rows([row], processor, _data(max_seq_length=limit, too_long="truncate"), "data.train")
    assert kept == [row] and lengths == [limit]
    assert "data.train: 1 of 1 rows longer than data.max_seq_length" in capsys.readouterr().err


def test_truncate_never_cuts_inside_media_and_drops_what_follows(processor):
    first = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    row = _row([*first, {"role": "user", "content": [{"type": "image", "path": str(IMAGE)},
                                                     {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": "A square."}])
    full = encode_row(row, processor)
    ids = full["input_ids"].tolist()
    tokens = processor.tokenizer.convert_tokens_to_ids([processor.boi_token, processor.eoi_token])
    begin, end = ids.index(tokens[0]), ids.index(tokens[1])
    short = truncate(full, (begin + end) // 2 + len(_closing(processor)), processor)
    # the cut moved to the image's begin token: the image, its pixels and everything after are gone, and the user
    # turn is closed as the template closes a turn
    assert short["input_ids"].tolist() == ids[:begin] + _closing(processor)
    assert "pixel_values" not in short and not short["mm_token_type_ids"].any()
    # the first exchange keeps its labels
    assert torch.equal(short["labels"][:begin], full["labels"][:begin])
    # a cut inside the second turn's header drops the turn; a row with nothing trained left is dropped
    header = encode_row(_row(first), processor)["input_ids"].numel()
    two = truncate(full, header + 2 + len(_closing(processor)), processor)
    assert two["input_ids"].tolist() == ids[:header]
    lonely = _row([{"role": "user", "content": " ".join(["word"] * 100)}, {"role": "assistant", "content": "Ok."}])
    assert truncate(encode_row(lonely, processor), 40, processor) is None


def test_eval_split_is_stable_disjoint_and_by_content(tmp_path):
    rows = [_talk(i % 7 + 1, f"t.jsonl:{i}") for i in range(1, 41)]
    for i, row in enumerate(rows):
        row.messages[0]["content"] = f"Count {i}."
    train, held = held_out(rows, 0.1, seed=0)
    assert len(held) == 4 and len(train) == 36
    assert not {r.where for r in train} & {r.where for r in held}
    assert [r.where for r in held_out(rows, 0.1, seed=0)[1]] == [r.where for r in held]
    shuffled = random.Random(1).sample(rows, len(rows))
    assert {r.where for r in held_out(shuffled, 0.1, seed=0)[1]} == {r.where for r in held}
    assert {r.where for r in held_out(rows, 0.1, seed=1)[1]} != {r.where for r in held}
    assert len(held_out(rows, 3, seed=0)[1]) == 3


def test_recipe_eval_split_holds_rows_out_of_data_train(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    recipe = load_recipe(path, ["data.eval=null", "data.eval_split=0.05"])
    train, held = recipe_rows(recipe)
    again = recipe_rows(load_recipe(path, ["data.eval=null", "data.eval_split=0.05"]))
    assert [r.where for r in held] == [r.where for r in again[1]] and len(held) == 12
    assert len(train) + len(held) == sum(1 for _ in (DEMO_DATA / "train.jsonl").open())
    assert not {r.where for r in train} & {r.where for r in held}
    with pytest.raises(Exception, match="hold rows out of data.train or give data.eval, not both"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["data.eval_split=0.05"])


def test_ft_data_prints_the_summary_and_writes_the_png(tmp_path, processor, monkeypatch):

    png = tmp_path / "lengths.png"
    heldout = DEMO_DATA / "heldout.jsonl"
    # in this process, so its datasets cache is the test's own (`datasets_cache`)
    result = run_ft_in_process("data", str(ROOT / "recipes" / "demo.yaml"), "--png", str(png),
                               f"data.train={heldout}", "data.eval=null")
    assert result.returncode == 0, result.stderr
    rows = load_rows(heldout)
    monkeypatch.setattr(processor.image_processor, "max_soft_tokens", 70)  # the demo's data.image_soft_tokens
    features = [encode_row(r, processor) for r in rows]
    total = sum(int(f["input_ids"].numel()) for f in features)
    trained = sum(int((f["labels"] != IGNORE_INDEX).sum()) for f in features)
    assert f"data.train: {len(rows)} rows, {total} tokens" in result.stderr
    assert f"; {trained} trained" in result.stderr
    assert "data.train: messages (its 'messages' column" in result.stderr
    with Image.open(png) as image:
        assert image.format == "PNG"
    # the first rows as the model sees them: the chat template's text, each media placeholder as a token count
    first = rows[0]
    ids = features[0]["input_ids"]
    expected = render(first, processor)
    for token, begin, end, kind in ((processor.image_token, processor.boi_token, processor.eoi_token, "image"),
                                    (processor.audio_token, processor.boa_token, processor.eoa_token, "audio")):
        n = int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum())
        expected = expected.replace(token, f"{begin}<{kind}: {n} tokens>{end}")
    assert f"--- {first.where}\n{expected}" in result.stderr
    assert result.stderr.count("\n--- ") == 3
