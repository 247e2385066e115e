"""`ft eval`: the demo report, KLD metrics against an independent NumPy computation on llama.cpp logits, the
exact-match scorer, corrupt files, MTP identity, and a rerun that reuses the export.

Every model is loaded through eval.runner / eval.mtp (plain CPU kernels: llama.cpp's AMX kernels crash on quantized
weights here) with one thread: on a shared 2-core machine llama.cpp's spinning thread barrier is ~20x slower with two.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
import yaml
from conftest import ROOT, run_ft_in_process
from scipy import stats
from scipy.special import log_softmax

from eval import divergence as ft_divergence
from eval.accuracy import Flips, extract_answer, is_correct, paired_flips, wilson_interval
from eval.mtp import Decoded, Decoder, decode_all, divergence, mismatches
from eval.pipeline import evaluate_run, evaluation_tokens, measure, reference_pass
from eval.report import markdown
from eval.runner import EvalError, Scorer, check_gguf, chunks, load, plain_cpu_kernels
from ft.recipe import EvalSection
from ft.recipe_io import load_recipe
from ft.tiny import tiny_processor
from quantize.manifest import Manifest

QUANTS = ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]  # the demo's eval.quants, most bits first
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = EvalSection(context=64, max_tokens=128, threads=1, speed=False)  # two scored windows of 31 tokens
QUESTIONS = [
    "What is 2 + 2?", "Name a red fruit.", "How many legs does a spider have?", "Describe a circle in one sentence.",
    "What colour is the sky at noon?", "Count from one to five.", "Which is larger, 7 or 12?", "Say hello in French.",
    "What sound does a beep make?", "Spell the word cat backwards.", "What is 9 times 3?", "Name a shape with corners.",
    "Is water wet?", "Give me a rhyme for moon.", "How many days are in a week?", "What is half of 10?",
    "Translate 'dog' into Spanish.", "Write a haiku about rain.", "What comes after Tuesday?", "Add 17 and 25.",
]


def gguf_file(run: Path, suffix: str) -> Path:
    return run / "gguf" / f"{run.name}-{suffix}.gguf"


@pytest.fixture(scope="module")
def results(demo_run: Path) -> dict[str, Any]:
    return json.loads((demo_run / "eval" / "results.json").read_text())


@pytest.fixture(scope="module")
def rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["type"]: q for q in results["quants"]}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def copy_run(run: Path, dest: Path, **eval_settings: Any) -> Path:
    """A copy of a run directory under the same name, with its recipe's eval section updated."""
    copy = dest / run.name
    for part in ("adapter", "drafter-base", "gguf", "eval"):
        shutil.copytree(run / part, copy / part)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["eval"].update(eval_settings)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


# 1-2. The demo's report -------------------------------------------------------------------------------------------


def test_demo_report_files(demo_run: Path) -> None:
    out = demo_run / "eval"
    assert "## Distribution vs reference" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["quants"]
    for plot in ("divergence.png", "accuracy.png", "speed.png"):
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC, plot


def test_demo_pairs_each_quant_with_the_next_larger(results: dict[str, Any]) -> None:
    """The paired differences: one per quant, against the next one up in bits per weight, whose accuracy difference
    is the difference of the two rows' per-prompt answers, and whose KLD difference is that of their means."""
    rows = sorted(results["quants"], key=lambda q: -q["bits_per_weight"])
    assert [(p["type"], p["against"]) for p in results["pairs"]] == [
        (a["type"], b["type"]) for a, b in zip(rows[1:], rows[:-1])]
    for pair, (a, b) in zip(results["pairs"], zip(rows[1:], rows[:-1])):
        kld = pair["kld_mean"]
        assert kld["difference"] == pytest.approx(a["divergence"]["kld_mean"] - b["divergence"]["kld_mean"])
        assert kld["low"] <= kld["difference"] <= kld["high"]
        n = len(a["answers"])
        assert pair["accuracy"]["difference"] == pytest.approx((sum(a["answers"]) - sum(b["answers"])) / n)
        assert n == sum(t["n"] for t in a["accuracy"].values())


def test_report_lists_where_mtp_output_differed(results: dict[str, Any]) -> None:
    assert "Where MTP output differed" not in markdown(results)  # the demo's quantized targets are identical
    changed = json.loads(json.dumps(results))
    changed["quants"][0]["speed"]["mismatches"] = [{"prompt": 3, "token": 7, "plain_margin": 0.0021,
                                                     "mtp_margin": 0.0004}]
    text = markdown(changed)
    assert "### Where MTP output differed from plain decoding" in text
    assert f"| {changed['quants'][0]['type']} | 3 | 7 | 0.0021 | 0.0004 |" in text


def test_demo_quants_degrade_monotonically(results: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    assert [q["type"] for q in results["quants"]] == [f"{results['reference_type']} (reference)", *QUANTS]
    assert all("error" not in q and q["bits_per_weight"] > 0 for q in results["quants"])
    bpw = [rows[q]["bits_per_weight"] for q in QUANTS]
    kld = [rows[q]["divergence"]["kld_mean"] for q in QUANTS]
    top1 = [rows[q]["divergence"]["top1_agreement"] for q in QUANTS]
    print("bpw", bpw, "mean KLD", kld, "top-1", top1)
    assert bpw == sorted(bpw, reverse=True) and len(set(bpw)) == len(bpw)
    assert all(a < b for a, b in zip(kld, kld[1:])), kld
    # Top-1 agreement counts a few hundred scored tokens: neighbouring quants can tie on it (Q6_K and Q4_K_M did on
    # an AVX512-BF16 CPU), so it must not rise, and must fall from the best quant to the worst.
    assert all(a >= b for a, b in zip(top1, top1[1:])) and top1[0] > top1[-1], top1
    assert kld[0] > 0


def test_demo_speed_rows_are_consistent(results: dict[str, Any]) -> None:
    for q in results["quants"]:
        speed = q["speed"]
        assert speed["identical"] is True, q["type"]
        assert speed["plain_tokens_per_second"] > 0 and speed["mtp_tokens_per_second"] > 0
        assert 0 <= speed["acceptance_rate"] <= 1 and 0 <= speed["mean_accepted"] <= speed["draft_len"]


def test_reference_against_itself_is_exact(results: dict[str, Any]) -> None:
    (reference,) = [q for q in results["quants"] if q["type"].endswith("(reference)")]
    div = reference["divergence"]
    for key in ("kld_mean", "kld_median", "kld_p99", "kld_p999", "kld_max", "dp_mean", "dp_rms"):
        assert abs(div[key]) < 1e-12, key
    assert div["top1_agreement"] == 1.0
    assert div["ppl_ratio"] == pytest.approx(1, abs=1e-12) and div["ppl"] == pytest.approx(div["ppl_ref"], rel=1e-12)
    assert div["tokens"] == results["divergence_tokens"] > 0


# 3. KLD against an independent float64 computation ----------------------------------------------------------------


def llama_logits(llm: Any, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Logits at a window's scored positions through llama_cpp.Llama's own path (all positions' logits kept, one
    window at a time): the independent source that ft's `Scorer` is checked against, and the tokens they predict."""
    llm.reset()
    llm.eval(window)
    first = len(window) // 2
    return np.array(llm.scores[first : len(window) - 1], dtype=np.float32), np.array(window[first + 1 :])


def log_probs(logits: np.ndarray) -> np.ndarray:
    return log_softmax(logits.astype(np.float64), axis=-1)


def independent_metrics(ref: np.ndarray, q: np.ndarray, targets: np.ndarray,
                        top_of: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """The divergence metrics from reference and quant log-probabilities, straight from their definitions; top-1
    from the arrays `top_of` (by default the log-probabilities themselves)."""
    kld = (np.exp(ref) * (ref - q)).sum(axis=-1)
    at = np.arange(len(targets))
    nll, nll_ref = -q[at, targets], -ref[at, targets]
    dp = np.exp(-nll) - np.exp(-nll_ref)
    ref_top, q_top = top_of or (ref, q)
    same = (ref_top.argmax(axis=-1) == q_top.argmax(axis=-1)).mean()
    return {
        "tokens": len(targets), "kld_mean": kld.mean(), "kld_mean_error": stats.sem(kld),
        "kld_median": np.median(kld), "kld_p99": np.percentile(kld, 99), "kld_p999": np.percentile(kld, 99.9),
        "kld_max": kld.max(), "top1_agreement": same,
        "top1_agreement_error": math.sqrt(same * (1 - same) / (len(kld) - 1)),
        "ppl": math.exp(nll.mean()), "ppl_ref": math.exp(nll_ref.mean()),
        "ppl_ratio": math.exp(nll.mean() - nll_ref.mean()),
        "dp_mean": dp.mean(), "dp_rms": math.sqrt((dp**2).mean()),
    }


def test_divergence_matches_numpy_on_llama_cpp_logits(demo_run: Path, processor) -> None:
    settings = EvalSection(context=128, max_tokens=384, threads=1)
    reference = load(gguf_file(demo_run, "F32"), settings.context, logits_all=True, threads=1)
    quant = load(gguf_file(demo_run, "Q4_K_M"), settings.context, logits_all=True, threads=1)
    tokens = evaluation_tokens(settings, load_recipe(demo_run / "recipe.yaml"), processor, reference)
    windows = list(chunks(tokens, settings.context, reference.token_bos()))
    ref_logits, targets = zip(*(llama_logits(reference, w) for w in windows), strict=True)
    logits, predicted = zip(*(llama_logits(quant, w) for w in windows), strict=True)
    np.testing.assert_array_equal(np.concatenate(predicted), np.concatenate(targets))
    divergence = ft_divergence.Divergence()
    for ref_window, window, window_targets in zip(ref_logits, logits, targets, strict=True):
        divergence.add(ft_divergence.encode(ref_window), window, window_targets)  # stored as reference_pass stores it
    ref_logits, logits, targets = (np.concatenate(x) for x in (ref_logits, logits, targets))
    got = divergence.summary()
    assert got["tokens"] == 3 * 63
    chunk_kld = got.pop("chunk_kld")  # each window's mean KLD, for the paired intervals; the windows score alike
    assert len(chunk_kld) == len(windows) and np.mean(chunk_kld) == pytest.approx(got["kld_mean"], rel=1e-9)
    # Both sides' log-probabilities on ft's 16-bit grid (the stored reference, and the quant's rounded to match it);
    # top-1 from the exact logits.
    gridded = independent_metrics(ft_divergence.decode(ft_divergence.encode(ref_logits)).astype(np.float64),
                                  ft_divergence.rounded_log_softmax(logits).astype(np.float64), targets,
                                  top_of=(ref_logits, logits))
    assert 1e-4 < gridded["kld_mean"] and gridded["top1_agreement"] < 1  # a real difference to measure
    assert got == pytest.approx(gridded, rel=1e-6, abs=1e-12)
    # Against exact float64 log-probabilities: the grid's rounding (half a step, 1e-4 nats or less on these rows)
    # moves single positions' KLD by a few 1e-6 (2.3e-6 the most seen on the demo's rows; so its median, percentiles
    # and maximum); over the mean those errors, of either sign and independent from position to position, shrink as
    # 1/sqrt(positions): three of those.
    # Each perplexity is the exponential of the mean of the targets' rounded log-probabilities (the quant's and the
    # stored reference's): each within half a step, of either sign, so the mean within three of those over
    # sqrt(positions), relative to the perplexity; their ratio within the two bounds together.
    position, half_step = 5e-6, 1e-4
    exact = independent_metrics(log_probs(ref_logits), log_probs(logits), targets, top_of=(ref_logits, logits))
    perplexities = ("ppl", "ppl_ref", "ppl_ratio")
    assert {k: v for k, v in got.items() if k not in perplexities} == pytest.approx(
        {k: v for k, v in exact.items() if k not in perplexities}, rel=1e-6, abs=position)
    bound = 3 * half_step / math.sqrt(got["tokens"])
    assert got["ppl"] == pytest.approx(exact["ppl"], rel=bound)
    assert got["ppl_ref"] == pytest.approx(exact["ppl_ref"], rel=bound)
    assert got["ppl_ratio"] == pytest.approx(exact["ppl_ratio"], rel=2 * bound)
    assert got["kld_mean"] == pytest.approx(exact["kld_mean"], rel=1e-6, abs=3 * position / math.sqrt(got["tokens"]))


def test_store_rounds_log_probabilities_within_half_a_step() -> None:
    """The 16-bit rows: scale and offset as llama.cpp's, every log-probability within half a grid step (plus float32
    rounding) of the exact one, entries more than SPAN nats below the top at the grid's bottom, a flat row exact."""
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.normal(0, 2, (3, 4096)), rng.normal(0, 12, (3, 4096)),  # within, and beyond, SPAN
                             np.full((1, 4096), 1.5)]).astype(np.float32)
    exact = log_probs(logits)
    rows = ft_divergence.encode(logits)
    assert rows.dtype == np.uint16 and rows.shape == (7, 4096 + ft_divergence.HEADER)
    scale, offset = np.ascontiguousarray(rows[:, :4]).view(np.float32).T
    top = logits.max(axis=-1).astype(np.float64)
    low = np.maximum(logits.min(axis=-1), top - ft_divergence.SPAN)
    np.testing.assert_allclose(scale, (top - low) / 65535, rtol=1e-6)
    np.testing.assert_allclose(offset, low - top + exact.max(axis=-1), atol=1e-5)  # log-probability of code 0
    got = ft_divergence.decode(rows).astype(np.float64)
    np.testing.assert_array_equal(got, ft_divergence.rounded_log_softmax(logits))
    inside = logits >= low[:, None]
    error = np.abs(got - exact)
    assert (error[inside] <= (scale[:, None] / 2 + 4e-6 * np.abs(exact))[inside]).all()
    assert np.allclose(got[~inside], np.broadcast_to(offset[:, None], got.shape)[~inside])
    assert (~inside).sum() > 0 and (got[~inside] >= exact[~inside]).all()
    assert np.array_equal(got[-1], exact[-1].astype(np.float32)) and scale[-1] == 0


def test_batched_windows_give_one_window_logits(demo_run: Path, processor) -> None:
    """Scorer decodes four windows as four sequences of one batch (llama-perplexity's scheme): each window's logits
    equal those of the window decoded alone, and those of llama_cpp.Llama keeping every position's logits (with
    flash attention, which llama.cpp's default picks for Scorer's contexts as for llama-perplexity's)."""
    settings = EvalSection(context=64, max_tokens=384, threads=1)
    path = gguf_file(demo_run, "Q4_K_M")
    tokens = evaluation_tokens(
        settings, load_recipe(demo_run / "recipe.yaml"), processor, load(path, 64, vocab_only=True)
    )
    with Scorer(path, 64, threads=1, n_seq=4) as batched, Scorer(path, 64, threads=1, n_seq=1) as alone:
        assert batched.n_seq == 4
        windows = list(chunks(tokens, 64, batched.bos))
        together = [(logits.copy(), predicted) for logits, predicted in batched.score(windows)]
        one_by_one = [(logits.copy(), predicted) for logits, predicted in alone.score(windows)]
    assert len(together) == len(windows) == 6  # one batch of four windows, then one of two
    with plain_cpu_kernels():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, flash_attn=True, logits_all=True,
                              verbose=False)
    for (a, targets), (b, targets_alone), window in zip(together, one_by_one, windows, strict=True):
        expected, expected_targets = llama_logits(llm, window)
        assert a.shape == (31, llm.n_vocab())
        np.testing.assert_array_equal(targets, targets_alone)
        np.testing.assert_array_equal(targets, expected_targets)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, expected, rtol=0, atol=1e-5)


def perplexity_windows(llm: Any, text: str, n_ctx: int) -> list[list[int]]:
    """The token windows `llama-perplexity -f FILE -c n_ctx` decodes (tools/perplexity/perplexity.cpp): the file
    tokenized by llama.cpp with add_special=true, parse_special=false (`common_tokenize`), cut into tokens.size() /
    n_ctx chunks, each chunk's first token replaced by BOS when the vocabulary adds one."""
    vocab = llm._model.vocab
    data = text.encode()
    ids = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), ids, len(data) + 8, True, False)
    tokens = list(ids[:n])
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    windows = []
    for i in range(len(tokens) // n_ctx):
        window = tokens[i * n_ctx : (i + 1) * n_ctx]
        if add_bos:
            window[0] = llama_cpp.llama_vocab_bos(vocab)
        windows.append(window)
    return windows


def test_windows_are_llama_perplexitys(demo_run: Path, processor, tmp_path: Path) -> None:
    """ft scores the very tokens llama-perplexity scores on the same text file: window for window, token for token
    (before the fix every window was shifted by one token, the text having been tokenized without BOS)."""
    text = (ROOT / "data" / "demo" / "train.jsonl").read_text()  # plain text that holds "<" and chat-like names
    text_file = tmp_path / "eval.txt"
    text_file.write_text(text)
    settings = EvalSection(context=64, max_tokens=100_000, threads=1, text=text_file)
    llm = load(gguf_file(demo_run, "F32"), 64, vocab_only=True)
    expected = perplexity_windows(llm, text, settings.context)
    tokens = evaluation_tokens(settings, load_recipe(demo_run / "recipe.yaml"), processor, llm)
    got = list(chunks(tokens, settings.context, llm.token_bos()))
    assert llama_cpp.llama_vocab_get_add_bos(llm._model.vocab) and len(expected) > 3
    assert got == expected
    assert tokens[0] == llm.token_bos() and tokens[1] != llm.token_bos()


def test_chat_rendered_text_starts_with_one_bos(demo_run: Path, processor) -> None:
    llm = load(gguf_file(demo_run, "F32"), 64, vocab_only=True)
    tokens = evaluation_tokens(EvalSection(context=64, threads=1), load_recipe(demo_run / "recipe.yaml"), processor,
                               llm)
    assert tokens[0] == llm.token_bos() and tokens[1] != llm.token_bos()


# 4. The exact-match scorer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "answer"), [
    ("<|channel>thought\nIt is 5? No, 4.<channel|>4<turn|>", "4"),
    ("Let me add.\nThe answer is **-4**.", "-4"),
    ("Answer: A red circle.", "a red circle"),
    ("First 2.\nAnswer: 2\nThen the answer is 3", "3"),
    ("**Answer:** 12", "12"),
    ("$42$.", "42"),
    ("4.0", "4"),
    ("-3", "-3"),
    ("The answer is 1,000", "1000"),
    ("  \"triangle\"  \n", "Triangle."),
])
def test_is_correct_accepts(reply: str, answer: str) -> None:
    assert is_correct(reply, answer)


@pytest.mark.parametrize(("reply", "answer"), [
    ("The answer is 5.", "4"),
    ("four", "4"),
    ("-3", "3"),
    ("<|channel>thought\nThe answer is 4<channel|>", "4"),  # only thoughts: no answer given
    ("", "4"),
    ("The answer is 4\nActually, the answer is 40", "4"),
    ("a red square", "a red circle"),
])
def test_is_correct_rejects(reply: str, answer: str) -> None:
    assert not is_correct(reply, answer)


@pytest.mark.parametrize("reply", ["The final answer is: 7", "**Answer**: 7"])
def test_extract_answer_line_variants(reply: str) -> None:
    assert extract_answer(reply) == "7"


def test_extract_answer_normalises() -> None:
    assert extract_answer("Thinking...\n\n**The Answer Is $X$.**") == "x"
    assert extract_answer("<|channel>thought\nlong\nlines<channel|>Blue.<turn|>") == "blue"
    assert extract_answer("<|channel>only thinking<channel|>") == ""


def wilson_closed_form(k: int, n: int, z: float) -> tuple[float, float]:
    centre, half = k + z * z / 2, z * math.sqrt(k * (n - k) / n + z * z / 4)
    return (centre - half) / (n + z * z), (centre + half) / (n + z * z)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (5, 10), (8, 10), (1, 50), (37, 40)])
def test_wilson_interval(k: int, n: int) -> None:
    got = wilson_interval(k, n)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert got == pytest.approx((ci.low, ci.high), abs=1e-6)
    assert got == pytest.approx(wilson_closed_form(k, n, stats.norm.ppf(0.975)), abs=1e-6)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_flips() -> None:
    reference = [True, True, False, False, True, False]
    other = [True, False, True, False, False, True]
    flips = paired_flips(reference, other)
    assert (flips.lost, flips.gained) == (2, 2)
    assert paired_flips(reference, reference) == paired_flips([], []) == Flips(0, 0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_flips(reference, other[:-1])


# 5. Corrupt files -------------------------------------------------------------------------------------------------


def corrupt_copy(source: Path, dest: Path, how: str) -> Path:
    data = source.read_bytes()
    if how == "truncated":
        data = data[:4096]
    elif how == "bad magic":
        data = b"\0" * 64 + data[64:]
    else:  # a valid GGUF that llama.cpp rejects
        at = data.index(b"gemma4", data.index(b"general.architecture"))
        data = data[:at] + b"zzzzzz" + data[at + 6 :]
    dest.write_bytes(data)
    return dest


@pytest.fixture(params=["truncated", "bad magic", "unknown architecture"])
def corrupt(request, demo_run: Path, tmp_path: Path) -> Path:
    return corrupt_copy(gguf_file(demo_run, "Q4_K_M"), tmp_path / "broken-Q4_K_M.gguf", request.param)


@pytest.fixture(scope="module")
def small_reference(demo_run: Path, processor, tmp_path_factory) -> tuple[list[int], np.memmap, np.ndarray]:
    """Evaluation tokens and the reference pass of the demo at a 64-token context."""
    reference = gguf_file(demo_run, "F32")
    tokens = evaluation_tokens(SMALL, load_recipe(demo_run / "recipe.yaml"), processor, load(reference, 64, threads=1))
    return (tokens, *reference_pass(reference, tokens, SMALL, tmp_path_factory.mktemp("ref") / "reference.npy"))


def measure_small(path: Path, run: Path, small_reference, processor) -> dict[str, Any]:
    tokens, ref, targets = small_reference
    manifest = Manifest(run / "gguf" / "manifest.json")
    return measure(path.stem, path, manifest, tokens, SMALL, ref, targets, [], processor, [], None, [])


def test_corrupt_file_raises_eval_error_naming_it(corrupt: Path) -> None:
    with pytest.raises(EvalError, match=re.escape(str(corrupt))):
        load(corrupt, 64, threads=1)
    with pytest.raises(EvalError, match=re.escape(str(corrupt))):
        Decoder(corrupt, 16, threads=1)


def test_decoder_rejects_tokens_outside_the_vocabulary(demo_run: Path) -> None:
    with Decoder(gguf_file(demo_run, "Q8_0"), 64, threads=1) as decoder, pytest.raises(EvalError, match="outside"):
        decoder([2, 10**7], 4)


def test_check_gguf_rejects_damaged_files(demo_run: Path, tmp_path: Path) -> None:
    check_gguf(gguf_file(demo_run, "Q4_K_M"))
    for how in ("truncated", "bad magic"):
        broken = corrupt_copy(gguf_file(demo_run, "Q4_K_M"), tmp_path / f"{how}.gguf", how)
        with pytest.raises(EvalError, match=re.escape(f"{broken}: not a valid GGUF file")):
            check_gguf(broken)
    with pytest.raises(EvalError, match="model file not found"):
        check_gguf(tmp_path / "missing.gguf")


def test_measure_reports_corrupt_file(corrupt: Path, demo_run: Path, small_reference, processor) -> None:
    entry = measure_small(corrupt, demo_run, small_reference, processor)
    assert set(entry) == {"type", "file", "error"}
    assert entry["file"] == corrupt.name and str(corrupt) in entry["error"]


def test_measure_of_valid_quant(demo_run: Path, small_reference, processor) -> None:
    path = gguf_file(demo_run, "Q4_K_M")
    entry = measure_small(path, demo_run, small_reference, processor)
    assert "error" not in entry
    assert entry["bits_per_weight"] == Manifest(demo_run / "gguf" / "manifest.json").entry(path.name)["bits_per_weight"]
    assert entry["divergence"]["tokens"] == 2 * 31 and entry["divergence"]["kld_mean"] > 0


# 6. MTP speculative decoding gives plain greedy's tokens ----------------------------------------------------------


@pytest.mark.parametrize("target", ["F32", "Q8_0"])
def test_mtp_output_identical_to_plain(target: str, demo_run: Path, processor) -> None:
    """Token-identical to plain greedy decoding, up to near-ties: llama.cpp's CPU kernels for F32 weights round a
    one-row batch and a several-row batch differently (quantized weights use one dot product for both), so an F32
    target may flip a tie; then the target's lead there is tiny in both modes, and MTP equals plain decoding run in
    batches of the verify step's shape exactly, which shows the protocol itself is exact."""
    tokenizer, n_new, draft_len = processor.tokenizer, 24, 3
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    assert len({tuple(p) for p in prompts}) == 20
    path, drafter = gguf_file(demo_run, target), gguf_file(demo_run, "drafter-F32")
    plain = decode_all(path, prompts, n_new, threads=1)
    mtp = decode_all(path, prompts, n_new, drafter, draft_len, threads=1)
    ties = mismatches(path, prompts, plain, mtp, drafter, draft_len, threads=1)
    assert all(max(m["plain_margin"], m["mtp_margin"]) < 0.01 for m in ties), ties
    assert len(ties) <= 2 and (target == "F32" or not ties), ties
    if not any(d.accepted for d in mtp):  # the demo's drafter is random: nothing accepted, so shapes match exactly
        padded = decode_all(path, prompts, n_new, threads=1, pad_to=draft_len + 1)
        assert [d.tokens for d in padded] == [d.tokens for d in mtp]
    for a, b in zip(plain, mtp, strict=True):
        assert len(a.tokens) == n_new and len(b.tokens) == n_new
        assert a.drafted == a.steps == 0 and 0 < b.drafted <= draft_len * b.steps
        assert 1 + b.steps + b.accepted >= n_new  # each step yields its accepted drafts plus the target's token
        assert 0 <= b.acceptance_rate <= 1 and 0 <= b.mean_accepted <= draft_len
        assert a.tokens_per_second > 0 and b.tokens_per_second > 0
    drafted, accepted, steps = (sum(getattr(d, k) for d in mtp) for k in ("drafted", "accepted", "steps"))
    seconds = {mode: sum(d.seconds for d in runs) for mode, runs in (("plain", plain), ("mtp", mtp))}
    made = len(prompts) * n_new
    print(f"\n{target}: acceptance {accepted / drafted:.3f}, mean accepted {accepted / steps:.2f}, "
          f"tokens/s MTP off {made / seconds['plain']:.0f}, MTP on {made / seconds['mtp']:.0f}")


def test_padded_plain_decoding_and_margins(demo_run: Path) -> None:
    """Plain decoding padded to a verify batch's shape gives the same tokens on the CPU; each token's margin is its
    logit lead over the runner-up, checked on the first token against the prompt logits of llama_cpp.Llama (with
    flash attention, like ft's contexts: without it the same lead comes out 4% larger on the tiny model)."""
    path, prompt, n_new = gguf_file(demo_run, "Q8_0"), [2, 10, 11, 12, 40, 41, 42], 12
    plain = decode_all(path, [prompt], n_new, threads=1, margins=True)[0]
    padded = decode_all(path, [prompt], n_new, threads=1, pad_to=4)[0]
    assert padded.tokens == plain.tokens and len(plain.margins) == n_new and min(plain.margins) >= 0
    with plain_cpu_kernels():  # flash attention on, as llama.cpp's default ("auto") picks for ft's contexts
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, flash_attn=True, verbose=False)
    llm.eval(prompt)
    last_row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    logits = np.sort(last_row.astype(np.float64))
    assert plain.tokens[0] == int(np.argmax(last_row))
    assert plain.margins[0] == pytest.approx(logits[-1] - logits[-2], abs=1e-5)


def test_mismatches_locate_a_divergence(demo_run: Path) -> None:
    path, drafter = gguf_file(demo_run, "Q8_0"), gguf_file(demo_run, "drafter-F32")
    prompts = [[2, 10, 11, 12, 40], [2, 10, 11, 12, 41]]
    plain = decode_all(path, prompts, 10, threads=1)
    tampered = Decoded(plain[1].tokens[:6] + [plain[1].tokens[6] + 1] + plain[1].tokens[7:], 1.0)
    assert divergence(plain[1], tampered) == 6
    found = mismatches(path, prompts, plain, [plain[0], tampered], drafter, 2, threads=1)
    assert [(m["prompt"], m["token"]) for m in found] == [(1, 6)]
    assert found[0]["plain_margin"] >= 0 and found[0]["mtp_margin"] >= 0


@pytest.mark.parametrize("draft_len", [1, 4])
def test_mtp_ceiling_accepts_every_proposal_and_verifies_them(draft_len: int, demo_run: Path, processor) -> None:
    """Offered the target's own greedy output, the loop accepts every draft (acceptance 1.0, draft_len + 1 tokens a
    step); offered a wrong token, it rejects it there and still returns plain greedy's tokens: the verify step, not
    the proposals, decides the output."""
    tokenizer, n_new = processor.tokenizer, 24
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
               for q in QUESTIONS[:4]]
    path, drafter = gguf_file(demo_run, "Q8_0"), gguf_file(demo_run, "drafter-F32")
    plain = decode_all(path, prompts, n_new, threads=1)
    own = [d.tokens for d in plain]
    ceiling = decode_all(path, prompts, n_new, drafter, draft_len, threads=1, proposals=own)
    for a, b in zip(plain, ceiling, strict=True):
        assert b.tokens == a.tokens
        assert b.acceptance_rate == 1.0 and b.steps == math.ceil((n_new - 1) / (draft_len + 1))
    wrong = [[tokens[0], (tokens[1] + 1) % 200, *tokens[2:]] for tokens in own]  # the first step's first draft
    corrected = decode_all(path, prompts, n_new, drafter, draft_len, threads=1, proposals=wrong)
    for a, b in zip(plain, corrected, strict=True):
        assert b.tokens == a.tokens and b.accepted == b.drafted - draft_len  # that step's drafts all rejected


def test_echo_pair_makes_every_draft_right(tmp_path: Path) -> None:
    """bench/full_acceptance.py's files, which measure the ceiling of any speculative loop (llama.cpp's own included):
    the silenced target's greedy output repeats one token, the echoing drafter proposes exactly that, so MTP accepts
    every draft and still returns plain greedy's output."""
    from bench.eval_speed import drafter_gguf, target_gguf
    from bench.full_acceptance import echo_drafter, silence_layers
    from quantize.llama_quant import quantize

    target_gguf(tmp_path, "tiny")
    drafter_gguf(tmp_path, "tiny")
    target = quantize(tmp_path / "model-BF16.gguf", tmp_path / "model-Q8_0.gguf", "Q8_0", threads=1)
    drafter = echo_drafter(tmp_path / "drafter-BF16.gguf", tmp_path / "model-BF16.gguf", tmp_path / "echo.gguf")
    prompts, n_new = [[2, 10, 20, 30], [2, 7, 300, 41, 5]], 16
    before = decode_all(target, prompts, n_new, threads=1)
    silence_layers(target)
    plain = decode_all(target, prompts, n_new, threads=1)
    assert [len(set(d.tokens)) for d in before] != [1, 1]  # the random target did not repeat itself before
    assert [len(set(d.tokens)) for d in plain] == [1, 1]
    for draft_len in (1, 3):
        mtp = decode_all(target, prompts, n_new, drafter, draft_len, threads=1)
        for a, b in zip(plain, mtp, strict=True):
            assert b.tokens == a.tokens and b.acceptance_rate == 1.0
    random_drafter = decode_all(target, prompts, n_new, tmp_path / "drafter-BF16.gguf", 3, threads=1)
    assert sum(d.accepted for d in random_drafter) < sum(d.drafted for d in random_drafter) / 2


# 7. Rerunning `ft eval` ------------------------------------------------------------------------------------------


def assert_same_divergence(new: dict[str, Any], old: dict[str, Any]) -> None:
    """One quant's divergence statistics measured twice agree to rounding, its per-chunk KLD too (pytest.approx
    compares no lists inside a dict)."""
    new_stats, old_stats = dict(new["divergence"]), dict(old["divergence"])
    np.testing.assert_allclose(new_stats.pop("chunk_kld"), old_stats.pop("chunk_kld"), rtol=1e-9, atol=1e-12)
    assert new_stats == pytest.approx(old_stats, rel=1e-9, abs=1e-12), new["type"]


def test_ft_eval_rerun_reuses_export(demo_run: Path, results: dict[str, Any], tmp_path: Path) -> None:
    """A second `ft eval` of the demo run (a copy, one llama.cpp thread) re-exports nothing and rewrites the report."""
    run = copy_run(demo_run, tmp_path, threads=1)
    ggufs = sorted((run / "gguf").glob("*.gguf"))
    before = {p: p.stat().st_mtime_ns for p in [*ggufs, *(run / "gguf" / "merged").iterdir()]}
    report_before = (run / "eval" / "report.md").stat().st_mtime_ns
    result = run_ft_in_process("eval", str(run))
    assert result.returncode == 0, result.stderr
    assert len(ggufs) == 8
    for path in ggufs:
        assert f"up to date: {path.name}" in result.stderr
    assert not re.search(r"^writing ", result.stderr, re.MULTILINE | re.IGNORECASE), result.stderr
    assert "merging" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (run / "eval" / "report.md").stat().st_mtime_ns > report_before
    again = json.loads((run / "eval" / "results.json").read_text())
    assert again["settings"]["threads"] == 1
    for old, new in zip(results["quants"], again["quants"], strict=True):
        assert_same_divergence(new, old)
        assert new["accuracy"] == old["accuracy"]


def test_eval_without_prompts_still_reports(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path, samples=0, heldout=False, quants=["Q8_0"], threads=1)
    results = json.loads((evaluate_run(run)[0] / "results.json").read_text())
    assert [q["type"] for q in results["quants"]] == ["F32 (reference)", "Q8_0"]
    assert all("divergence" in q and "error" not in q for q in results["quants"])


def test_ft_eval_takes_overrides_and_reuses_up_to_date_results(demo_run: Path, tmp_path: Path) -> None:
    """`ft eval RUN eval.quants=[...]` measures what the overrides ask; the same command again reuses the saved
    results (nothing re-measured, results.json untouched); --remeasure measures again and finds the same numbers."""
    run = copy_run(demo_run, tmp_path)
    args = ["eval", str(run), "eval.quants=[Q8_0,Q2_K]", "eval.samples=0", "eval.heldout=false",
            "eval.speed=false", "eval.threads=1"]
    first = run_ft_in_process(*args)
    assert first.returncode == 0, first.stderr
    results_file = run / "eval" / "results.json"
    measured = json.loads(results_file.read_text())
    assert [q["type"] for q in measured["quants"]] == ["F32 (reference)", "Q8_0", "Q2_K"]
    assert measured["settings"]["quants"] == ["Q8_0", "Q2_K"] and not (run / "eval" / "accuracy.png").exists()
    stamp = results_file.stat().st_mtime_ns
    again = run_ft_in_process(*args)
    assert again.returncode == 0, again.stderr
    assert "up to date: " in again.stderr and "reference pass" not in again.stderr
    assert results_file.stat().st_mtime_ns == stamp
    forced = run_ft_in_process(*args, "--remeasure")
    assert forced.returncode == 0 and "reference pass" in forced.stderr, forced.stderr
    remeasured = json.loads(results_file.read_text())
    for old, new in zip(measured["quants"], remeasured["quants"], strict=True):
        assert_same_divergence(new, old)
    other = run_ft_in_process(*args[:-1], "eval.threads=2")  # other settings: measured again
    assert other.returncode == 0 and "reference pass" in other.stderr, other.stderr


def test_ft_eval_and_quantize_refuse_overrides_of_the_trained_recipe(demo_run: Path) -> None:
    for command, allowed in (("eval", "eval.* and export.*"), ("quantize", "export.*")):
        result = run_ft_in_process(command, str(demo_run), "train.lr=1e-4")
        assert result.returncode == 2, result.stderr
        assert f"override 'train.lr=1e-4': train.* was fixed when the run trained; only {allowed}" in result.stderr
    malformed = run_ft_in_process("eval", str(demo_run), "bogus")
    assert malformed.returncode == 2 and "override 'bogus': expected KEY.PATH=VALUE" in malformed.stderr
    bad = run_ft_in_process("eval", str(demo_run), "eval.quantz=[Q8_0]")
    assert bad.returncode == 2 and "override 'eval.quantz=[Q8_0]'" in bad.stderr and "quants" in bad.stderr


def test_ft_quantize_takes_export_overrides(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    result = run_ft_in_process("quantize", str(run), "export.quants=[Q5_K_M]")
    assert result.returncode == 0, result.stderr
    assert f"writing {run.name}-Q5_K_M.gguf" in result.stderr
    manifest = Manifest(run / "gguf" / "manifest.json")
    assert manifest.entry(f"{run.name}-Q5_K_M.gguf")["type"] == "Q5_K_M"
    assert "Q5_K_M" in (run / "gguf" / "Modelfile").read_text()
