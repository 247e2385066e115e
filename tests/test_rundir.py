"""Folders ft writes: never a user's folder, one writer at a time, and every recipe-only error before anything slow.

Each CLI case checks that ft failed before importing torch (what makes such a failure take about a second).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPORT_IMPORTS, ROOT, Result, ft_command, ft_env, imported, line_of, run_ft, write_recipe
from ft import rundir
from ft.errors import FtError
from ft.train import RUN_ENTRIES


def refuse(*args: str) -> Result:
    """`ft ARGS...` in a fresh process that reports what it imported (`conftest.imported`)."""
    return run_ft(*args, after=REPORT_IMPORTS)


def assert_refused(result: Result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, f"missing {needle!r}\n{result.stderr}"
    assert "torch" not in imported(result), "a recipe-only error should stop ft before it imports torch"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "precious.txt").write_text("keep me")
    (path / "sub" / "notes.md").write_text("# mine")
    return path


def ft_run(path: Path, *names: str) -> Path:
    """A folder claimed by ft as a run directory, holding `names` (files)."""
    rundir.claim(path, "run").release()
    for name in names:
        (path / name).write_text(name)
    return path


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_foreign_folder_is_refused_and_kept(tmp_path: Path, overwrite: str) -> None:
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    result = refuse("train", str(write_recipe(tmp_path / "r.yaml")), f"output.dir={folder}",
                            f"output.overwrite={overwrite}")
    assert_refused(result, "output.dir", str(folder), "not made by ft", "precious.txt")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["precious.txt", "sub"]


def test_the_recipes_own_folder_is_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", output={"dir": "."})
    before = snapshot(tmp_path)
    result = refuse("train", str(recipe))
    line = line_of(recipe.read_text(), "dir: .")
    assert_refused(result, f"r.yaml:{line}: output.dir", "not made by ft")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_output_dir_that_is_or_is_under_a_file(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "file" if where == "is-a-file" else tmp_path / "file" / "run"
    result = refuse("train", str(write_recipe(tmp_path / "r.yaml")), f"output.dir={folder}")
    assert_refused(result, "output.dir", "is a file" if where == "is-a-file" else "which is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_under_a_read_only_folder(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    result = refuse("train", str(write_recipe(tmp_path / "r.yaml")), f"output.dir={locked / 'run'}")
    assert_refused(result, "output.dir", "permission denied")


def test_unwritable_folder_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check in-process, for machines whose tests run as root (which ignores permissions)."""
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(FtError, match=f"{tmp_path / 'run'}: permission denied"):
        rundir.check(tmp_path / "run", "run")


def test_existing_run_is_refused_before_anything_loads(tmp_path: Path) -> None:
    run = ft_run(tmp_path / "run", "recipe.yaml", "summary.json")
    before = snapshot(run)
    result = refuse("train", str(write_recipe(tmp_path / "r.yaml")), "output.overwrite=false")
    assert_refused(result, "already holds a run", "--resume")
    assert snapshot(run) == before


def test_unknown_eval_task_names_line_and_suggestion(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml")
    text = yaml.safe_load(recipe.read_text())
    text["eval"]["tasks"] = ["basic_arithmetic", "chain_summ", "no_such_task"]
    recipe.write_text(yaml.safe_dump(text, default_flow_style=False))
    line = line_of(recipe.read_text(), "chain_summ")
    for command in ("validate", "train"):
        result = refuse(command, str(recipe))
        assert_refused(result, f"r.yaml:{line}: eval.tasks[1]: unknown reasoning-gym task 'chain_summ'",
                       "did you mean 'chain_sum'?", f"r.yaml:{line + 1}: eval.tasks[2]", "'no_such_task'")


def test_warmup_not_below_max_steps_stops_train_at_once(tmp_path: Path) -> None:
    result = refuse("train", str(write_recipe(tmp_path / "r.yaml")), "train.max_steps=3")
    assert_refused(result, "train.warmup_steps", "must be smaller than train.max_steps (3)")


def test_foreign_export_dir_is_refused(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "exports")
    recipe = write_recipe(tmp_path / "r.yaml", export={"dir": str(folder)})
    line = line_of(recipe.read_text(), str(folder))
    result = refuse("train", str(recipe))
    assert_refused(result, f"r.yaml:{line}: export.dir", "not made by ft")
    assert not (tmp_path / "run").exists()


def test_export_dir_may_not_be_the_run_directory(tmp_path: Path) -> None:
    result = refuse("validate", str(write_recipe(tmp_path / "r.yaml")), f"export.dir={tmp_path / 'run'}")
    assert_refused(result, "export.dir", "give it a folder of its own")


def test_foreign_eval_folder_is_refused(tmp_path: Path) -> None:
    run = ft_run(tmp_path / "run")
    user_folder(run / "eval")
    result = refuse("train", str(write_recipe(tmp_path / "r.yaml")), "--resume")
    assert_refused(result, "output.dir", f"{run / 'eval'} is not empty", "not made by ft")


def test_a_folder_of_another_kind_is_refused(tmp_path: Path) -> None:
    rundir.claim(tmp_path / "gguf", "export").release()
    with pytest.raises(FtError, match="is an ft export folder, not an ft run directory"):
        rundir.check(tmp_path / "gguf", "run")


def test_fresh_start_removes_only_what_ft_wrote(tmp_path: Path) -> None:
    run = ft_run(tmp_path / "run", "recipe.yaml", "metrics.jsonl", "notes.txt")
    (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    rundir.claim(run / "gguf", "export").release()
    (run / "gguf" / "run-Q8_0.gguf").write_bytes(b"GGUF")
    user_folder(run / "mine")
    rundir.clear(run, RUN_ENTRIES)
    assert sorted(p.name for p in run.iterdir()) == [".ft-lock", ".ft-run", "mine", "notes.txt"]
    assert (run / "mine" / "sub" / "notes.md").read_text() == "# mine"


def test_lock_names_the_holder_and_nests(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with rundir.claim(folder, "run"), rundir.lock(folder):  # nested holds of one process
        assert (folder / rundir.LOCK).read_text().strip() == str(os.getpid())
    with open(folder / rundir.LOCK, "w") as other:  # another holder: a separate open file, as another process has
        other.write("4242\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FtError, match=r"in use by another ft process \(PID 4242\)"):
            rundir.lock(folder)
    rundir.lock(folder).release()  # the lock file stays behind, and never blocks once nobody holds it


def test_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    """Two `ft train` processes on one output.dir: the second exits 2 at once, naming the first's PID; once the
    first is killed (kill -9), its lock file stays but no longer holds anyone off."""
    command = ("train", str(write_recipe(tmp_path / "r.yaml")), "export=null", "eval=null")
    run = tmp_path / "run"
    first = subprocess.Popen(ft_command(*command), cwd=ROOT, env=ft_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        lock = run / rundir.LOCK
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline, "the first process never took the lock"
            time.sleep(0.05)
        result = refuse(*command)
        assert_refused(result, "output.dir", f"in use by another ft process (PID {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.read_text().strip() == str(first.pid)
    rundir.lock(run).release()
