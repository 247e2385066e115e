"""The generation check at the end of `ft quantize`: each quant of the demo answered (text, image, audio) and ended
its turn, as its README says; a GGUF without the end-of-turn token is refused with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chat.check import LIMIT, SECTION, StopCheckError, check_prompts, check_quant
from chat.command import modelfile_parameters
from test_chat import llama_greedy

TURN_END = b"<turn|>"


def test_the_export_readme_reports_every_quant(demo_run: Path) -> None:
    """The demo ran ft train, which chains ft quantize and ft eval (which exported two more quants)."""
    folder = demo_run / "gguf"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    quants = sorted(f["file"] for f in manifest if f["kind"] == "quantized language model")
    assert len(quants) == 5
    section = (folder / "README.md").read_text().split(SECTION)[1]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    assert [(row[0].strip("| `"), row[1].split(":")[0]) for row in rows] == [
        (name, prompt) for name in quants for prompt in ("text", "image", "audio")]
    assert all(row[3].startswith("yes") or row[3].startswith("no (cut") for row in rows)


def test_the_reported_answer_is_llamas_greedy_answer(demo_run: Path, tmp_path: Path) -> None:
    folder = demo_run / "gguf"
    gguf = folder / f"{demo_run.name}-Q8_0.gguf"
    prompts = check_prompts(tmp_path)
    stop = tuple(modelfile_parameters(folder / "Modelfile")["stop"])
    assert stop == ("<turn|>",)
    results = check_quant(gguf, folder / f"{demo_run.name}-mmproj-F16.gguf", stop, prompts)
    assert [r.prompt for r in results] == ["text", "image", "audio"]
    from chat.engine import ChatModel

    with ChatModel(gguf) as model:
        rendered = model.render(prompts[0][1])
        expected = llama_greedy(gguf, folder / f"{demo_run.name}-mmproj-F16.gguf", rendered, [], LIMIT)
        assert results[0].first_tokens.removesuffix("...") == model.detokenize(expected[:12])
        assert (results[0].stop is not None) == (len(expected) < LIMIT)


@pytest.fixture
def without_turn_end(demo_run: Path, tmp_path: Path) -> Path:
    """The demo's Q8_0 with `<turn|>` gone from its vocabulary: its entry in tokenizer.ggml.tokens (a string with a
    little-endian uint64 length before it) renamed, so no token is `<turn|>` and llama.cpp cannot stop there."""
    source = demo_run / "gguf" / f"{demo_run.name}-Q8_0.gguf"
    data = source.read_bytes()
    entry = len(TURN_END).to_bytes(8, "little") + TURN_END
    assert data.count(entry) == 1
    broken = tmp_path / source.name
    broken.write_bytes(data.replace(entry, len(TURN_END).to_bytes(8, "little") + b"<tUrn|>"))
    return broken


def test_a_gguf_without_the_end_of_turn_token_fails_the_check(without_turn_end: Path, tmp_path: Path) -> None:
    with pytest.raises(StopCheckError, match=r"its vocabulary has no '<turn\|>' token"):
        check_quant(without_turn_end, None, ("<turn|>",), check_prompts(tmp_path))


def test_the_check_refuses_the_export_and_says_so(demo_run: Path, without_turn_end: Path, tmp_path: Path) -> None:
    """Through `ft quantize`: an export whose Q8_0 has no end-of-turn token is one clear error, exit 2."""
    from conftest import run_ft_in_process
    from quantize.manifest import sha256

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, symlinks=True, ignore=shutil.ignore_patterns("*.gguf", "eval", "checkpoints"))
    for gguf in (demo_run / "gguf").glob("*.gguf"):
        (run / "gguf" / gguf.name).symlink_to(gguf)
    broken = run / "gguf" / without_turn_end.name
    broken.unlink()
    shutil.copy(without_turn_end, broken)
    manifest = json.loads((run / "gguf" / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["file"] == broken.name)
    entry["sha256"] = sha256(broken)  # as if the converter had written it so: the export keeps it
    (run / "gguf" / "manifest.json").write_text(json.dumps(manifest))
    result = run_ft_in_process("quantize", str(run))
    assert result.returncode == 2, result.stderr
    assert f"{broken}: its vocabulary has no '<turn|>' token" in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr
