"""`ft chat`: talk to what a run exported, as a user of llama.cpp or Ollama would, or to the run's adapter itself.

    ft chat runs/demo                                   # interactive, the first export quant
    ft chat runs/demo --quant Q8_0 --image cat.png      # the image goes with the first message
    ft chat runs/demo --prompt "What is 3 + 4?"         # answer once and exit (for scripts)
    ft chat runs/demo --adapter                         # transformers + the LoRA: quantization or training?

Sampling defaults to the export's Modelfile (its PARAMETER lines), so the answers are those Ollama would sample.
In the interactive loop, `/image PATH` and `/audio PATH` attach media to the next message, `/reset` forgets the
conversation, and `/exit` (or Ctrl-D) ends it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from chat.engine import ChatModel, read_media
from ft.errors import FtError
from ft.sampling import Sampling
from ft.recipe import ExportSection, Recipe

console = Console(stderr=True)
Answerer = Callable[[list[dict[str, Any]]], Iterator[str]]


@dataclass(frozen=True)
class ChatOptions:
    quant: str | None = None
    images: tuple[Path, ...] = ()
    audio: tuple[Path, ...] = ()
    system: str | None = None
    prompt: str | None = None
    adapter: bool = False
    max_tokens: int = 512
    temperature: float | None = None  # None: the Modelfile's
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    context: int = 4096


@dataclass(frozen=True)
class ExportFiles:
    """The files of one quant of an export that a chat needs."""

    gguf: Path
    projector: Path | None
    modelfile: Path


def modelfile_parameters(path: Path) -> dict[str, list[str]]:
    """Every `PARAMETER key value` of an Ollama Modelfile, values as written (`stop` may repeat)."""
    parameters: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if match := re.fullmatch(r"PARAMETER\s+(\S+)\s+(.+)", line.strip()):
                value = match[2].strip()
                parameters.setdefault(match[1], []).append(value[1:-1] if value.startswith('"') else value)
    return parameters


def export_files(run: Path, recipe: Recipe, quant: str | None) -> ExportFiles:
    """The GGUF of `quant` (default: the recipe's first export quant) in the run's export folder, its projector
    (when exported) and its Modelfile."""
    folder = recipe.export_dir(run)
    wanted = (quant or (recipe.export or ExportSection()).quants[0]).upper()
    gguf = folder / f"{run.name}-{wanted}.gguf"
    if not gguf.is_file():
        have = sorted(p.stem.removeprefix(f"{run.name}-") for p in folder.glob(f"{run.name}-*.gguf")
                      if "mmproj" not in p.stem and "drafter" not in p.stem and "imatrix" not in p.stem)
        listed = f"exported: {', '.join(have)}" if have else "nothing is exported yet"
        raise FtError(f"no {wanted} GGUF in {folder} ({listed}); run `ft quantize {run} "
                      f"export.quants=[{wanted}]` to make it")
    projector = folder / f"{run.name}-mmproj-F16.gguf"
    return ExportFiles(gguf, projector if projector.is_file() else None, folder / "Modelfile")


def sampling_from(options: ChatOptions, parameters: dict[str, list[str]]) -> Sampling:
    """The options' sampling settings, each one not given taken from the Modelfile's parameters."""
    def pick(given: float | None, key: str, default: float) -> float:
        return given if given is not None else float(parameters.get(key, [default])[0])

    return Sampling(temperature=pick(options.temperature, "temperature", 1.0),
                    top_k=int(pick(options.top_k, "top_k", 0)), top_p=pick(options.top_p, "top_p", 1.0),
                    seed=options.seed)


def first_message(options: ChatOptions, text: str) -> dict[str, Any]:
    """A user message: the options' images and audio, then the text."""
    parts = [{"type": "image", "path": str(p)} for p in options.images]
    parts += [{"type": "audio", "path": str(p)} for p in options.audio]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def check_media(options: ChatOptions, projector: Path | None, gguf: Path) -> None:
    """Before anything loads: every media file is readable, and there is a projector to read it."""
    for kind, paths in (("image", options.images), ("audio", options.audio)):
        for path in paths:
            read_media(kind, path)
    if (options.images or options.audio) and projector is None and not options.adapter:
        raise FtError(f"no projector (NAME-mmproj-F16.gguf) beside {gguf}: images and audio need one; export it "
                      "with export.projector: true")


def run_chat(target: Path, options: ChatOptions) -> None:
    """`ft chat`: one answer (`options.prompt`) or an interactive conversation."""
    from quantize.pipeline import resolve_run

    run, recipe = resolve_run(target)
    if options.adapter and recipe.study:
        raise FtError(f"{run} is a study: it trained no adapter to answer with; chat with its GGUF (no --adapter)")
    files = None if options.adapter else export_files(run, recipe, options.quant)
    check_media(options, files.projector if files else None, files.gguf if files else run)
    parameters = modelfile_parameters(files.modelfile if files else recipe.export_dir(run) / "Modelfile")
    sampling, stop = sampling_from(options, parameters), tuple(parameters.get("stop", []))
    if options.adapter:
        from ft.generate import AdapterChat

        model = AdapterChat(run, recipe)
        answerer: Answerer = lambda messages: model.answer(messages, sampling, options.max_tokens)  # noqa: E731
        console.print(f"chatting with {run / 'adapter'} on {recipe.model.name} (transformers)", highlight=False)
        converse(answerer, options, lambda: None)
        return
    with ChatModel(files.gguf, files.projector, options.context) as model:
        console.print(f"chatting with {files.gguf.name}" + (f" and {files.projector.name}" if files.projector
                                                             else "") + f" ({_describe(sampling)})", highlight=False)

        def answerer(messages: list[dict[str, Any]]) -> Iterator[str]:
            return model.answer(messages, sampling, options.max_tokens, stop)

        def after() -> None:
            if model.last.stop is None:
                console.print(f"[yellow](cut at {options.max_tokens} tokens: --max-tokens)", highlight=False)

        converse(answerer, options, after)


def converse(answerer: Answerer, options: ChatOptions, after: Callable[[], None]) -> None:
    """Stream answers to stdout: the one prompt, or a loop reading messages from stdin until /exit or its end."""
    system = [{"role": "system", "content": options.system}] if options.system else []
    if options.prompt is not None:
        _say(answerer, [*system, first_message(options, options.prompt)])
        after()
        return
    messages, media = list(system), first_message(options, "")["content"][:-1]
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        command, _, argument = line.strip().partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            messages, media = list(system), []
            continue
        if command in ("/image", "/audio"):
            path = Path(argument.strip()).expanduser()
            try:
                read_media(command[1:], path)
            except FtError as exc:  # say so, and go on with the conversation
                console.print(f"[red]{exc}", highlight=False)
                continue
            media.append({"type": command[1:], "path": str(path)})
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": [*media, {"type": "text", "text": line}]})
        media = []
        try:
            answer = _say(answerer, messages)
        except FtError as exc:  # this message cannot be answered (media without a projector): say so, go on
            console.print(f"[red]{exc}", highlight=False)
            messages.pop()
            continue
        after()
        messages.append({"role": "assistant", "content": answer})


def _say(answerer: Answerer, messages: list[dict[str, Any]]) -> str:
    pieces = []
    for piece in answerer(messages):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


def _describe(sampling: Sampling) -> str:
    if sampling.temperature <= 0:
        return "greedy"
    return f"temperature {sampling.temperature:g}, top-k {sampling.top_k}, top-p {sampling.top_p:g}"
