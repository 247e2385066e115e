"""GPU-only checks, run where CUDA exists (the device tool's machine) and skipped with the reason elsewhere.

A short LoRA run of the tiny model on the GPU gives the same loss curve as on the CPU: same recipe, same seed, the hf
backend (on CUDA `auto` would pick unsloth), fp32 weights and no quantization on both (on CUDA `auto` would pick NF4),
so that only the code that runs on CUDA alone differs: trl's fused LM head against ft's chunked loss, Liger's RMSNorm
and GeGLU kernels, and, with gradient checkpointing, activation offloading (the demo's rows are shorter than one MLP
tile; tests/test_long_rows.py checks tiles on the CPU).

The unsloth backend, which `auto` picks for the demo's small micro-batches (8 x 256 tokens), trains the tiny model as
the hf backend does.

A 12B-shaped GGUF loads and decodes through eval in a fresh process that imported numpy, or torch with CUDA, first
(set FT_GGUF_12B to one: `python -m bench.eval_speed --work /tmp/s12 --stage inputs`, then `--stage quantize`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_ft, write_recipe

from ft.resolve import UNSLOTH_WAIT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed-offloaded"])
def test_gpu_loss_curve_matches_cpu(tmp_path: Path, checkpointing: bool) -> None:
    curves = {}
    for device, env in (("cpu", {"CUDA_VISIBLE_DEVICES": ""}), ("cuda", {})):
        (tmp_path / device).mkdir()
        recipe = write_recipe(tmp_path / device / "r.yaml", model={"dtype": "float32", "quantization": "none"},
                              train={"backend": "hf", "max_steps": 20, "log_every": 2, "eval_every": 10,
                                     "save_every": 20, "gradient_checkpointing": checkpointing,
                                     "tiled_mlp": "on" if checkpointing else "off"})
        sections = yaml.safe_load(recipe.read_text())
        del sections["export"], sections["eval"]  # training alone
        recipe.write_text(yaml.safe_dump(sections))
        result = run_ft("train", str(recipe), env=env)
        assert result.returncode == 0, result.stderr
        curves[device] = losses(tmp_path / device / "run")
    assert len(curves["cpu"]) == len(curves["cuda"]) == 10
    assert curves["cuda"] == pytest.approx(curves["cpu"], rel=2e-2), curves
    assert curves["cuda"][-1] < curves["cuda"][0]


def test_unsloth_backend_trains_as_the_hf_backend_does(tmp_path: Path) -> None:
    """The same recipe through the hf backend and through unsloth, which says it waits for its compilation (NF4 base, the demo's text, image and audio rows): the same first-step loss within 1% (the LoRA starts
    as a no-op, so that is the base model's loss on the same batch), a falling curve, and an adapter with the very
    tensor names, shapes and module list that `ft quantize` merges."""
    from safetensors import safe_open

    runs, reasons = {}, {}
    for backend in ("hf", "unsloth"):
        (tmp_path / backend).mkdir()
        recipe = write_recipe(tmp_path / backend / "r.yaml", lora={"vision": True, "audio": True},
                              train={"backend": backend, "max_steps": 12, "log_every": 1, "eval_every": 12,
                                     "save_every": 6, "gradient_checkpointing": True})
        sections = yaml.safe_load(recipe.read_text())
        del sections["export"], sections["eval"]
        recipe.write_text(yaml.safe_dump(sections))
        result = run_ft("train", str(recipe))
        assert result.returncode == 0, result.stderr[-4000:]
        runs[backend] = tmp_path / backend / "run"
        summary = json.loads((runs[backend] / "summary.json").read_text())
        reasons[backend] = (summary["backend"], summary["backend_reason"])
        header = " ".join(result.stderr.split())  # rich wraps the header at the terminal's width
        assert f"{summary['backend']} backend ({summary['backend_reason']}) on cuda" in header
        if backend == "unsloth":
            assert summary["lora_modules"] == json.loads((runs["hf"] / "summary.json").read_text())["lora_modules"]
    assert reasons == {"hf": ("hf", "the recipe asks for hf"),
                       "unsloth": ("unsloth", f"the recipe asks for unsloth; {UNSLOTH_WAIT}")}
    curves = {backend: losses(run) for backend, run in runs.items()}
    assert curves["unsloth"][0] == pytest.approx(curves["hf"][0], rel=1e-2), curves
    assert curves["unsloth"][-1] < curves["unsloth"][0], curves

    def tensors(run: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(run / "adapter" / "adapter_model.safetensors", framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    assert tensors(runs["auto"]) == tensors(runs["hf"])
    assert sorted(p.name for p in (runs["auto"] / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]


GGUF_12B = os.environ.get("FT_GGUF_12B", "")
FIRST = {"numpy": "import numpy", "torch with CUDA": "import torch; torch.zeros(1, device='cuda')"}


@pytest.mark.skipif(not GGUF_12B, reason="set FT_GGUF_12B to a 12B-shaped GGUF (bench/eval_speed.py makes one)")
@pytest.mark.parametrize("first", FIRST)
def test_12b_gguf_loads_whatever_was_imported_first(first: str) -> None:
    code = "\n".join([
        FIRST[first],
        "import sys",
        "assert 'llama_cpp' not in sys.modules",
        "from pathlib import Path",
        "from eval.mtp import decode_all",
        "print(decode_all(Path(sys.argv[1]), [[2, 10, 20, 30]], 8)[0].tokens)",
    ])
    result = subprocess.run([sys.executable, "-c", code, GGUF_12B], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout.splitlines()[-1])) == 8
