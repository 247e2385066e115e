"""The export recipe: a training run directory in, a folder of GGUF files for llama.cpp and Ollama out.

    ft quantize runs/demo                 # a run directory (its recipe.yaml and adapter/)
    ft quantize recipes/demo.yaml         # the same, found through the recipe's output.dir
    ft quantize recipes/study-demo.yaml   # a study (study: true): the model as it is, no adapter, no merge

A study's run directory is made by its first `ft quantize` or `ft eval` (marker, lock and recipe.yaml as `ft train`
makes them); step 1 is skipped (the base checkpoint is the model), and with model.gguf step 2 links that file in.

Steps, each skipped on a rerun when manifest.json says its output is current:
    1. merge the LoRA into the 16-bit base, shard by shard        -> gguf/merged/
    2. convert the merged model to the reference GGUF (BF16)       -> gguf/NAME-BF16.gguf
    3. convert the image/audio projector                           -> gguf/NAME-mmproj-F16.gguf
    4. convert the MTP drafter, when export.drafter names one       -> gguf/NAME-drafter-BF16.gguf
    5. importance matrix from calibration data, when a type needs it -> gguf/NAME-imatrix.gguf
    6. llama.cpp quantization for every export.quants type          -> gguf/NAME-Q4_K_M.gguf ...
       and steps 5-6 again for each of export.variants               -> gguf/VARIANT/NAME-Q4_K_M.gguf ...
    7. Ollama Modelfile, README.md and manifest.json
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from rich.console import Console

import yaml

from ft.atomic import remove_stale_temporaries, staged_dir, write_text
from ft.encode import collate, encode_row
from ft.errors import FtError
from ft.recipe import DataSection, DataSource, ExportSection, Recipe
from ft.recipe_io import load_recipe
from ft.rundir import claim, lock
from quantize.manifest import Manifest, fingerprint, sha256
from quantize.merge import merge_lora

console = Console(stderr=True)
FIRST_CHOICE = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")  # the quant the Modelfile points at, if exported


def resolve_run(target: Path, overrides: Sequence[str] = (),
                sections: Sequence[str] = ("export",)) -> tuple[Path, Recipe]:
    """A run directory, or a recipe whose output.dir is one; the run must hold a finished adapter, unless it is a
    study (whose run directory is made here from the recipe). `overrides` (KEY.PATH=VALUE, as `ft train` takes
    them) may change only `sections`: the rest was fixed when the run trained (or the study started)."""
    for override in overrides:
        key, sep, _ = override.partition("=")
        section = key.split(".")[0]
        if sep and section not in sections:  # a malformed override is reported by load_recipe's parser
            allowed = " and ".join(f"{s}.*" for s in sections)
            raise FtError(f"override '{override}': {section}.* was fixed when the run trained; only {allowed} "
                          "can change here (train again to change the rest)")
    if target.is_file() or target.suffix in (".yaml", ".yml"):
        recipe = load_recipe(target, list(overrides))
        run = recipe.output.dir
        if recipe.study:
            start_study(target, recipe)
            return run, recipe
    else:
        run = target
        if not (run / "recipe.yaml").is_file():
            raise FtError(f"{run}: not a run directory (no recipe.yaml); pass a run directory or a recipe file")
        recipe = load_recipe(run / "recipe.yaml", list(overrides))
        if recipe.study:
            return run, recipe
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        raise FtError(f"{run}: no trained adapter (adapter/adapter_model.safetensors); run `ft train` first")
    return run, recipe


def start_study(path: Path, recipe: Recipe) -> None:
    """Claim a study's run directory and record its recipe there (as `ft train` does, without the overrides of
    this command), so that `ft quantize RUN` and `ft eval RUN` find it; a trained run is never turned into one."""
    run = recipe.output.dir
    with recipe.blame("output.dir"), claim(run, "run"):
        if (run / "adapter").exists():
            raise FtError(f"{run} holds a trained run (adapter/); give the study its own output.dir")
        write_text(run / "recipe.yaml", yaml.safe_dump(load_recipe(path).model_dump(mode="json"), sort_keys=False))


def base_checkpoint(name: str, cache: Path) -> Path:
    """A directory holding the base model's 16-bit checkpoint (tiny models are written once into `cache`)."""
    from ft.models import locate
    from ft.tiny import TINY_PREFIX, save_tiny

    if name.startswith(TINY_PREFIX):
        if not (cache / "config.json").is_file():
            with staged_dir(cache) as tmp:
                save_tiny(tmp, name.removeprefix(TINY_PREFIX))
        return cache
    where = locate(name)
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(where, local_files_only=True))


def drafter_checkpoint(name: str, cache: Path) -> Path:
    """The drafter's checkpoint directory (the tiny drafter is written once into `cache`)."""
    from ft.tiny import TINY_PREFIX
    from ft.tiny_drafter import TINY_DRAFTER, save_tiny_drafter

    if not name.startswith(TINY_PREFIX):
        path = Path(name)
        if not (path / "config.json").is_file():
            raise FtError(f"export.drafter: {path} is not a checkpoint directory (no config.json)")
        return path
    if name != TINY_DRAFTER:
        raise FtError(f"export.drafter: unknown tiny drafter '{name}' (known: {TINY_DRAFTER})")
    if not (cache / "config.json").is_file():
        with staged_dir(cache) as tmp:
            save_tiny_drafter(tmp)
    return cache


def calibration_batches(merged: Path, source: DataSource, rows: int, data: DataSection, batch_size: int = 4):
    """Batches of calibration rows encoded exactly as training encodes them."""
    from ft.data import load_rows
    from ft.models import load_processor

    processor = load_processor(str(merged), data.image_soft_tokens)
    usable = [r for r in load_rows(source, data.format, data.columns) if not r.problems][:rows]
    for start in range(0, len(usable), batch_size):
        features = [encode_row(r, processor) for r in usable[start : start + batch_size]]
        yield collate(features, processor.tokenizer.pad_token_id)


class Export:
    """One export folder and its manifest; `make` runs a step unless its output is current."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder  # claimed by this process (ft.rundir)
        self.name = name
        remove_stale_temporaries(folder)
        self.manifest = Manifest(folder / "manifest.json")

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.name}-{suffix}.gguf"

    def make(self, path: Path, kind: str, inputs: str, build: Callable[[Path], object], **extra: str) -> Path:
        state = self.manifest.state(path, inputs)
        if state == "current":
            console.print(f"[dim]up to date: {path.name}")
            return path
        if state == "damaged":
            console.print(f"[yellow]{path.name} is damaged: its SHA-256 differs from manifest.json's; making it again",
                          highlight=False)
        console.print(f"writing {path.name}")
        build(path)
        self.manifest.record(path, kind=kind, inputs=inputs, **extra)
        return path


def model_checkpoint(run: Path, recipe: Recipe, folder: Path) -> tuple[Path, str]:
    """The 16-bit checkpoint of the exported model (a study's base model; a trained run's merged one, merged or
    reused here) and a fingerprint of what it was made from."""
    if recipe.study:
        return base_checkpoint(recipe.model.name, run / "base"), fingerprint("base", recipe.model.name)
    adapter = run / "adapter" / "adapter_model.safetensors"
    inputs = fingerprint("merge", recipe.model.name, sha256(adapter))
    merged = folder / "merged"
    stamp = merged / "ft_merge.json"
    if stamp.is_file() and json.loads(stamp.read_text())["inputs"] == inputs:
        return merged, inputs
    base = base_checkpoint(recipe.model.name, run / "base")
    console.print("merging the LoRA into the base model")
    merge_lora(base, run / "adapter", merged)
    write_text(stamp, json.dumps({"inputs": inputs, "base": recipe.model.name}) + "\n")
    return merged, inputs


def given_reference(job: Export, gguf: Path, ref_type: str) -> Path:
    """A GGUF the user already has, linked into the export as its reference (not converted again); its type must be
    export.reference's, which names the file and the report's reference row."""
    from gguf import GGUFReader, LlamaFileType

    if not gguf.is_file():
        raise FtError(f"{gguf}: no such file")
    try:
        field = GGUFReader(gguf).fields["general.file_type"]
        file_type = LlamaFileType(int(field.parts[field.data[0]][0])).name
    except (KeyError, ValueError, OSError) as exc:
        raise FtError(f"{gguf}: not a GGUF with a general.file_type ({exc})") from None
    expected = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}[ref_type]
    if file_type != expected:
        raise FtError(f"{gguf} is {file_type}, but export.reference is {ref_type}: give an unquantized GGUF of "
                      "that type, or set export.reference to the file's type")

    def link(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.symlink_to(gguf)

    return job.make(job.path(ref_type), "language model (given)", fingerprint("given", str(gguf)), link,
                    type=ref_type, source=str(gguf))


def needs_imatrix(export: ExportSection, quants: list[str]) -> bool:
    from quantize.llama_quant import NEEDS_IMATRIX

    if export.imatrix == "on":
        return True
    if export.imatrix == "off":
        return False
    return any(q in NEEDS_IMATRIX for q in quants)


def importance_matrix(job: Export, merged: Path, merged_inputs: str, recipe: Recipe, export: ExportSection) -> Path:
    from transformers import Gemma4UnifiedForConditionalGeneration

    from quantize.imatrix import collect_imatrix, write_imatrix_gguf

    data = export.calibration or recipe.data.train
    inputs = fingerprint(
        "imatrix", merged_inputs, sha256(data) if isinstance(data, Path) and data.is_file() else str(data),
        export.calibration_rows, recipe.data.format, recipe.data.columns.model_dump(),
    )

    def build(path: Path) -> None:
        model = Gemma4UnifiedForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
        batches = list(calibration_batches(merged, data, export.calibration_rows, recipe.data))
        stats = collect_imatrix(model, batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        # llama.cpp's chunk_size is tokens per chunk; ft's chunks are batches of rows of varying length.
        write_imatrix_gguf(stats, path, datasets=[str(data)], chunk_count=len(batches),
                           chunk_size=round(tokens / len(batches)))

    return job.make(job.folder / f"{job.name}-imatrix.gguf", "importance matrix", inputs, build)


def export_run(target: Path, overrides: Sequence[str] = ()) -> Path:
    """Run every export step for a training run (with `export.*` overrides); returns the export folder."""
    run, recipe = resolve_run(target, overrides)
    return export_trained(run, recipe)


def export_trained(run: Path, recipe: Recipe, extra_quants: Sequence[str] = ()) -> Path:
    """Every export step for `run` as `recipe` says, plus `extra_quants` (which eval asks for)."""
    with ExitStack() as held:  # one writer: the run (its model caches) and the export folder, until the end
        held.enter_context(lock(run))
        with recipe.blame("output.dir" if recipe.export is None or recipe.export.dir is None else "export.dir"):
            held.enter_context(claim(recipe.export_dir(run), "export"))
        return write_export(Export(recipe.export_dir(run), run.name), run, recipe, extra_quants)


def write_quants(job: Export, reference: Path, reference_sha: str, quant_types: list[str], merged: Path,
                 merged_inputs: str, recipe: Recipe, export: ExportSection) -> dict[str, Path]:
    """The importance matrix (when needed) and every type of `quant_types` from `reference`, as `export` says, into
    `job`'s folder; returns the quant files by type."""
    from quantize.imatrix import normalized, read_imatrix_gguf
    from quantize.llama_quant import quantize

    imatrix = None
    if needs_imatrix(export, quant_types):
        imatrix = importance_matrix(job, merged, merged_inputs, recipe, export)

    imatrix_sha = job.manifest.entry(imatrix.name)["sha256"] if imatrix else None
    values = normalized(read_imatrix_gguf(imatrix)) if imatrix else None
    quants = {}
    for qtype in quant_types:
        inputs = fingerprint("quant", qtype, reference_sha, imatrix_sha, export.tensor_types)
        quants[qtype] = job.make(
            job.path(qtype), "quantized language model", inputs,
            lambda p, q=qtype: quantize(reference, p, q, imatrix=values, tensor_types=export.tensor_types or None),
            type=qtype,
        )
    return quants


def write_export(job: Export, run: Path, recipe: Recipe, extra_quants: Sequence[str]) -> Path:
    """Every export step into `job`'s folder, each skipped when its file is current."""
    from quantize.gguf_drafter import write_drafter
    from quantize.gguf_lm import write_language_model
    from quantize.gguf_mmproj import write_projector
    from quantize.modelfile import export_readme, modelfile, sampling_defaults

    export = recipe.export or ExportSection()
    merged, merged_inputs = model_checkpoint(run, recipe, job.folder)

    ref_type = export.reference
    if recipe.model.gguf is not None:
        with recipe.blame("model.gguf"):
            reference = given_reference(job, recipe.model.gguf, ref_type)
    else:
        reference = job.make(job.path(ref_type), "language model", fingerprint("lm", ref_type, merged_inputs),
                             lambda p: write_language_model(merged, p, ref_type), type=ref_type)
    projector = None
    if export.projector:
        projector = job.make(job.path("mmproj-F16"), "projector", fingerprint("mmproj", merged_inputs),
                             lambda p: write_projector(merged, p, "F16"), type="F16")
    drafter = None
    if export.drafter is not None:
        drafter_dir = drafter_checkpoint(export.drafter, run / "drafter-base")
        drafter_inputs = fingerprint("drafter", ref_type, export.drafter, merged_inputs)
        drafter = job.make(job.path(f"drafter-{ref_type}"), "MTP drafter", drafter_inputs,
                           lambda p: write_drafter(drafter_dir, merged, p, ref_type), type=ref_type)
    reference_sha = job.manifest.entry(reference.name)["sha256"]
    quant_types = list(dict.fromkeys([*export.quants, *extra_quants]))
    quants = write_quants(job, reference, reference_sha, quant_types, merged, merged_inputs, recipe, export)
    for name in export.variants:  # each in its own folder and manifest: the same file names, other settings
        folder = job.folder / name
        folder.mkdir(exist_ok=True)
        variant = export.variant(name)
        write_quants(Export(folder, job.name), reference, reference_sha, variant.quants, merged, merged_inputs,
                     recipe, variant)

    chosen = next((quants[q] for q in FIRST_CHOICE if q in quants), next(iter(quants.values())))
    names = (chosen.name, projector.name if projector else None, drafter.name if drafter else None)
    write_text(job.folder / "Modelfile", modelfile(*names, sampling_defaults(merged)))
    files = sorted(job.manifest.files.values(), key=lambda f: f["file"])
    write_text(job.folder / "README.md", export_readme(run.name, *names, files))
    console.print(f"[green]export written to {job.folder}")
    return job.folder
