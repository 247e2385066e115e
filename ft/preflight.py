"""Every check that needs only the recipe, run before anything slow (torch, the model, the data rows).

`ft validate` and `ft train` call `check_recipe` first, so a recipe that cannot work fails in about a second, naming
the recipe line and key: the run directory, export and eval folders (folders ft may write, see `ft.rundir`; a run
directory that holds a run only with --resume or output.overwrite) and the media files of train.sample_prompts.
eval.tasks is checked against reasoning-gym's registry by the CLI, which chains the stages (`eval.tasks.check_tasks`).
The schema (`ft.recipe`) has already checked single values and the rules between keys, such as train.warmup_steps
below train.max_steps and known export.quants types.
"""

from __future__ import annotations

from pathlib import Path

from ft import rundir
from ft.errors import FtError, RecipeError
from ft.recipe import Recipe


def check_recipe(recipe: Recipe, resume: bool = False) -> None:
    """Raise FtError, naming file, line and key: the first folder problem."""
    run = recipe.output.dir
    with recipe.blame("output.dir"):
        rundir.check(run, "run")
    if not resume and not recipe.output.overwrite and rundir.contents(run):
        raise FtError(
            f"{recipe.where('output.dir')}: {run} already holds a run; use --resume to continue it, or set "
            "output.overwrite=true (or pick another output.dir) to start afresh"
        )
    for i, conversation in enumerate(recipe.train.sample_conversations()):
        for message in conversation:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if "path" in part and not Path(part["path"]).is_file():
                    raise RecipeError(f"{recipe.where(f'train.sample_prompts.{i}')}: {part['type']} file not "
                                      f"found: {part['path']}")
    if recipe.export is not None:
        key = "output.dir" if recipe.export.dir is None else "export.dir"
        folder = recipe.export_dir()
        if folder in (run, recipe.eval_dir()):
            raise RecipeError(f"{recipe.where(key)}: the export folder {folder} is the run directory or its eval "
                              "folder; give it a folder of its own")
        with recipe.blame(key):
            rundir.check(folder, "export")
    if recipe.eval is not None:
        with recipe.blame("output.dir"):
            rundir.check(recipe.eval_dir(), "eval")
