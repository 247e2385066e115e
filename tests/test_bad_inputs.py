"""Bad recipes and bad dataset rows: `ft` must fail with exit code 2 and one clear message, never a traceback.

Every case runs the real CLI in a fresh process, as a user would, and checks four things:
  1. the exit code is 2;
  2. the message names the place: `recipe.yaml:LINE` or the override, and/or the key path (`train.lr`);
     for dataset rows the data file and line (`rows.jsonl:3`) and the field path (`messages[1].content[0].path`);
  3. a phrase says what is wrong (`unknown key`, `image file not found`, ...);
  4. no `Traceback` on stdout or stderr.

Recipe errors stop before torch is imported (a fraction of a second each) and run inline. Cases that load a
processor or model take ~5 s each, so the module starts them all at once, two processes at a time (only those
selected, e.g. by -k), and each test waits for its own result. All bad dataset rows share one data file and one
run: ft reports every bad row at once, and each row is still its own test case.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import DEMO_DATA, ROOT, Result, line_of, run_ft
from PIL import Image

DEMO_IMAGE = DEMO_DATA / "images" / "heldout_0001.png"
DEMO_AUDIO = DEMO_DATA / "audio" / "train_0033.wav"
RECIPE = "recipe.yaml"


# ---------------------------------------------------------------------------------------------------- helpers


def shown(result: Result) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def assert_clean_failure(
    result: Result,
    needles: tuple[str, ...] = (),
    any_of: tuple[tuple[str, ...], ...] = (),
    absent: tuple[str, ...] = (),
) -> None:
    """Exit code 2 with `ft: error:`, every needle and one of each any_of group in stderr, no traceback."""
    assert "Traceback" not in result.stdout + result.stderr, shown(result)
    assert result.returncode == 2, shown(result)
    assert "ft: error:" in result.stderr, shown(result)
    for needle in needles:
        assert needle in result.stderr, f"missing {needle!r}\n{shown(result)}"
    for group in any_of:
        assert any(g in result.stderr for g in group), f"none of {group!r}\n{shown(result)}"
    for needle in absent:
        assert needle not in result.stderr, f"unexpected {needle!r}\n{shown(result)}"


# A valid recipe (but for data.train, which recipe errors never reach); every case edits it.
BASE = """\
model:
  name: tiny-random:gemma4-unified
data:
  train: train.jsonl
  max_seq_length: 256
  image_soft_tokens: 70
lora:
  r: 16
  dropout: 0.0
train:
  lr: 1.0e-4
  schedule: cosine
  warmup_steps: 0
logging:
  wandb: disabled
output:
  dir: run
"""


def edit(*pairs: str, base: str = BASE) -> str:
    """`base` with (old, new, old, new, ...) replacements applied in order; each `old` must occur."""
    text = base
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def at(snippet: str, text: str) -> str:
    """`recipe.yaml:LINE:` of the first line of `text` holding `snippet` (the colon keeps :1 from matching :12)."""
    return f"{RECIPE}:{line_of(text, snippet)}:"


def user(*parts: object) -> dict:
    return {"role": "user", "content": list(parts)}


ASSISTANT = {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}
TEXT = {"type": "text", "text": "What is in the picture?"}


def row(*messages: object, ensure_ascii: bool = True) -> str:
    return json.dumps({"messages": list(messages)}, ensure_ascii=ensure_ascii)


GOOD_ROW = row(user(TEXT), ASSISTANT)


def param(case: RecipeCase | SlowCase) -> object:
    return pytest.param(case, id=case.id)


# ------------------------------------------------------------------------------------ recipe cases (fast, inline)


@dataclass
class RecipeCase:
    id: str
    text: str | bytes | None  # None: no recipe file at all
    needles: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    any_of: tuple[tuple[str, ...], ...] = ()
    absent: tuple[str, ...] = ()


def _recipe_cases() -> list[RecipeCase]:
    cases: list[RecipeCase] = []

    def add(id: str, text: str | bytes | None, *needles: str, **kw: object) -> None:
        cases.append(RecipeCase(id, text, needles, **kw))  # type: ignore[arg-type]

    t = BASE + "trian:\n  lr: 0.1\n"
    add("unknown-top-level-key", t, at("trian:", t), "trian", "unknown key", "did you mean 'train'?")
    t = edit("  dropout: 0.0\n", "  dropuot: 0.1\n")
    add("unknown-nested-key", t, at("dropuot", t), "lora.dropuot", "unknown key", "did you mean 'dropout'?")
    t = edit("  lr: 1.0e-4\n", "  lr: 1.0e-4\n  foo: 1\n")
    add("unknown-nested-key-lists-known", t, at("foo:", t), "train.foo", "unknown key", "known keys:", "warmup_steps")

    t = edit("  warmup_steps: 0\n", "  batch_size: eight\n")
    add("string-for-int", t, at("batch_size", t), "train.batch_size", "valid integer", "got 'eight'")
    t = edit("  lr: 1.0e-4", "  lr: -1.0e-4")
    add("negative-lr", t, at("lr:", t), "train.lr", "greater than 0", "got -0.0001")
    t = edit("  r: 16", "  r: 0")
    add("lora-r-zero", t, at("r: 0", t), "lora.r", "greater than or equal to 1", "got 0")
    t = edit("  dropout: 0.0", "  dropout: 1.5")
    add("dropout-1.5", t, at("dropout", t), "lora.dropout", "less than 1", "got 1.5")
    t = edit("  image_soft_tokens: 70", "  image_soft_tokens: 100")
    add("image-soft-tokens-100", t, at("image_soft_tokens", t), "data.image_soft_tokens",
        "Input should be 70, 140, 280, 560 or 1120", "got 100")
    t = edit("  max_seq_length: 256", "  max_seq_length: 8")
    add("max-seq-length-below-16", t, at("max_seq_length", t), "data.max_seq_length", "greater than or equal to 16")
    t = edit("  schedule: cosine", "  schedule: cosin")
    add("schedule-cosin", t, at("schedule", t), "train.schedule",
        "Input should be 'cosine', 'linear' or 'constant'", "got 'cosin'")
    t = edit("  wandb: disabled", "  wandb: maybe")
    add("wandb-maybe", t, at("wandb", t), "logging.wandb",
        "Input should be 'auto', 'disabled', 'offline' or 'online'", "got 'maybe'")
    t = edit("  r: 16\n", "  r: 16\n  targets: [q_proj, qkv_proj]\n")
    add("lora-target-unknown", t, at("targets", t), "lora.targets[1]", "got 'qkv_proj'")

    t = edit("model:\n  name: tiny-random:gemma4-unified\n", "")
    add("missing-model-section", t, f"{RECIPE}:1:", "model: required key is missing")
    t = edit("data:\n  train: train.jsonl\n  max_seq_length: 256\n  image_soft_tokens: 70\n", "")
    add("missing-data-section", t, f"{RECIPE}:1:", "data: required key is missing")
    t = edit("output:\n  dir: run\n", "")
    add("missing-output-section", t, f"{RECIPE}:1:", "output: required key is missing")
    t = edit("  name: tiny-random:gemma4-unified", "  dtype: auto")
    add("missing-model-name", t, at("model:", t), "model.name: required key is missing")
    t = edit("  name: tiny-random:gemma4-unified", "  name: ''")
    add("empty-model-name", t, at("name:", t), "model.name", "at least 1 character")

    t = edit("  lr: 1.0e-4\n", "  lr: 1.0e-4: 2\n")
    add("yaml-syntax-error", t, at("lr:", t), "not valid YAML", "mapping values are not allowed here")
    t = edit("  schedule: cosine\n", " schedule: cosine\n")
    add("yaml-bad-indent", t, at(" schedule", t), "not valid YAML")
    t = edit("  r: 16\n", "  r: 16\n\tdropout: 0.1\n")
    add("yaml-tab-indent", t, at("\tdropout", t), "not valid YAML", "'\\t'")
    t = BASE + "---\nmodel:\n  name: other\n"
    add("yaml-two-documents", t, at("---", t), "not valid YAML", "another document")
    add("empty-recipe-file", "", RECIPE, "the recipe is empty")
    add("comments-only-recipe", "# nothing here yet\n", RECIPE, "the recipe is empty")
    add("recipe-is-a-list", "- model\n- data\n", f"{RECIPE}:1:", "a recipe is a mapping of sections")
    add("recipe-is-a-scalar", "just some text\n", f"{RECIPE}:1:", "a recipe is a mapping of sections")
    add("recipe-file-not-found", None, "recipe file not found", RECIPE)

    add("override-without-equals", BASE, "override 'train.lr'", "expected KEY.PATH=VALUE", overrides=("train.lr",))
    add("override-empty-key-part", BASE, "override 'train..lr=1'", "expected KEY.PATH=VALUE",
        overrides=("train..lr=1",))
    add("override-unknown-key", BASE, "override 'train.lrr=0.1'", "train.lrr", "unknown key", "did you mean 'lr'?",
        overrides=("train.lrr=0.1",))
    add("override-invalid-value", BASE, "override 'train.lr=-1'", "train.lr", "greater than 0",
        overrides=("train.lr=-1",))
    add("override-invalid-enum", BASE, "override 'logging.wandb=sometimes'", "logging.wandb", "got 'sometimes'",
        overrides=("logging.wandb=sometimes",))
    add("override-value-not-yaml", BASE, "override 'train.lr=[1'", "not valid YAML", overrides=("train.lr=[1",))
    add("override-into-a-value", BASE, "override 'train.lr.x=1'", "train.lr is not a section",
        overrides=("train.lr.x=1",))

    t = edit("  warmup_steps: 0", "  warmup_steps: 10\n  max_steps: 5")
    add("warmup-not-below-max-steps", t, at("warmup_steps", t), "train.warmup_steps",
        "must be smaller than train.max_steps (5)")
    t2 = edit("  warmup_steps: 0", "  warmup_steps: 10")
    add("warmup-not-below-max-steps-by-override", t2, at("warmup_steps", t2), "train.warmup_steps",
        "must be smaller than train.max_steps (10)", overrides=("train.max_steps=10",))
    add("warmup-error-not-blamed-on-unrelated-override", t, at("warmup_steps", t), "train.warmup_steps",
        overrides=("train.lr=0.001",), absent=("override 'train.lr=0.001'",))
    add("recipe-not-utf8", edit("  name: tiny-random:gemma4-unified", "  name: caf\xe9").encode("latin-1"),
        RECIPE, any_of=(("UTF-8", "utf-8"),))
    t = edit("  schedule: cosine", "  schedule: '[/cosine]'")
    add("value-with-rich-markup", t, at("schedule", t), "train.schedule", "got '[/cosine]'")
    return cases


RECIPE_CASES = _recipe_cases()


@pytest.mark.parametrize("case", [param(c) for c in RECIPE_CASES])
def test_bad_recipe(case: RecipeCase, tmp_path: Path) -> None:
    recipe = tmp_path / RECIPE
    if isinstance(case.text, bytes):
        recipe.write_bytes(case.text)
    elif case.text is not None:
        recipe.write_text(case.text, encoding="utf-8")
    result = run_ft("validate", str(recipe), *case.overrides, cwd=tmp_path, timeout=120)
    assert_clean_failure(result, case.needles, case.any_of, case.absent)


# --------------------------------------------------------------------- cases that load a processor (slow, pooled)


@dataclass
class SlowCase:
    id: str
    setup: Callable[[Path], list[list[str]]]  # writes files into its folder; returns the ft command lines to run
    needles: tuple[str, ...] = ()
    any_of: tuple[tuple[str, ...], ...] = ()
    env: tuple[tuple[str, str | None], ...] = ()  # on top of conftest's ft_env(); None removes the variable


def recipe_with(folder: Path, text: str, command: str = "validate") -> list[list[str]]:
    (folder / RECIPE).write_text(text, encoding="utf-8")
    return [[command, str(folder / RECIPE)]]


def _data_file(name: str, content: str | None = None):
    def setup(folder: Path) -> list[list[str]]:
        if content is not None:
            (folder / name).write_text(content)
        return recipe_with(folder, edit("train: train.jsonl", f"train: {name}"))

    return setup


def _missing_eval(folder: Path) -> list[list[str]]:
    (folder / "good.jsonl").write_text(GOOD_ROW + "\n")
    return recipe_with(folder, edit("train: train.jsonl\n", "train: good.jsonl\n  eval: missing-eval.jsonl\n"))


def _model(name: str, config: str | None = None, subdir: str = "model"):
    """A recipe naming `name` as the model; with `config`, a model folder at `subdir` (config.json if non-empty).

    The recipe goes into the parent of `subdir`; ft runs in the case folder.
    """

    def setup(folder: Path) -> list[list[str]]:
        if config is not None:
            (folder / subdir).mkdir(parents=True)
            if config:
                (folder / subdir / "config.json").write_text(config)
        recipe = folder / Path(subdir).parent / RECIPE
        recipe.write_text(edit("tiny-random:gemma4-unified", name.format(folder=folder)), encoding="utf-8")
        return [["validate", str(recipe)]]

    return setup


def _not_utf8_data(folder: Path) -> list[list[str]]:
    latin1 = row(user({"type": "text", "text": "caf\xe9"}), ASSISTANT, ensure_ascii=False).encode("latin-1")
    (folder / "rows.jsonl").write_bytes((GOOD_ROW + "\n").encode() + latin1 + b"\n")
    return recipe_with(folder, edit("train: train.jsonl", "train: rows.jsonl"))


def _train_twice_missing_model(folder: Path) -> list[list[str]]:
    (folder / "good.jsonl").write_text(GOOD_ROW + "\n")
    text = edit("tiny-random:gemma4-unified", str(folder / "no-such-model"), "train: train.jsonl", "train: good.jsonl")
    command = recipe_with(folder, text, command="train")[0]
    return [command, command]  # fails at model loading, before any training; the 2nd run must say the same


MODEL_PLACE = ("model.name", at("name:", BASE))
TRAIN_PLACE = ("data.train", at("train:", BASE))
LLAMA = '{"model_type": "llama"}'

SLOW_CASES = [
    SlowCase("data-file-not-found", _data_file("missing.jsonl"), ("data file not found", "missing.jsonl"),
             (TRAIN_PLACE,)),
    SlowCase("eval-file-not-found", _missing_eval, ("data file not found", "missing-eval.jsonl"),
             (("data.eval", at("eval:", edit("train: train.jsonl\n", "train: good.jsonl\n  eval: x\n"))),)),
    SlowCase("unsupported-data-suffix", _data_file("rows.txt", "role,content\nuser,hi\n"),
             ("rows.txt", "unsupported data format '.txt'"), (TRAIN_PLACE,)),
    SlowCase("model-dir-not-found", _model("{folder}/no-such-model"), ("model directory not found", "no-such-model"),
             (MODEL_PLACE,)),
    SlowCase("model-dir-without-config", _model("{folder}/model", config=""), ("has no config.json",),
             (MODEL_PLACE,)),
    SlowCase("model-dir-other-model-type", _model("{folder}/model", config=LLAMA),
             ("holds a 'llama' model", "gemma4_unified"), (MODEL_PLACE,)),
    SlowCase("uncached-hub-id-offline", _model("someorg/some-model-that-is-not-cached"),
             ("'someorg/some-model-that-is-not-cached'", "not in the Hugging Face cache", "HF_HUB_OFFLINE=1"),
             (MODEL_PLACE,)),
    # online, but nothing answers at the endpoint (a .invalid name never resolves): ft says so at once instead of
    # waiting out huggingface_hub's retries (transformers' own message would say "couldn't connect")
    SlowCase("uncached-hub-id-hub-unreachable", _model("someorg/some-model-that-is-not-cached"),
             ("'someorg/some-model-that-is-not-cached'", "not in the Hugging Face cache", "hub cannot be reached",
              "hub.ft-test.invalid:443"), (MODEL_PLACE,),
             env=(("HF_HUB_OFFLINE", "0"), ("HF_ENDPOINT", "https://hub.ft-test.invalid"),
                  *((v, None) for v in os.environ if v.lower().endswith("_proxy")))),
    SlowCase("model-config-not-json", _model("{folder}/model", config="{oops"), ("config.json",),
             (MODEL_PLACE, ("not valid JSON", "cannot read", "invalid"))),
    SlowCase("model-dir-without-processor-files", _model("{folder}/model", config='{"model_type": "gemma4_unified"}'),
             (), (MODEL_PLACE, ("cannot load model", "preprocessor_config.json"))),
    SlowCase("model-dir-relative-to-recipe", _model("./model", config=LLAMA, subdir="recipes/model"),
             ("holds a 'llama' model",), (MODEL_PLACE,)),
    SlowCase("data-not-utf8", _not_utf8_data, ("rows.jsonl:2:",), (("UTF-8", "utf-8"),)),
    SlowCase("path-with-brackets-shown-verbatim",
             _data_file("rows.jsonl", row(user({"type": "image", "path": "[v2]/photo.png"}), ASSISTANT) + "\n"),
             ("rows.jsonl:1:", "messages[0].content[0].path", "image file not found", "[v2]/photo.png")),
    SlowCase("train-twice-with-missing-model", _train_twice_missing_model, ("model directory not found",)),
]  # fmt: skip


# ---------------------------------------------------------------------------------- bad rows: one file, one run


@dataclass
class BadRow:
    id: str
    text: str  # the JSONL line
    field: str | None  # the field path the message must name (None: the row as a whole)
    phrase: str
    line: int = 0  # set below, from the row's place in the file


def _part(kind: str, path: str) -> dict:
    return {"type": kind, "path": path}


def _bad_rows() -> list[BadRow]:
    content_phrase = "must be a non-empty string or list of parts"
    image = _part("image", str(DEMO_IMAGE))
    audio = _part("audio", str(DEMO_AUDIO))
    return [
        BadRow("invalid-json", '{"messages": [{"role": "user", "content": "hi"}', None, "not valid JSON"),
        BadRow("control-character-in-json", '{"messages": "a\tb"}', None,
               "not valid JSON (Invalid control character at column 16)"),
        BadRow("row-not-an-object", '[{"role": "user", "content": "hi"}]', None, "must be a JSON object"),
        BadRow("row-is-a-string", '"hello"', None, "must be a JSON object"),
        BadRow("messages-missing", json.dumps({"conversation": [user(TEXT), ASSISTANT]}), "'messages'",
               "must be a list"),
        BadRow("messages-not-a-list", json.dumps({"messages": "hello"}), "'messages'", "must be a list"),
        BadRow("empty-conversation", row(), None, "empty conversation"),
        BadRow("message-not-an-object", row("hello", ASSISTANT), "messages[0]", "a message must be an object"),
        BadRow("unknown-role", row({"role": "robot", "content": "hi"}, ASSISTANT), "messages[0].role",
               "unknown role 'robot'"),
        BadRow("missing-role", row({"content": "hi"}, ASSISTANT), "messages[0].role", "unknown role None"),
        BadRow("system-not-first", row(user(TEXT), {"role": "system", "content": "Be brief."}, ASSISTANT),
               "messages[1].role", "a system message may only come first"),
        BadRow("content-empty-list", row({"role": "user", "content": []}, ASSISTANT), "messages[0].content",
               content_phrase),
        BadRow("content-missing", row({"role": "user"}, ASSISTANT), "messages[0].content", content_phrase),
        BadRow("content-a-number", row({"role": "user", "content": 5}, ASSISTANT), "messages[0].content",
               content_phrase),
        BadRow("part-not-an-object", row(user("hi"), ASSISTANT), "messages[0].content[0]",
               "a content part must be an object"),
        BadRow("unknown-part-type", row(user(_part("video", "clip.mp4")), ASSISTANT), "messages[0].content[0].type",
               "unknown part type 'video'"),
        BadRow("text-part-without-text", row(user({"type": "text"}), ASSISTANT), "messages[0].content[0].text",
               "a text part needs a 'text' string"),
        BadRow("text-part-text-not-a-string", row(user({"type": "text", "text": 42}), ASSISTANT),
               "messages[0].content[0].text", "a text part needs a 'text' string"),
        BadRow("image-part-without-path", row(user(TEXT, {"type": "image"}), ASSISTANT),
               "messages[0].content[1].path", "an image part needs a 'path'"),
        BadRow("audio-part-empty-path", row(user(_part("audio", "")), ASSISTANT), "messages[0].content[0].path",
               "an audio part needs a 'path'"),
        BadRow("image-file-missing", row(user(TEXT, _part("image", "images/missing.png")), ASSISTANT),
               "messages[0].content[1].path", "image file not found"),
        BadRow("audio-file-missing", row(user(_part("audio", "nowhere.wav")), ASSISTANT),
               "messages[0].content[0].path", "audio file not found"),
        BadRow("corrupt-image", row(user(_part("image", "corrupt.png")), ASSISTANT), "messages[0].content[0].path",
               "unreadable image corrupt.png"),
        BadRow("truncated-image", row(user(_part("image", "truncated.png")), ASSISTANT),
               "messages[0].content[0].path", "unreadable image truncated.png"),
        BadRow("image-smaller-than-a-patch", row(user(TEXT, _part("image", "one-pixel.png")), ASSISTANT),
               "messages[0].content[1].path",
               "image one-pixel.png is 1x1 px, smaller than the image processor's 16x16 px patch"),
        BadRow("garbage-audio", row(user(_part("audio", "garbage.wav")), ASSISTANT), "messages[0].content[0].path",
               "unreadable audio garbage.wav"),
        BadRow("zero-byte-audio", row(user(_part("audio", "zero-bytes.wav")), ASSISTANT),
               "messages[0].content[0].path", "unreadable audio zero-bytes.wav"),
        BadRow("audio-without-frames", row(user(_part("audio", "no-frames.wav")), ASSISTANT),
               "messages[0].content[0].path", "audio no-frames.wav is empty"),
        BadRow("assistant-with-image", row(user(TEXT), {"role": "assistant", "content": [image]}),
               "messages[1].content[0]", "assistant turns can only hold text"),
        BadRow("assistant-with-audio", row(user(TEXT), {"role": "assistant", "content": [TEXT, audio]}),
               "messages[1].content[1]", "assistant turns can only hold text"),
        BadRow("no-assistant-message", row(user(TEXT)), None, "no assistant message"),
        BadRow("not-ending-with-assistant", row(user(TEXT), ASSISTANT, user(TEXT)), None,
               "must end with an assistant message"),
        # A well-formed row: only the recipe's data.max_seq_length of 16 makes it bad.
        BadRow("longer-than-max-seq-length", row(user(TEXT, image), ASSISTANT), None,
               "longer than data.max_seq_length (16)"),
    ]  # fmt: skip


BAD_ROWS = _bad_rows()
BLANK_AFTER = 3  # a blank line after the 3rd row: ft skips it, and must still count it in line numbers
for _number, _bad in enumerate(BAD_ROWS, start=1):
    _bad.line = _number + (_number > BLANK_AFTER)


def _write_bad_media(folder: Path) -> None:
    """Bad media files next to the data file; the rows name them by relative path."""
    (folder / "corrupt.png").write_bytes(b"this is not a png \x00\x01\x02\x03\xff\xfe")
    image = DEMO_IMAGE.read_bytes()
    (folder / "truncated.png").write_bytes(image[: len(image) // 2])
    Image.new("RGB", (1, 1)).save(folder / "one-pixel.png")
    (folder / "garbage.wav").write_bytes(b"RIFF....WAVEnot audio at all")
    (folder / "zero-bytes.wav").write_bytes(b"")
    soundfile.write(str(folder / "no-frames.wav"), np.zeros(0, dtype=np.float32), 16_000)


def _bad_rows_file(folder: Path) -> list[list[str]]:
    _write_bad_media(folder)
    lines = [bad.text for bad in BAD_ROWS]
    lines.insert(BLANK_AFTER, "")
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = edit("train: train.jsonl", "train: rows.jsonl", "max_seq_length: 256",
                "max_seq_length: 16\n  too_long: error")  # a long row is an error, not dropped
    return recipe_with(folder, text)


DATA_ROWS = SlowCase("data-rows", _bad_rows_file)
CONTROL = SlowCase("demo-recipe", lambda folder: [["validate", str(ROOT / "recipes" / "demo.yaml")]])


def _large_image(folder: Path) -> list[list[str]]:
    Image.new("L", (8000, 8000)).save(folder / "large.png", compress_level=1)
    (folder / "rows.jsonl").write_text(GOOD_ROW + "\n" + row(user(TEXT, _part("image", "large.png")), ASSISTANT) + "\n")
    return recipe_with(folder, edit("train: train.jsonl", "train: rows.jsonl"))


LARGE_IMAGE = SlowCase("large-image", _large_image)


# -------------------------------------------------------------------------- running slow cases two at a time


class Jobs:
    """Slow cases run in a pool of two; each case's commands run in order in its own folder."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict[str, Future[list[Result]]] = {}

    def start(self, case: SlowCase) -> None:
        if case.id not in self.futures:
            folder = self.tmp.mktemp(case.id)
            self.futures[case.id] = self.pool.submit(self._run, case, folder)

    @staticmethod
    def _run(case: SlowCase, folder: Path) -> list[Result]:
        return [run_ft(*command, cwd=folder, env=dict(case.env)) for command in case.setup(folder)]

    def results(self, case: SlowCase) -> list[Result]:
        self.start(case)
        return self.futures[case.id].result()


@pytest.fixture(scope="module", autouse=True)
def jobs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start the slow cases of the selected tests at once, longest first; each test waits for its own."""
    wanted: set[str] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:  # doctest items have no module
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "slow" in params:
            wanted.add(params["slow"].id)
        if "bad" in params or item.name == "test_all_bad_rows_reported_in_one_run":
            wanted.add(DATA_ROWS.id)
        if item.name == "test_demo_recipe_is_valid":
            wanted.add(CONTROL.id)
        if item.name == "test_large_image_is_accepted_with_a_warning":
            wanted.add(LARGE_IMAGE.id)
    jobs = Jobs(tmp_path_factory)
    for case in [CONTROL, DATA_ROWS, LARGE_IMAGE, *SLOW_CASES]:
        if case.id in wanted:
            jobs.start(case)
    yield jobs
    jobs.pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("slow", [param(c) for c in SLOW_CASES])
def test_bad_model_or_data_file(slow: SlowCase, jobs: Jobs) -> None:
    for result in jobs.results(slow):
        assert_clean_failure(result, slow.needles, slow.any_of)


@pytest.mark.parametrize("bad", [pytest.param(b, id=b.id) for b in BAD_ROWS])
def test_bad_row(bad: BadRow, jobs: Jobs) -> None:
    """Each bad row is reported on its own line: `rows.jsonl:LINE: FIELD: what is wrong`."""
    (result,) = jobs.results(DATA_ROWS)
    assert_clean_failure(result)
    reported = [line for line in result.stderr.splitlines() if f"rows.jsonl:{bad.line}: " in line]
    assert reported, f"row {bad.id} (rows.jsonl:{bad.line}) is not reported\n{shown(result)}"
    assert any(bad.phrase in line and (bad.field is None or f": {bad.field}" in line) for line in reported), (
        f"rows.jsonl:{bad.line} should say '{bad.field or '(the row)'}: ...{bad.phrase}...'\n{shown(result)}"
    )


def test_all_bad_rows_reported_in_one_run(jobs: Jobs) -> None:
    """ft lists every bad row at once: one problem line per row, and the count in the header."""
    (result,) = jobs.results(DATA_ROWS)
    assert_clean_failure(result, (f"{len(BAD_ROWS)} of {len(BAD_ROWS)} rows are invalid",))
    problem_lines = [line for line in result.stderr.splitlines() if "rows.jsonl:" in line]
    assert len(problem_lines) == len(BAD_ROWS), shown(result)


def test_demo_recipe_is_valid(jobs: Jobs) -> None:
    """Control: the bundled demo recipe and data pass, so the bad cases cannot pass vacuously."""
    (result,) = jobs.results(CONTROL)
    assert "Traceback" not in result.stdout + result.stderr, shown(result)
    assert result.returncode == 0, shown(result)
    assert "ok:" in result.stderr and "demo.yaml" in result.stderr, shown(result)
    assert "ft: error" not in result.stderr, shown(result)


def test_large_image_is_accepted_with_a_warning(jobs: Jobs) -> None:
    """An 8000x8000 image is resized by the processor like any other; ft says which row holds it, and passes."""
    (result,) = jobs.results(LARGE_IMAGE)
    assert "Traceback" not in result.stdout + result.stderr, shown(result)
    assert result.returncode == 0, shown(result)
    warning = "rows.jsonl:2: messages[0].content[1].path: image large.png is 8000x8000 px (64.0 MP, over 41.3 MP)"
    assert warning in result.stderr, shown(result)
