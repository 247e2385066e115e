"""llama.cpp's own greedy and MTP decoding programs, run on ft's files, for bench/eval_speed.py to set beside ft's loop.

`llama-simple` (plain greedy decoding, one token per step) and `llama-speculative-simple --spec-type draft-mtp`
(llama.cpp's reference speculative loop, `common/speculative.cpp`'s MTP driver) are llama.cpp's examples, built
from the llama.cpp that llama-cpp-python vendors, in the same CMake build (`-DLLAMA_BUILD_EXAMPLES=ON`; see
bench/eval_speed.py). Each run loads the model afresh, decodes one prompt and prints its own timings, which are
parsed here; nothing is timed from outside.

    run = speculative(Path("/tmp/lcpp-bld/bin"), Path("model-Q4_K_M.gguf"), Path("drafter-BF16.gguf"),
                      "<|turn>user\\nHi<turn|>\\n<|turn>model\\n", n_new=128, draft_len=3)
    run.tokens_per_second, run.acceptance_rate
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

GPU_LAYERS = "999"  # every layer on the GPU, as eval.runner.LlamaModel asks


@dataclass
class ToolRun:
    """What one llama.cpp run printed: generated tokens, decoding seconds and, for MTP, drafted and accepted."""

    tokens: int
    seconds: float
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def plain(bin_dir: Path, model: Path, prompt: str, n_new: int) -> ToolRun:
    """Greedy decoding by `llama-simple`; the time is its "eval time" (one-token decodes after the prompt, without
    sampling), the figure llama.cpp itself reports as generation speed.

    >>> _eval_time("prompt eval time =  20.10 ms /  26 tokens\\n  eval time =  845.00 ms /  127 runs   (  6.65 ms")
    (127, 0.845)
    """
    log = _run([str(bin_dir / "llama-simple"), "-m", str(model), "-n", str(n_new), "-ngl", GPU_LAYERS, prompt])
    tokens, seconds = _eval_time(log)
    return ToolRun(tokens, seconds)


def speculative(bin_dir: Path, model: Path, drafter: Path, prompt: str, n_new: int, draft_len: int,
                extra: tuple[str, ...] = ()) -> ToolRun:
    """Greedy MTP decoding by `llama-speculative-simple` with the drafter GGUF, drafting `draft_len` tokens every
    step (its default minimum draft probability, 0, never cuts a draft short, as in ft's loop). The time is its
    "decoded" line: the whole loop after the prompt, drafting, verifying and sampling.

    >>> log = "I decoded  131 tokens in    1.250 seconds, speed:  104.8 t/s\\nI n_drafted = 390\\nI n_accept  = 2\\n"
    >>> r = _mtp_counts(log); (r.tokens, r.seconds, r.drafted, r.accepted)
    (131, 1.25, 390, 2)
    """
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as prompt_file:
        prompt_file.write(prompt)
        prompt_file.flush()
        log = _run([str(bin_dir / "llama-speculative-simple"), "-m", str(model), "-md", str(drafter),
                    "--spec-type", "draft-mtp", "--spec-draft-n-max", str(draft_len), "-ngl", GPU_LAYERS,
                    "-ngld", GPU_LAYERS, "-c", str(max(512, 2 * n_new)), "-n", str(n_new), "--temp", "0",
                    "-f", prompt_file.name, *extra])
    return _mtp_counts(log)


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stderr


def _eval_time(log: str) -> tuple[int, float]:
    match = re.search(r"(?<!prompt )\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
    if match is None:
        raise RuntimeError(f"no 'eval time' line in llama-simple's output:\n{log[-2000:]}")
    return int(match.group(2)), float(match.group(1)) / 1000


def _mtp_counts(log: str) -> ToolRun:
    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    drafted = re.search(r"n_drafted = (\d+)", log)
    accepted = re.search(r"n_accept\s+= (\d+)", log)
    if decoded is None or drafted is None or accepted is None:
        raise RuntimeError(f"no decoding summary in llama-speculative-simple's output:\n{log[-2000:]}")
    return ToolRun(int(decoded.group(1)), float(decoded.group(2)), int(drafted.group(1)), int(accepted.group(1)))
