"""`ft` command line: train, quantize, eval, compare, chat, validate, data, plan, schema.

    ft train recipes/demo.yaml [--resume] [KEY.PATH=VALUE ...]
    ft train recipes/demo.yaml train.devices=2  # several GPUs of this machine, under torchrun (`ft.distributed`)
    torchrun --nproc-per-node 2 -m ft train recipes/demo.yaml
    ft quantize runs/demo [export.KEY=VALUE ...]
    ft eval runs/demo [--remeasure] [eval.KEY=VALUE | export.KEY=VALUE ...]
    ft compare runs/study/eval runs/demo/eval [--out comparison]
    ft chat runs/demo [--quant Q4_K_M] [--image PATH] [--audio PATH] [--system TEXT] [--prompt TEXT] [--adapter]
    ft validate recipes/demo.yaml [KEY.PATH=VALUE ...]
    ft data recipes/demo.yaml [--png lengths.png] [KEY.PATH=VALUE ...]
    ft plan recipes/gemma4-12b-qlora.yaml [KEY.PATH=VALUE ...]
    ft schema > recipe.schema.json
    ft --verbose COMMAND ...                   # also show the libraries' warnings and log messages
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from ft import distributed, rundir
from ft.errors import FtError, RecipeError
from ft.preflight import check_recipe
from ft.quiet import quiet_libraries
from ft.recipe import Recipe
from ft.recipe_io import load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune Gemma 4 with LoRA and ship GGUF files.")
err = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Recipe overrides such as train.lr=1e-4.", show_default=False)
]


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show the libraries' warnings and log messages "
                                                             "(torch, transformers, bitsandbytes, ...).")] = False,
) -> None:
    """Options of every command."""
    if not verbose:
        quiet_libraries()  # before any command imports them


def _fail(exc: FtError) -> None:
    # The message quotes user input (paths, values), so it must never be parsed as Rich markup.
    if distributed.world().main:  # every process of a run met the same error: rank 0 says it once
        err.print(Text.assemble(("ft: error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
    distributed.stop_together()
    raise typer.Exit(exc.exit_code)


def _check_recipe(recipe: Recipe, resume: bool = False) -> None:
    """Every check that needs only the recipe (`ft.preflight`), and its eval tasks against reasoning-gym's registry."""
    check_recipe(recipe, resume)
    if recipe.eval is not None:
        from eval.tasks import check_tasks

        check_tasks(recipe)


@app.command()
def train(
    ctx: typer.Context,
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
) -> None:
    """Train a LoRA as the recipe says, write the run directory, then export and evaluate it when the recipe has
    export / eval sections. With train.devices above 1, in that many processes under torchrun; under torchrun, as
    one of its processes (rank 0 writes the run, exports and evaluates)."""
    here = distributed.world()
    try:
        if here.size > 1:  # the processes join before any check, so that they can stop together on its error
            from ft.resolve import this_machine

            distributed.start(this_machine().device == "cuda")
        # before anything slow: a recipe that cannot work fails in about a second
        loaded = distributed.together(lambda: _training_recipe(recipe, overrides, resume))
        devices = loaded.train.devices
        if here.size == 1 and devices > 1:
            _check_devices(loaded)
            raise typer.Exit(distributed.launch(sys.argv[1:], devices))
        if devices not in (1, here.local_size):
            raise RecipeError(f"{loaded.where('train.devices')}: {devices}, but torchrun started {here.local_size} "
                              "processes on this machine; set train.devices to that, or leave it 1 under torchrun")
        with loaded.blame("output.dir"):  # one writer (rank 0): a second process is told this one's PID
            held = distributed.on_main(lambda: rundir.claim(loaded.output.dir, "run"))
        with held or contextlib.nullcontext():
            from ft.data_split import training_row_count
            from ft.resolve import choose_backend, optimizer_steps, this_machine

            steps = optimizer_steps(loaded, training_row_count(loaded))
            backend = choose_backend(loaded, this_machine(), steps)  # imports unsloth, if it is the one, before trl
            from ft.train import train as run_training  # heavy imports (transformers, trl) only when training

            summary = run_training(loaded, backend, resume=resume, started_at=ctx.obj)
            if summary is None:  # a rank other than 0: its share is done
                return
            err.print_json(json.dumps(summary))
            if loaded.export is None and loaded.eval is None:
                return
            from chat.check import check_export  # the stages after training load llama.cpp

            if loaded.export is not None:
                from quantize.pipeline import export_run

                check_export(export_run(loaded.output.dir))
            if loaded.eval is not None:
                from eval.pipeline import evaluate_run

                check_export(evaluate_run(loaded.output.dir)[1])  # the quants eval exported too
    except FtError as exc:
        _fail(exc)


def _training_recipe(path: Path, overrides: list[str] | None, resume: bool) -> Recipe:
    """The recipe `ft train` was given, with every check that needs only the recipe."""
    loaded = load_recipe(path, overrides)
    if loaded.study:
        raise FtError(f"{loaded.where('study')}: a study trains nothing; run `ft quantize {path}` or "
                      f"`ft eval {path}`")
    _check_recipe(loaded, resume)
    return loaded


def _check_devices(recipe: Recipe) -> None:
    """train.devices against this machine's GPUs (a machine without CUDA runs that many CPU processes)."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else None
    if found is not None and recipe.train.devices > found:
        raise RecipeError(f"{recipe.where('train.devices')}: {recipe.train.devices} processes, one a GPU, but this "
                          f"machine has {found} GPU{'s' * (found > 1)}")


RunArg = Annotated[Path, typer.Argument(help="A run directory, or the recipe that trained it.", show_default=False)]


@app.command()
def quantize(
    target: RunArg,
    overrides: Annotated[list[str] | None, typer.Argument(help="Export overrides such as export.quants=[Q8_0].",
                                                          show_default=False)] = None,
) -> None:
    """Merge the run's LoRA and write GGUF files, projector, drafter, Modelfile and manifest; then check that each
    quant answers and ends its turn through its own template (the results go into the export's README.md)."""
    from chat.check import check_export
    from quantize.pipeline import export_run

    try:
        folder = export_run(target, overrides or [])
        check_export(folder)
    except FtError as exc:
        _fail(exc)
    err.print(f"[green]ok[/]: {folder}")


@app.command(name="eval")
def evaluate(
    target: RunArg,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Eval and export overrides such as eval.quants=[Q8_0,Q2_K].", show_default=False)] = None,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Measure again even if the saved results are up "
                                                                "to date.")] = False,
) -> None:
    """Measure each quant against the reference GGUF (KLD, top-1, accuracy) and decode speed with MTP on/off."""
    from chat.check import check_export
    from eval.pipeline import evaluate_run

    try:
        folder, exported = evaluate_run(target, overrides or [], remeasure)
        check_export(exported)  # quants eval exported: checked as ft quantize checks its own
    except FtError as exc:
        _fail(exc)
    err.print(f"[green]ok[/]: {folder / 'report.md'}")


@app.command()
def compare(
    folders: Annotated[list[Path], typer.Argument(help="Evaluation folders (ft eval's output.dir/eval).",
                                                  show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for comparison.csv and report.md.")] = Path("comparison"),
) -> None:
    """One report over several evaluations of the same text: every quant side by side, and each quant of a later
    evaluation against the same type in the first, with paired 95% intervals."""
    from eval.compare import write_comparison

    try:
        report = write_comparison(folders, out)
    except FtError as exc:
        _fail(exc)
    err.print(f"[green]ok[/]: {report}")


@app.command()
def chat(
    target: RunArg,
    quant: Annotated[str | None, typer.Option("--quant", help="Quant to load (default: the recipe's first "
                                                              "export.quants).", show_default=False)] = None,
    image: Annotated[list[Path] | None, typer.Option("--image", help="An image for the first message "
                                                                     "(repeatable).", show_default=False)] = None,
    audio: Annotated[list[Path] | None, typer.Option("--audio", help="An audio clip for the first message "
                                                                     "(repeatable).", show_default=False)] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Answer this once and exit.",
                                               show_default=False)] = None,
    adapter: Annotated[bool, typer.Option("--adapter", help="Answer through transformers and the LoRA instead "
                                                            "of the GGUF.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens an answer may take.")] = 512,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, help="0 is greedy (default: the "
                                                      "Modelfile's).", show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=0, help="Default: the Modelfile's.",
                                              show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Default: the Modelfile's.",
                                                show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    context: Annotated[int, typer.Option("--context", min=64, help="Context length in tokens.")] = 4096,
) -> None:
    """Talk to the exported GGUF (text, images, audio) through llama.cpp with its own chat template, or to the
    LoRA through transformers (--adapter); sampling defaults to the export's Modelfile."""
    from chat.command import ChatOptions, run_chat

    options = ChatOptions(quant, tuple(image or ()), tuple(audio or ()), system, prompt, adapter, max_tokens,
                          temperature, top_k, top_p, seed, context)
    try:
        run_chat(target, options)
    except FtError as exc:
        _fail(exc)


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check a recipe (schema, output folders, eval tasks, every data row) without training."""
    try:
        loaded = load_recipe(recipe, overrides)
        _check_recipe(loaded)
        from ft.data_checks import load_data
        from ft.models import load_processor

        with loaded.blame("model.name"):
            processor = load_processor(loaded.model.name, loaded.data.image_soft_tokens)
        load_data(loaded, processor)
    except FtError as exc:
        _fail(exc)
    err.print(f"[green]ok[/]: {recipe}")


@app.command()
def data(
    recipe: RecipeArg,
    overrides: Overrides = None,
    png: Annotated[Path, typer.Option("--png", help="Where to write the length histogram.")] = Path("data-lengths.png"),
) -> None:
    """Show the recipe's data as ft will train on it: format, row and token counts, lengths, what data.too_long
    drops or cuts, three rows as the model sees them (needs the processor only, no weights, no GPU)."""
    try:
        loaded = load_recipe(recipe, overrides)
        from ft.data_report import describe_data
        from ft.models import load_processor

        with loaded.blame("model.name"):
            processor = load_processor(loaded.model.name, loaded.data.image_soft_tokens)
        describe_data(loaded, processor, png)
    except FtError as exc:
        _fail(exc)
    err.print(f"[green]ok[/]: {recipe}")


@app.command()
def plan(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Estimate the run's peak GPU memory on a CUDA machine with unsloth installed, from the model's config (no
    weights, no data), and check it against train.memory_budget_gb; exits 2 when it does not fit. With several
    GPUs (train.devices, torchrun) each holds the whole model and its own micro-batch: the plan is each GPU's."""
    try:
        loaded = load_recipe(recipe, overrides)
        from ft.resolve import CUDA_WITH_UNSLOTH, choose_backend, resolve

        # the settings such a machine would run, its error carrying the table when they do not fit
        estimate = resolve(loaded, choose_backend(loaded, CUDA_WITH_UNSLOTH)).plan
        assert estimate is not None  # a CUDA machine's settings always carry a plan
    except FtError as exc:
        _fail(exc)
    err.print(f"{recipe}: {estimate.backend} backend, {estimate.base} base, a step of {loaded.train.batch_size} x "
              f"{loaded.data.max_seq_length} tokens (the recipe's worst case), on each GPU\n"
              f"{estimate.table()}", highlight=False, soft_wrap=True)
    err.print(f"[green]ok[/]: fits {loaded.train.memory_budget_gb:g} GiB")


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editor completion and validation)."""
    sys.stdout.write(json.dumps(Recipe.model_json_schema(), indent=2) + "\n")


def main() -> None:
    """The `ft` command (console script and `python -m ft`)."""
    # ft's own start, handed to the commands: a shell that exec'ed ft ("pip install ... && ft train ...") gives it
    # its process, so the process's creation time would count the shell's whole life.
    started_at = time.time()
    try:
        app(obj=started_at)
    finally:
        # Interpreter teardown would run the cycle collector over every object torch, transformers and llama.cpp
        # imported (about 500,000): a second after "ok" on an idle 2-core machine, far longer on a loaded one.
        # Frozen objects are left to the OS, which frees the memory anyway; atexit handlers still run.
        gc.freeze()
