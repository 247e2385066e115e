"""The end of `ft quantize`: each written quant answers a short text, image and audio prompt through its own chat
template, the Modelfile's stop parameters and the projector, as Ollama and llama-server would run it.

What users of the peers report broken after an export is what this catches: an answer that never ends because
llama.cpp does not stop at the template's end-of-turn token, a template that does not load, a projector that loses
images or audio. The answers (the first tokens, and whether the turn ended) go into the export's README.md.

Results are kept in `generation_check.json` by each file's SHA-256 (from manifest.json), so a rerun, or the run after
`ft eval` exported more quants (and rewrote the README), checks only new or changed files.

A turn that reaches `LIMIT` tokens without ending is reported, not refused: a weakly trained model may ramble
through a correct file. What is refused is a file that cannot end a turn at all: the Modelfile's stop token is not
one llama.cpp ends generation at, or the answer reached it and llama.cpp went on.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from rich.console import Console

from chat.command import modelfile_parameters
from chat.engine import ChatModel
from ft.atomic import write_text
from ft.errors import FtError
from ft.rundir import lock
from quantize.manifest import Manifest

console = Console(stderr=True)
LIMIT = 48  # tokens an answer may take
SHOWN = 12  # tokens of each answer shown in the README
SECTION = "## Generation check"


class StopCheckError(FtError):
    """A quant cannot end a turn where its template and Modelfile say the turn ends."""


@dataclass(frozen=True)
class Checked:
    file: str
    prompt: str
    first_tokens: str
    stop: str | None  # the end that was reached, None: cut at LIMIT


def check_prompts(folder: Path) -> list[tuple[str, list[dict]]]:
    """(label, messages) of the three prompts: text, a picture (a colour gradient), a sound (a 440 Hz tone)."""
    image, sound = folder / "gradient.png", folder / "tone.wav"
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (96, 1)), np.tile(ramp[:, None], (1, 96)),
                              np.full((96, 96), 128, np.uint8)], axis=-1)).save(image)
    soundfile.write(sound, 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    return [
        ("text", [{"role": "user", "content": "What is 3 + 4?"}]),
        ("image", [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": "Describe the picture."}]}]),
        ("audio", [{"role": "user", "content": [{"type": "audio", "path": str(sound)},
                                                 {"type": "text", "text": "Describe the sound."}]}]),
    ]


def check_quant(gguf: Path, projector: Path | None, stop: tuple[str, ...],
                prompts: list[tuple[str, list[dict]]]) -> list[Checked]:
    """Greedy answers of one quant to the prompts (media ones only with a projector); StopCheckError when the file
    cannot end a turn."""
    results = []
    with ChatModel(gguf, projector) as model:
        for text in stop:
            token = model.token_id(text)
            if token is None:
                raise StopCheckError(
                    f"{gguf}: its vocabulary has no {text!r} token, where the chat template ends a turn and the "
                    "Modelfile stops: the model can never end its turn with it, so answers run on to the limit")
            if not model.is_end(token):
                raise StopCheckError(
                    f"{gguf}: llama.cpp does not end generation at {text!r} (token {token}), where the chat template "
                    "ends a turn and the Modelfile stops, so llama-server would run past the end of every answer")
        for label, messages in prompts:
            if label != "text" and projector is None:
                continue
            list(model.answer(messages, max_tokens=LIMIT, stop=stop))
            answer = model.last
            if answer.stop is not None and not answer.end_of_generation:
                raise StopCheckError(f"{gguf}: the answer to the {label} prompt reached {answer.stop!r} and "
                                     "llama.cpp went on: it does not end generation there")
            first = model.detokenize(answer.tokens[:SHOWN]) + ("..." if len(answer.tokens) > SHOWN else "")
            results.append(Checked(gguf.name, label, first, answer.stop))
    return results


def check_export(folder: Path) -> list[Checked]:
    """Check every quant that the export folder's manifest.json lists (with its projector, when exported) and write
    the results into its README.md."""
    files = Manifest(folder / "manifest.json").files
    quants = [name for name, f in sorted(files.items()) if f["kind"] == "quantized language model"]
    projector = next((folder / name for name, f in files.items() if f["kind"] == "projector"), None)
    stop = tuple(modelfile_parameters(folder / "Modelfile").get("stop", []))
    # what a file's results depend on besides its own bytes
    inputs = [files[projector.name]["sha256"] if projector else None, list(stop), LIMIT]
    store = folder / "generation_check.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    results = []
    with lock(folder), tempfile.TemporaryDirectory() as media:
        prompts = check_prompts(Path(media))
        for name in quants:
            key = [files[name]["sha256"], *inputs]
            if done.get(name, {}).get("inputs") != key:
                console.print(f"generation check: {name}", highlight=False)
                checked = check_quant(folder / name, projector, stop, prompts)
                done[name] = {"inputs": key, "results": [asdict(c) for c in checked]}
                write_text(store, json.dumps(done, indent=2) + "\n")
            results += [Checked(**r) for r in done[name]["results"]]
        readme = folder / "README.md"
        text = readme.read_text() if readme.is_file() else ""
        write_text(readme, text.split(SECTION)[0].rstrip("\n") + "\n\n" + report(results, prompts))
    cut = [r for r in results if r.stop is None]
    if cut:
        console.print(f"[yellow]generation check: {len(cut)} answers did not end within {LIMIT} tokens (see "
                      f"{folder / 'README.md'})", highlight=False)
    return results


def report(results: list[Checked], prompts: list[tuple[str, list[dict]]]) -> str:
    """The README section: what was asked, the first tokens answered, and whether the turn ended."""
    asked = {label: _text_of(messages) for label, messages in prompts}
    rows = "\n".join(
        f"| `{r.file}` | {r.prompt}: {asked[r.prompt]} | {_cell(r.first_tokens)} | "
        f"{f'yes ({_cell(r.stop)})' if r.stop else f'no (cut at {LIMIT} tokens)'} |" for r in results)
    return (f"{SECTION}\n\nMade by `ft quantize` through llama.cpp: each quant answered greedily through the GGUF's "
            f"own chat template and the Modelfile's stop parameters (the image and audio prompts through the "
            f"projector), at most {LIMIT} tokens.\n\n| file | asked | first tokens answered | turn ended |\n"
            f"|---|---|---|---|\n{rows}\n")


def _text_of(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(f"[{p['type']}]" if p["type"] != "text" else p["text"] for p in content)


def _cell(text: str) -> str:
    """Text shown in a Markdown table cell as written (code span; pipes and newlines escaped)."""
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`" if text else "(nothing)"
