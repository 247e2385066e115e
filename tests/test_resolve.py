"""Every `auto` decided in one place (`ft.resolve`): which backend a run gets (never a silent fallback, a clear error
where a forced backend cannot run, nothing imports unsloth on a machine without CUDA, CI's), the other decisions on
a CPU and on CUDA, and the run header and summary.json printing exactly what the resolver decided. The unsloth
backend itself needs a GPU: tests/test_gpu.py trains with it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import line_of, run_ft, write_recipe

from ft import resolve
from ft.errors import RecipeError
from ft.recipe_io import load_recipe
from ft.data_sources import count_records
from ft.data_split import recipe_rows, training_row_count
from ft.resolve import (
    CUDA_WITH_UNSLOTH,
    UNSLOTH_MIN_STEPS,
    UNSLOTH_STEP_TOKENS,
    UNSLOTH_WAIT,
    Machine,
    choose_backend,
    optimizer_steps,
)

NO_CUDA = Machine("cpu", lambda: pytest.fail("a machine without CUDA never asks for unsloth"))


def recipe_with(tmp_path: Path, backend: str, **train: object) -> Path:
    return write_recipe(tmp_path / "r.yaml", train={"backend": backend, **train})


def test_forced_unsloth_without_cuda_fails_naming_the_line(tmp_path: Path) -> None:
    recipe = recipe_with(tmp_path, "unsloth")
    result = run_ft("train", str(recipe), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    line = line_of(recipe.read_text(), "backend:")
    assert f"{recipe}:{line}: train.backend: unsloth needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_header_and_summary_print_the_resolved_settings(demo_run: Path) -> None:
    """The demo's run header and summary.json hold what the resolver decides for the recipe the run recorded."""
    recipe = load_recipe(demo_run / "recipe.yaml")
    summary = json.loads((demo_run / "summary.json").read_text())
    step = summary.get("memory", {}).get("tokens")  # on CUDA the run planned for its longest rows
    settings = resolve.resolve(recipe, choose_backend(recipe, resolve.this_machine()), step)
    assert summary["settings"] == settings.as_dict()
    assert (summary["backend"], summary["backend_reason"]) == (settings.backend, settings.backend_reason)
    printed = " ".join((demo_run.parent / "stderr.txt").read_text().split())  # rich wraps lines at its width
    assert " ".join(settings.header().split()) in printed
    if settings.device == "cpu":
        assert summary["settings"] == {
            "backend": "hf", "backend_reason": "auto on a machine without CUDA", "device": "cpu", "dtype": "float32",
            "quantization": "none", "gradient_checkpointing": False, "offload_activations": False,
            "tiled_mlp": False, "compiled_layers": False, "wandb": "offline"}


@pytest.mark.parametrize("setting", ["auto", "hf"])
def test_cpu_choice_never_imports_unsloth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    chosen = choose_backend(load_recipe(recipe_with(tmp_path, setting), []), resolve.this_machine())
    assert (chosen.name, chosen.device) == ("hf", "cpu")
    assert "unsloth" not in sys.modules


def test_cuda_without_a_working_unsloth(tmp_path: Path) -> None:
    """auto falls back to hf with the reason recorded; a recipe that asks for unsloth is refused, naming its line."""
    machine = Machine("cuda", lambda: "importing it failed (ImportError: no xformers)")
    auto = choose_backend(load_recipe(recipe_with(tmp_path, "auto"), []), machine)
    assert (auto.name, auto.device) == ("hf", "cuda")
    assert auto.reason == "auto on CUDA, but unsloth cannot run here: importing it failed (ImportError: no xformers)"
    recipe = recipe_with(tmp_path, "unsloth")
    line = line_of(recipe.read_text(), "backend:")
    with pytest.raises(RecipeError, match=rf"{recipe}:{line}: train.backend: unsloth cannot run"):
        choose_backend(load_recipe(recipe, []), machine)


@pytest.mark.parametrize("batch, rows, picked", [(1, UNSLOTH_STEP_TOKENS, "unsloth"),
                                                 (1, UNSLOTH_STEP_TOKENS + 1, "hf"),
                                                 (4, UNSLOTH_STEP_TOKENS // 4, "unsloth"),
                                                 (4, UNSLOTH_STEP_TOKENS // 4 + 1, "hf")])
def test_auto_on_cuda_picks_by_micro_batch_tokens(tmp_path: Path, batch: int, rows: int, picked: str) -> None:
    """unsloth for micro-batches up to UNSLOTH_STEP_TOKENS tokens, ft's own path past it (without asking whether
    unsloth imports), the reason saying so; `ft plan`'s machine gets the same backend."""
    asked: list[str] = []
    machine = Machine("cuda", lambda: asked.append("unsloth"))  # None: it imported
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data={"max_seq_length": rows},
                                      train={"batch_size": batch}), [])
    chosen = choose_backend(recipe, machine)
    assert asked == (["unsloth"] if picked == "unsloth" else [])
    step = f"auto on CUDA with micro-batches up to {batch * rows} tokens ({batch} x {rows}), where "
    assert chosen.name == picked
    if picked == "unsloth":
        assert chosen.reason == f"{step}unsloth is the faster (up to {UNSLOTH_STEP_TOKENS}) over a long run; {UNSLOTH_WAIT}"
    else:
        assert chosen.reason == f"{step}ft's own path is faster than unsloth (past {UNSLOTH_STEP_TOKENS})"
    assert choose_backend(recipe, CUDA_WITH_UNSLOTH) == chosen


@pytest.mark.parametrize("steps, picked", [(UNSLOTH_MIN_STEPS, "hf"), (UNSLOTH_MIN_STEPS + 1, "unsloth")])
def test_auto_on_cuda_picks_hf_for_a_short_run(tmp_path: Path, steps: int, picked: str) -> None:
    """A run of at most UNSLOTH_MIN_STEPS optimizer steps goes to ft's own path, which starts at once, without asking
    whether unsloth imports; a longer one to unsloth, whose reason says that it waits for its compilation."""
    asked: list[str] = []
    machine = Machine("cuda", lambda: asked.append("unsloth"))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data={"max_seq_length": 512}), [])  # 8 x 512 tokens
    chosen = choose_backend(recipe, machine, steps)
    assert (chosen.name, asked) == (picked, ["unsloth"] if picked == "unsloth" else [])
    assert (f"a run of {steps} optimizer steps, too few" in chosen.reason) == (picked == "hf")
    assert (UNSLOTH_WAIT in chosen.reason) == (picked == "unsloth")


def test_ft_train_counts_the_runs_steps_from_the_data(tmp_path: Path) -> None:
    """`ft train` counts the rows of data.train before choosing (the demo's 240 rows at batch 8 for 3 epochs are 90
    optimizer steps), as optimizer_steps computes them from the recipe, less the rows data.eval_split holds out
    (as many as the split itself takes)."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"), [])
    rows = training_row_count(recipe)
    assert rows == count_records(recipe.data.train) == sum(
        1 for line in recipe.data.train.read_text().splitlines() if line.strip())
    for split in ("data.eval_split=0.05", "data.eval_split=30"):
        held = load_recipe(write_recipe(tmp_path / "r.yaml"), ["data.eval=null", split])
        assert training_row_count(held) == len(recipe_rows(held)[0]) < rows
    assert optimizer_steps(recipe, rows) == int(recipe.train.epochs) * math.ceil(rows / recipe.train.batch_size)
    assert optimizer_steps(load_recipe(write_recipe(tmp_path / "r.yaml"), ["train.max_steps=7"]), rows) == 7


@pytest.mark.parametrize("setting, rows", [("unsloth", UNSLOTH_STEP_TOKENS + 1), ("hf", 256)])
def test_a_forced_backend_ignores_the_length_rule(tmp_path: Path, setting: str, rows: int) -> None:
    """The micro-batch bound is auto's alone: a recipe that names a backend gets it on either side of the bound, on
    a CUDA machine and on the one `ft plan` plans for (which never imports unsloth)."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data={"max_seq_length": rows},
                                      train={"backend": setting}), [])
    for machine in (Machine("cuda", lambda: None), CUDA_WITH_UNSLOTH):
        chosen = choose_backend(recipe, machine)
        wait = f"; {UNSLOTH_WAIT}" if setting == "unsloth" else ""
        assert (chosen.name, chosen.reason) == (setting, f"the recipe asks for {setting}{wait}")
        assert choose_backend(recipe, machine, steps=1) == chosen  # a short run too
    assert "unsloth" not in sys.modules


def test_cpu_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU: float32, no quantization, no offloading (trl's streams CUDA tensors), MLP tiles only when asked
    for and checkpointing runs; wandb online only with an API key. No config is read (no plan)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    recipe = load_recipe(recipe_with(tmp_path, "auto", gradient_checkpointing=True, tiled_mlp="on"),
                         ["logging.wandb=auto", "model.name=tiny-random:no-such-model"])
    settings = resolve.resolve(recipe, choose_backend(recipe, NO_CUDA))
    assert settings.as_dict() == {
        "backend": "hf", "backend_reason": "auto on a machine without CUDA", "device": "cpu", "dtype": "float32",
        "quantization": "none", "gradient_checkpointing": True, "offload_activations": False, "tiled_mlp": True,
        "compiled_layers": False, "wandb": "offline"}
    assert settings.plan is None
    for overrides, decided in ((["train.gradient_checkpointing=false"], {"tiled_mlp": False}),
                               (["train.tiled_mlp=auto"], {"tiled_mlp": False}),
                               (["train.compile_layers=true"], {"compiled_layers": True}),
                               (["model.dtype=bfloat16", "model.quantization=nf4"],
                                {"dtype": "bfloat16", "quantization": "nf4"})):
        changed = load_recipe(tmp_path / "r.yaml", overrides)
        settings = resolve.resolve(changed, choose_backend(changed, NO_CUDA)).as_dict()
        assert {key: settings[key] for key in decided} == decided, overrides
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert resolve.resolve(recipe, choose_backend(recipe, NO_CUDA)).wandb == "online"


def test_cuda_settings(tmp_path: Path) -> None:
    """On CUDA: bfloat16 on an NF4 base, ft's offloading with the hf backend's checkpointing, and unsloth always
    checkpointing (its own way: no ft offloading or tiles); the plan is for the settings decided."""
    recipe = load_recipe(recipe_with(tmp_path, "auto", gradient_checkpointing=False), [])
    unsloth = resolve.resolve(recipe, choose_backend(recipe, CUDA_WITH_UNSLOTH))
    step = f"{recipe.train.batch_size * recipe.data.max_seq_length} tokens"
    assert unsloth.as_dict() == {
        "backend": "unsloth", "device": "cuda", "dtype": "bfloat16", "quantization": "nf4",
        "backend_reason": f"auto on CUDA with micro-batches up to {step} ({recipe.train.batch_size} x "
                          f"{recipe.data.max_seq_length}), where unsloth is the faster (up to {UNSLOTH_STEP_TOKENS}) "
                          f"over a long run; {UNSLOTH_WAIT}",
        "gradient_checkpointing": True, "offload_activations": False, "tiled_mlp": False, "compiled_layers": False,
        "wandb": "disabled"}
    assert unsloth.plan is not None and unsloth.plan.backend == "unsloth" and unsloth.plan.quantized
    hf = load_recipe(tmp_path / "r.yaml", ["train.backend=hf", "train.gradient_checkpointing=true"])
    settings = resolve.resolve(hf, choose_backend(hf, CUDA_WITH_UNSLOTH))
    assert (settings.backend, settings.gradient_checkpointing, settings.offload_activations) == ("hf", True, True)
    assert not settings.compiled_layers  # only where the recipe asks (docs/BENCHMARKS.md)
    assert settings.plan is not None and settings.plan.offload and not settings.plan.tiled_mlp
    assert settings.plan.tokens == hf.train.batch_size * hf.data.max_seq_length
    assert f"planned peak {settings.plan.total_gib:.1f} GiB for a step of {settings.plan.tokens} tokens" in \
        settings.header()
    off = load_recipe(tmp_path / "r.yaml", ["train.backend=hf", "train.gradient_checkpointing=true",
                                            "train.offload_activations=off", "model.quantization=none"])
    kept = resolve.resolve(off, choose_backend(off, CUDA_WITH_UNSLOTH), step_tokens=100)
    assert (kept.offload_activations, kept.quantization, kept.plan.tokens, kept.plan.quantized) == (
        False, "none", 100, False)
