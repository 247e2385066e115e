"""Quant-sensitivity studies (`study: true`): the model exported and evaluated as it is, without training; and a
GGUF the user already has (`model.gguf`) as the reference, not converted again.

One small study of the tiny model is made once for the module (Q8_0 only, 256 tokens, no answers or speed), and a
second one whose model.gguf is the first's reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import DEMO_DATA, run_ft, run_ft_in_process

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog. 1 + 2 = 3, and"


def study_recipe(folder: Path, **model: Any) -> Path:
    """A small study recipe in `folder`, writing its run directory `folder/run`."""
    recipe = {
        "study": True,
        "model": {"name": "tiny-random:gemma4-unified", **model},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "heldout.jsonl")},
        "logging": {"wandb": "disabled"},
        "output": {"dir": str(folder / "run")},
        "export": {"quants": ["Q8_0"], "reference": "F32", "projector": False},
        "eval": {"quants": ["Q8_0"], "context": 64, "max_tokens": 256, "samples": 0, "heldout": False,
                 "speed": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ft_ok(*args: str) -> str:
    result = run_ft_in_process(*args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def base_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = study_recipe(tmp_path_factory.mktemp("study") / "base")
    ft_ok("eval", str(recipe))
    return recipe.parent / "run"


@pytest.fixture(scope="module")
def given_study(base_study: Path) -> Path:
    recipe = study_recipe(base_study.parent.parent / "given", gguf=str(base_study / "gguf" / "run-F32.gguf"))
    ft_ok("eval", str(recipe))
    return recipe.parent / "run"


def results(run: Path) -> dict[str, Any]:
    return json.loads((run / "eval" / "results.json").read_text())


def test_study_makes_a_run_directory_without_training(base_study: Path) -> None:
    assert not (base_study / "adapter").exists() and not (base_study / "gguf" / "merged").exists()
    assert yaml.safe_load((base_study / "recipe.yaml").read_text())["study"] is True
    measured = results(base_study)
    assert [q["type"] for q in measured["quants"]] == ["F32 (reference)", "Q8_0"]
    # the reference's chunks all have KLD 0, so Q8_0's paired difference from it is its own mean KLD
    q8 = measured["quants"][1]["divergence"]
    [pair] = measured["pairs"]
    assert (pair["type"], pair["against"], pair["kld_mean"]["n"]) == ("Q8_0", "F32 (reference)", 256 // 64)
    assert pair["kld_mean"]["difference"] == pytest.approx(q8["kld_mean"], rel=1e-9)


def test_study_reference_is_the_base_model(base_study: Path) -> None:
    """The F32 reference computes transformers' logits of the base checkpoint (the bound of tests/test_gguf_lm.py)."""
    from llama_cpp import GGML_TYPE_F32, Llama
    from transformers import AutoTokenizer, Gemma4UnifiedForConditionalGeneration

    base = base_study / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(base_study / "gguf" / "run-F32.gguf"), logits_all=True, n_ctx=128, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-3


def test_given_gguf_is_the_reference_unconverted(base_study: Path, given_study: Path) -> None:
    given = base_study / "gguf" / "run-F32.gguf"
    reference = given_study / "gguf" / "run-F32.gguf"
    assert reference.is_symlink() and reference.resolve() == given.resolve()
    entry = {f["file"]: f for f in json.loads((given_study / "gguf" / "manifest.json").read_text())["files"]}
    assert entry["run-F32.gguf"]["source"] == str(given)
    q8 = [run / "gguf" / "run-Q8_0.gguf" for run in (base_study, given_study)]
    assert q8[0].read_bytes() == q8[1].read_bytes()
    assert results(given_study)["quants"] == results(base_study)["quants"]


def test_study_refuses_training_and_a_mismatched_gguf(base_study: Path, tmp_path: Path) -> None:
    recipe = study_recipe(tmp_path / "t")
    result = run_ft_in_process("train", str(recipe))
    line = recipe.read_text().splitlines().index("study: true") + 1
    assert result.returncode != 0 and f"{recipe}:{line}: study: a study trains nothing" in result.stderr
    text = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**text, "train": {"lr": 0.1}}))
    result = run_ft_in_process("quantize", str(recipe))
    assert result.returncode != 0 and "remove the train section" in result.stderr
    given = base_study / "gguf" / "run-F32.gguf"
    recipe = study_recipe(tmp_path / "bf16", gguf=str(given))
    text = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**text, "export": {**text["export"], "reference": "BF16"}}))
    result = run_ft_in_process("quantize", str(recipe))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"model.gguf: {given} is ALL_F32, but export.reference is BF16" in result.stderr



def test_compare_puts_the_results_side_by_side(base_study: Path, given_study: Path, tmp_path: Path) -> None:
    """Two evaluations of the same text: the table is their results.json rows, and each quant against its twin is a
    difference of 0 whose interval contains 0."""
    import csv

    folders = [base_study / "eval", given_study / "eval"]
    out = tmp_path / "comparison"
    ft_ok("compare", *map(str, folders), "--out", str(out))
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    expected = [(str(folder), q) for folder in folders for q in results(folder.parent)["quants"]]
    assert len(table) == len(expected) == 4
    for row, (label, q) in zip(table, expected):
        assert (row["evaluation"], row["type"], row["file"]) == (label, q["type"], q["file"])  # both runs are "run"
        assert float(row["bits_per_weight"]) == q["bits_per_weight"]
        for key in ("kld_mean", "kld_mean_error", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "ppl",
                    "ppl_ratio"):
            assert float(row[key]) == q["divergence"][key], key
        assert row["accuracy"] == row["prompts"] == ""  # the small study asks no prompts
    report = (out / "report.md").read_text()
    for kind in ("F32 (reference)", "Q8_0"):
        assert f"| {folders[1]}: {kind} | {folders[0]}: {kind} | +0 [+0, +0] | 4 |" in report
    # in a fresh process, as a user runs it: ft compare imports no torch, so that takes well under a second
    result = run_ft("compare", str(folders[0]), "--out", str(tmp_path / "one"))
    assert result.returncode != 0 and "two evaluation folders or more" in result.stderr


VARIANTS = {"imat": {"imatrix": "on", "calibration_rows": 8}, "attn": {"tensor_types": {"attn_.*": "Q8_0"}}}


def test_variants_equal_separate_exports_with_one_reference_pass(tmp_path: Path) -> None:
    """Three settings of Q4_K_M (plain, an importance matrix, attention kept at Q8_0) in one study give the files
    and numbers of three separate studies, from one reference pass."""
    def small(folder: Path, export: dict[str, Any]) -> Path:
        recipe = study_recipe(folder)
        text = yaml.safe_load(recipe.read_text())
        text["export"].update(quants=["Q4_K_M"], **export)
        text["eval"]["quants"] = ["Q4_K_M"]
        recipe.write_text(yaml.safe_dump(text, sort_keys=False))  # the variants in VARIANTS' order
        return recipe

    together = small(tmp_path / "together", {"variants": VARIANTS})
    assert ft_ok("eval", str(together)).count("reference pass over") == 1
    joint = results(together.parent / "run")
    rows = {(q.get("variant"), q["type"]): q for q in joint["quants"]}
    assert list(rows) == [(None, "F32 (reference)"), (None, "Q4_K_M"), ("imat", "imat/Q4_K_M"),
                          ("attn", "attn/Q4_K_M")]
    for name, settings in [(None, {}), *VARIANTS.items()]:
        alone = small(tmp_path / f"alone-{name}", settings)
        ft_ok("eval", str(alone))
        [_, single] = results(alone.parent / "run")["quants"]
        joint_row = rows[(name, f"{name}/Q4_K_M" if name else "Q4_K_M")]
        joint_file = together.parent / "run" / "gguf" / (name or "") / "run-Q4_K_M.gguf"
        assert joint_file.read_bytes() == (alone.parent / "run" / "gguf" / "run-Q4_K_M.gguf").read_bytes()
        assert joint_row["divergence"] == single["divergence"] and joint_row["bits_per_weight"] == single[
            "bits_per_weight"]
    assert rows[("attn", "attn/Q4_K_M")]["bits_per_weight"] > rows[(None, "Q4_K_M")]["bits_per_weight"]
    pairs = [(p["type"], p["against"]) for p in joint["pairs"]]
    assert ("imat/Q4_K_M", "Q4_K_M") in pairs and ("attn/Q4_K_M", "Q4_K_M") in pairs
