"""Shared fixtures and helpers: the tiny model, its processor, the demo run, a fast copy of the demo recipe, and
running the `ft` CLI in a fresh process or, where a test is not about the process, in this one."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo"
# Seconds the shell that starts the demo's ft spends before exec'ing it: more than what a busy machine puts between the
# end of the first step and the sight of its loss (interpreter start, four batches' data), so that a first-step time
# counted from the shell's start is caught (tests/test_train.py).
DEMO_SHELL_SLEEP = 10.0

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# As in `ft_env`: rich reads this when a module makes its console, and `run_ft_in_process` runs those modules here.
os.environ.pop("FORCE_COLOR", None)

Result = subprocess.CompletedProcess[str]

# Code for `run_ft(..., after=REPORT_IMPORTS)`: ends stdout with the top-level packages the process imported, so a
# test can tell what a command loaded (`imported`).
REPORT_IMPORTS = """\
import sys
print("imported:", ",".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def ft_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of an ft process: offline, no wandb, no colour codes (they would split the phrases tests look
    for), this checkout's ft first on the path whatever the working folder; `env` on top (None removes a
    variable)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full: dict[str, str | None] = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "NO_COLOR": "1",
                                   "FORCE_COLOR": None, "PYTHONPATH": path, **(env or {})}
    return {key: value for key, value in full.items() if value is not None}


def ft_command(*args: str, after: str = "") -> list[str]:
    """The command line of `ft ARGS...`; with `after`, through ft's console-script entry (as `python -m ft` runs
    it) followed, in the same process and whether or not ft failed, by the Python code `after`."""
    if not after:
        return [sys.executable, "-m", "ft", *args]
    script = f"from ft.cli import main\ntry:\n    main()\nfinally:\n{textwrap.indent(after, '    ')}"
    return [sys.executable, "-c", script, *args]


def run_ft(*args: str, cwd: Path = ROOT, env: Mapping[str, str | None] | None = None, timeout: int = 600,
           after: str = "", input: str = "") -> Result:
    """Run the `ft` CLI in a fresh process, as a user would, `input` on its stdin (`after`: see `ft_command`)."""
    return subprocess.run(ft_command(*args, after=after), capture_output=True, text=True, env=ft_env(env), cwd=cwd,
                          timeout=timeout, input=input)


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """What this process writes to stdout and stderr while the block runs, Python's and the C libraries' (llama.cpp
    writes to the file descriptors itself); once the block is done, the list holds the two texts (stdout, stderr)."""
    captured: list[str] = []
    python_streams = sys.stdout, sys.stderr
    for stream in python_streams:
        stream.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
        try:
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.close()  # flushed; the descriptors stay open (closefd=False)
            ctypes.CDLL(None).fflush(None)  # what C code left in its stdio buffers was written in the block
            sys.stdout, sys.stderr = python_streams
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for file in (out, err):
                file.seek(0)
                captured.append(file.read().decode(errors="replace"))


def run_ft_in_process(*args: str, cwd: Path = ROOT) -> Result:
    """`ft ARGS...` in this process, through the app that the console script runs (`ft.cli.main`), with what
    `run_ft` returns: for a test about what a command does and prints, not about its process, without the
    interpreter start and imports (seconds each time on 2 cores) of a fresh process. An exception ft lets through
    is reported as the interpreter reports it: its traceback on stderr, status 1. What a command changes for the rest
    of its process is put back afterwards: the environment and the root logger's level (`ft.quiet`), warning
    filters, torch's random state (ft chat seeds it), the working folder, argv and the exception hook (typer's)."""
    import torch

    from ft.cli import app

    environ, level, folder = dict(os.environ), logging.getLogger().level, os.getcwd()
    argv, excepthook = sys.argv, sys.excepthook
    status = 0
    with captured_output() as output, warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        os.chdir(cwd)
        sys.argv = ["ft", *args]
        try:
            app(args=list(args), prog_name="ft", obj=time.time())  # obj: ft's start, as `ft.cli.main` passes it
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except Exception:
            traceback.print_exc()
            status = 1
        finally:
            sys.argv, sys.excepthook = argv, excepthook
            os.chdir(folder)
            logging.getLogger().setLevel(level)
            os.environ.clear()
            os.environ.update(environ)
    stdout, stderr = output
    return subprocess.CompletedProcess(["ft", *args], status, stdout, stderr)


def imported(result: Result) -> set[str]:
    """The top-level packages that a `run_ft(..., after=REPORT_IMPORTS)` process had imported when ft was done."""
    last = result.stdout.splitlines()[-1]
    assert last.startswith("imported: "), result.stdout
    return set(last.removeprefix("imported: ").split(","))


def line_of(text: str, snippet: str) -> int:
    """Number (from 1) of the first line of `text` holding `snippet`: where a recipe error must point."""
    for number, line in enumerate(text.splitlines(), start=1):
        if snippet in line:
            return number
    raise AssertionError(f"{snippet!r} not in\n{text}")


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the tiny random Gemma 4, built once per session; tests must not modify the model."""
    from ft.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def processor(tiny):
    return tiny[1]


@dataclass(frozen=True)
class Demo:
    """The demo's run directory, and two moments (time.time()) that bound its first training step from outside."""

    run: Path
    ft_not_before: float  # the exec'ing shell's sleep had ended: ft cannot have started earlier
    first_loss_seen: float  # metrics.jsonl held a training loss: the first step had ended


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The README's demo, once per session: train, export (ft quantize) and evaluate (ft eval) the tiny model.

    ft starts as the README's command starts it, exec'ed by a shell that did other work first (a sleep here), and
    metrics.jsonl is watched for the first logged training loss, so a test can check what summary.json says of the
    first step against the wall clock.
    """
    folder = tmp_path_factory.mktemp("demo")
    run = folder / "run"
    command = ft_command("train", str(ROOT / "recipes" / "demo.yaml"), f"output.dir={run}", "logging.wandb=offline")
    shell = ["bash", "-c", f'sleep {DEMO_SHELL_SLEEP}; exec "$@"', "bash", *command]
    metrics, first_loss_seen = run / "metrics.jsonl", None
    with open(folder / "stderr.txt", "w+") as stderr:
        started = time.time()
        # A hung run fails instead of hanging the tests; the limit is far above the demo's time on a loaded machine.
        deadline = started + DEMO_SHELL_SLEEP + 1800
        process = subprocess.Popen(shell, cwd=ROOT, env=ft_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while first_loss_seen is None and process.poll() is None and time.time() < deadline:
                if metrics.is_file() and '"loss"' in metrics.read_text():  # step 0's line holds only "eval_loss"
                    first_loss_seen = time.time()
                time.sleep(0.05)
            process.wait(timeout=max(deadline - time.time(), 0))
        finally:
            process.kill()  # nothing to do once it has exited
        stderr.seek(0)
        errors = stderr.read()
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
    assert first_loss_seen is not None, "the demo finished before its first loss was seen"
    return Demo(run, started + DEMO_SHELL_SLEEP, first_loss_seen)


@pytest.fixture(scope="session")
def demo_run(demo: Demo) -> Path:
    return demo.run


def write_recipe(path: Path, **sections: dict) -> Path:
    """Write a recipe based on recipes/demo.yaml with absolute data paths, and `sections` merged over it."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["data"]["train"] = str(DEMO_DATA / "train.jsonl")
    recipe["data"]["eval"] = str(DEMO_DATA / "heldout.jsonl")
    recipe["output"]["dir"] = str(path.parent / "run")
    recipe["logging"]["wandb"] = "disabled"
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path
