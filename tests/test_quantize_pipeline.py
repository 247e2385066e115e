"""`ft quantize` end to end: the export folder, its manifest and Modelfile, resuming, and clear failures.

The demo's trained run (the session's, as `ft train` left it before exporting) is copied once for the module and
exported with the demo's export section; tests that change an export work on copies of that run (always named
`run`, so file names and contents match).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, LlamaFileType

from conftest import ROOT, ft_command, ft_env, run_ft_in_process
from ft.errors import RecipeError
from ft.recipe_io import load_recipe
from ft.rundir import LOCK

pytestmark = pytest.mark.slow

DEMO_EXPORT: dict[str, Any] = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())["export"]
# general.file_type and the main tensor type of a file of each export type.
FILE_TYPES = {
    "F32": (LlamaFileType.ALL_F32, T.F32),
    "F16": (LlamaFileType.MOSTLY_F16, T.F16),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "IQ2_XXS": (LlamaFileType.MOSTLY_IQ2_XXS, T.IQ2_XXS),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {f["file"]: f for f in json.loads((folder / "manifest.json").read_text())["files"]}


def gguf_shas(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.glob("*.gguf"))}


def copy_run(run: Path, parent: Path, export: bool = True) -> Path:
    """A copy of `run` named `run` under `parent`, with or without its gguf/ export (checkpoints left out)."""
    skip = ["checkpoints"] if export else ["checkpoints", "gguf"]
    return Path(shutil.copytree(run, parent / "run", ignore=shutil.ignore_patterns(*skip)))


def set_export(run: Path, **values: Any) -> None:
    """Change the export section of a run's resolved recipe (what `ft quantize RUN` reads)."""
    path = run / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["export"] = {**(recipe["export"] or {}), **values}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error = result.stderr[result.stderr.index("ft: error: "):]
    for needle in needles:
        assert needle in error, result.stderr


@pytest.fixture(scope="module")
def trained(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's run as its training left it, its recipe with the demo's export section: a copy without what its
    export and evaluation wrote (gguf/, eval/, and the base model and drafter that ft quantize copies in), its
    checkpoints and wandb files. Any trained run serves, and the session trains the demo anyway."""
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("gguf", "eval", "base", "drafter-base", "checkpoints",
                                                                 "wandb"))
    return run


@pytest.fixture(scope="module")
def exported(trained: Path) -> Path:
    """The export folder of `trained`, written by one uninterrupted `ft quantize`."""
    result = run_ft_in_process("quantize", str(trained))
    assert result.returncode == 0, result.stderr
    return trained / "gguf"


def test_export_holds_every_file_with_a_true_manifest(exported: Path) -> None:
    names = {"run-F32.gguf", "run-mmproj-F16.gguf", "run-drafter-F32.gguf",
             *(f"run-{q}.gguf" for q in DEMO_EXPORT["quants"])}
    assert {p.name for p in exported.glob("*.gguf")} == names
    assert {"Modelfile", "README.md", "manifest.json"} <= {p.name for p in exported.iterdir()}
    entries = manifest(exported)
    assert set(entries) == names
    for name, entry in entries.items():
        path = exported / name
        assert (entry["sha256"], entry["size"]) == (sha256(path), path.stat().st_size), name
        reader = GGUFReader(path)
        file_type, main_type = FILE_TYPES[entry["type"]]
        assert reader.fields["general.file_type"].contents() == file_type, name
        types = Counter(t.tensor_type for t in reader.tensors)
        quantized = Counter({k: v for k, v in types.items() if k != T.F32}) or types
        assert quantized.most_common(1)[0][0] == main_type, (name, types)
        bits = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
        assert entry["bits_per_weight"] == pytest.approx(bits, abs=1e-3), name
    bpw = {q: entries[f"run-{q}.gguf"]["bits_per_weight"] for q in ("F32", "Q8_0", "Q6_K", "Q4_K_M")}
    assert bpw["F32"] == 32.0
    assert 8.5 <= bpw["Q8_0"] < 9.5 and 6.5625 <= bpw["Q6_K"] < 7.5 and 4.5 <= bpw["Q4_K_M"] < 6, bpw
    assert bpw["F32"] > bpw["Q8_0"] > bpw["Q6_K"] > bpw["Q4_K_M"]
    assert 16 <= entries["run-mmproj-F16.gguf"]["bits_per_weight"] < 20


def test_modelfile_and_readme(exported: Path) -> None:
    lines = (exported / "Modelfile").read_text().splitlines()
    froms = [line.removeprefix("FROM ") for line in lines if line.startswith("FROM ")]
    drafts = [line.removeprefix("DRAFT ") for line in lines if line.startswith("DRAFT ")]
    assert froms == ["./run-Q4_K_M.gguf", "./run-mmproj-F16.gguf"]
    assert drafts == ["./run-drafter-F32.gguf"]
    for reference in froms + drafts:
        assert (exported / reference).is_file(), reference
    text = "\n".join(lines)
    template = text[text.index('TEMPLATE """') : text.index('"""\n', text.index('TEMPLATE """') + 12)]
    for marker in ("<|turn>user", "<|turn>model", "<turn|>"):
        assert marker in template, marker
    assert 'PARAMETER stop "<turn|>"' in lines
    params = dict(line.split()[1:3] for line in lines if line.startswith("PARAMETER ") and "stop" not in line)
    # The tiny model's generation_config.json sets no sampling, so Gemma's published defaults apply.
    assert params == {"temperature": "1.0", "top_k": "64", "top_p": "0.95"}
    readme = (exported / "README.md").read_text()
    assert "ollama create run -f Modelfile" in readme
    for name in manifest(exported):
        assert f"`{name}`" in readme, name


def test_rerun_skips_every_file_and_changes_nothing(exported: Path) -> None:
    def files() -> list[Path]:  # but the lock file, which holds the PID of the last writer
        return sorted(p for p in exported.rglob("*") if p.is_file() and p.name != LOCK)

    before = {p: (p.stat().st_mtime_ns, sha256(p)) for p in files()}
    result = run_ft_in_process("quantize", str(exported.parent))
    assert result.returncode == 0, result.stderr
    for name in manifest(exported):
        assert f"up to date: {name}" in result.stderr, result.stderr
    assert "writing" not in result.stderr and "merging" not in result.stderr, result.stderr
    assert files() == sorted(before)
    for path, (mtime, digest) in before.items():
        assert sha256(path) == digest, path
        if path.name not in ("Modelfile", "README.md"):  # rewritten (same bytes) on every run
            assert path.stat().st_mtime_ns == mtime, path


def start_and_kill_mid_quant(trained: Path, tmp_path: Path, attempts: int = 5) -> tuple[Path, str]:
    """`ft quantize` on fresh copies of `trained`, SIGKILLed once a quantized GGUF is half written."""
    for attempt in range(attempts):
        run = copy_run(trained, tmp_path / f"attempt{attempt}", export=False)
        process = subprocess.Popen(ft_command("quantize", str(run)), cwd=ROOT, env=ft_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                partial = next((run / "gguf").glob(".run-Q*.gguf.tmp-*"), None)
                if partial is not None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return run, partial.name
                time.sleep(0.001)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    pytest.fail(f"ft quantize finished {attempts} times before a quantized file was caught half written")


def test_killed_export_resumes_to_identical_files(trained: Path, exported: Path, tmp_path: Path) -> None:
    run, partial = start_and_kill_mid_quant(trained, tmp_path)
    folder = run / "gguf"
    killed = partial[1:].split(".tmp-")[0]
    assert (folder / partial).exists()
    done = set(manifest(folder))
    assert {"run-F32.gguf", "run-mmproj-F16.gguf", "run-drafter-F32.gguf"} <= done  # finished before the kill
    assert killed not in done
    result = run_ft_in_process("quantize", str(run))
    assert result.returncode == 0, result.stderr
    for name in done:
        assert f"up to date: {name}" in result.stderr, result.stderr
    assert f"writing {killed}" in result.stderr, result.stderr
    assert not list(folder.glob(".*.tmp-*"))
    assert gguf_shas(folder) == gguf_shas(exported)
    assert manifest(folder) == manifest(exported)  # sha256, size, inputs and bits per weight alike
    for name in ("Modelfile", "README.md"):
        assert (folder / name).read_bytes() == (exported / name).read_bytes(), name


def test_damaged_file_is_reported_and_made_again(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported.parent, tmp_path)
    damaged = run / "gguf" / "run-Q8_0.gguf"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = run_ft_in_process("quantize", str(run))
    assert result.returncode == 0, result.stderr
    assert "run-Q8_0.gguf is damaged: its SHA-256 differs from manifest.json's" in result.stderr, result.stderr
    assert "writing run-Q8_0.gguf" in result.stderr and "up to date: run-Q6_K.gguf" in result.stderr, result.stderr
    assert gguf_shas(run / "gguf") == gguf_shas(exported)


def test_foreign_export_dir_is_refused(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported.parent, tmp_path, export=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    set_export(run, dir=str(tmp_path / "mine"))
    assert_clean_failure(run_ft_in_process("quantize", str(run)), "export.dir", "not made by ft")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["precious.txt"]


def test_not_a_run_fails_clearly(tmp_path: Path) -> None:
    assert_clean_failure(run_ft_in_process("quantize", str(tmp_path)), str(tmp_path), "not a run directory")


def test_run_without_adapter_fails_clearly(trained: Path, tmp_path: Path) -> None:
    shutil.copy(trained / "recipe.yaml", tmp_path / "recipe.yaml")
    assert_clean_failure(run_ft_in_process("quantize", str(tmp_path)), "no trained adapter", "ft train")


def test_unknown_quant_type_fails_clearly(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported.parent, tmp_path)
    set_export(run, quants=["Q4_K_M", "Q9_X"])
    assert_clean_failure(run_ft_in_process("quantize", str(run)), "unknown quantization type", "Q9_X")
    assert not list((run / "gguf").glob("*Q9_X*"))


def test_unknown_quant_type_is_a_recipe_error() -> None:
    """Checked when the recipe loads (ft validate, ft train), not hours later at the quant step."""
    with pytest.raises(RecipeError, match="Q9_X"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["export.quants=[Q8_0, Q9_X]"])
    with pytest.raises(RecipeError, match="IQ2_XXS need an importance matrix"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["export.quants=[IQ2_XXS]", "export.imatrix=off"])
    assert load_recipe(ROOT / "recipes" / "demo.yaml", ["export.quants=[q4_k_m]"]).export.quants == ["Q4_K_M"]


def test_iq2_xxs_makes_an_importance_matrix(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported.parent, tmp_path)
    set_export(run, quants=["IQ2_XXS"], calibration_rows=8)
    result = run_ft_in_process("quantize", str(run))
    assert result.returncode == 0, result.stderr
    assert "up to date: run-F32.gguf" in result.stderr, result.stderr
    folder = run / "gguf"
    entries = manifest(folder)
    for name in ("run-imatrix.gguf", "run-IQ2_XXS.gguf"):
        assert entries[name]["sha256"] == sha256(folder / name), name
    assert entries["run-imatrix.gguf"]["kind"] == "importance matrix"
    reader = GGUFReader(folder / "run-IQ2_XXS.gguf")
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_IQ2_XXS
    assert T.IQ2_XXS in {t.tensor_type for t in reader.tensors}
    assert "FROM ./run-IQ2_XXS.gguf" in (folder / "Modelfile").read_text()


def test_iq2_xxs_without_importance_matrix_fails_clearly(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported.parent, tmp_path)
    set_export(run, quants=["IQ2_XXS"], imatrix="off")
    assert_clean_failure(run_ft_in_process("quantize", str(run)), "IQ2_XXS need an importance matrix")
    assert not (run / "gguf" / "run-IQ2_XXS.gguf").exists()
    assert not (run / "gguf" / "run-imatrix.gguf").exists()
