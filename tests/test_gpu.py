"""GPU-only checks, run where CUDA exists (the device tool's machine) and skipped with the reason elsewhere.

A short LoRA run of the tiny model on the GPU gives the same loss curve as on the CPU: same recipe, same seed, the hf
backend (on CUDA `auto` would pick unsloth), fp32 weights and no quantization on both (on CUDA `auto` would pick NF4),
so that only the code that runs on CUDA alone differs: trl's fused LM head against ft's chunked loss, the fused RMSNorm
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

import copy

import pytest
import torch
import yaml
from conftest import run_ft, write_recipe

from ft.kernels import use_fused_kernels
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


def test_fused_kernels_compute_what_transformers_modules_do(tiny) -> None:
    """On bfloat16 rows, ft's RMSNorm (torch's fused kernel) and GeGLU MLP (Liger's) give transformers' outputs and
    input gradients within bfloat16 rounding (both compute in float32 and round once)."""
    model = copy.deepcopy(tiny[0]).to("cuda", torch.bfloat16)
    layer = model.model.language_model.layers[0]
    reference = copy.deepcopy(layer)
    assert use_fused_kernels(layer) == 7  # four layer norms, the q and k norms and the MLP (the v norm has no scale)
    torch.manual_seed(0)
    x = torch.randn(3, 50, model.config.text_config.hidden_size, device="cuda", dtype=torch.bfloat16) * 4
    for name in ("input_layernorm", "self_attn.q_norm", "mlp"):
        fused, plain = layer.get_submodule(name), reference.get_submodule(name)
        width = fused.weight.shape[0] if hasattr(fused, "weight") else x.shape[-1]
        rows = x[..., :width].clone().requires_grad_()
        rows_ref = rows.detach().clone().requires_grad_()
        out, out_ref = fused(rows), plain(rows_ref)
        assert out.dtype == out_ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, out_ref, rtol=1.6e-2, atol=1e-2)
        out.float().square().sum().backward()
        out_ref.float().square().sum().backward()
        torch.testing.assert_close(rows.grad, rows_ref.grad, rtol=3e-2, atol=3e-2)


def test_nf4_dequantisation_is_bitsandbytes_own() -> None:
    """ft's direct call of bitsandbytes' CUDA kernels gives exactly what bitsandbytes' `dequantize_4bit` gives, for a
    12B-sized MLP weight quantised as ft loads them (NF4, nested absmax), into bfloat16 and float16."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    from ft import nf4

    for dtype in (torch.bfloat16, torch.float16):
        layer = bnb.nn.Linear4bit(3840, 15360, bias=False, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4", quant_storage=torch.uint8)
        layer.weight = bnb.nn.Params4bit(torch.randn(15360, 3840, dtype=dtype) * 0.02, requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
        layer = layer.cuda()
        assert nf4._direct(layer.weight, layer.weight.quant_state, dtype)
        expected = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(nf4.dequantize(layer.weight, dtype), expected)


def test_fused_lora_on_cuda_equals_peft() -> None:
    """On CUDA (NF4 base dequantised by `ft.nf4`, bfloat16 autocast, LoRA gradients written as float32 by the matmul),
    the fused projections give peft's loss and LoRA gradients within bfloat16 rounding, and keep doing so on the
    weights AdamW's steps leave (the copies of A and B they compute with follow each step)."""
    from ft.fused_lora import fuse_lora_projections
    from ft.lora import apply_lora
    from ft.models import load_model
    from ft.recipe import LoraSection

    models = []
    for _ in range(2):
        base = load_model("tiny-random:gemma4-unified", "bfloat16", "cuda", "nf4")
        torch.manual_seed(0)
        model = apply_lora(base, LoraSection(r=8))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        model.train()
        models.append(model)
    reference, fused = models
    assert fuse_lora_projections(fused) > 40
    lora = [n for n, p in fused.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([fused.get_parameter(n) for n in lora], lr=1e-3)
    ids = torch.randint(10, 200, (2, 96), generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(3):  # the reference gets the fused model's weights as AdamW leaves them (in-place copies)
        with torch.no_grad():
            for name in lora:
                reference.get_parameter(name).copy_(fused.get_parameter(name))
        results = []
        for model in models:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            model.zero_grad()
        (ref_loss, ref_grads), (loss, grads) = results
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        assert grads.keys() == ref_grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
        for name, grad in grads.items():
            assert torch.linalg.norm(grad - ref_grads[name]) <= 0.05 * torch.linalg.norm(ref_grads[name]), name
        for name, grad in grads.items():
            fused.get_parameter(name).grad = grad
        optimizer.step()
        optimizer.zero_grad()


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
