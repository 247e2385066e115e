"""The recipe schema: one pydantic model per YAML section. `ft schema` prints it as JSON Schema.

Every field is documented here and in README.md's recipe reference; unknown keys are errors.

    >>> r = Recipe.model_validate({"model": {"name": "tiny-random:gemma4-unified"},
    ...                            "data": {"train": "data/demo/train.jsonl"}, "output": {"dir": "runs/x"}})
    >>> r.lora.r, r.train.lr
    (16, 0.0002)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from ft.errors import FtError
from ft.quant_types import NEEDS_IMATRIX, QUANT_TYPES

LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMAGE_SOFT_TOKENS = (70, 140, 280, 560, 1120)
TINY_PREFIX = "tiny-random:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a data path ends with; a recipe string without one that names no local file and looks like a hub id is one.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
DEFAULT_QUANTS = ("Q8_0", "Q6_K", "Q4_K_M")


def _quant_names(names: list[str]) -> list[str]:
    """Upper-case llama.cpp type names and reject unknown ones before any work starts."""
    upper = [name.upper() for name in names]
    unknown = [name for name in upper if name not in QUANT_TYPES]
    if unknown:
        raise ValueError(f"unknown quantization type {', '.join(unknown)} (known: {', '.join(QUANT_TYPES)})")
    return upper


def _on_off(value: object) -> object:
    """YAML reads `on` and `off` as booleans; the auto/on/off settings take them back as words."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        min_length=1,
        description="Hub id (google/gemma-4-12B-it), a local checkpoint directory, or tiny-random:gemma4-unified.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for training; auto is float32 on CPU and bfloat16 on CUDA."
    )
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto", description="Base weights while training: nf4 is QLoRA (bitsandbytes 4-bit NF4, double-quantized) on "
        "the decoder's linear layers; auto is nf4 on CUDA and none elsewhere."
    )
    gguf: Path | None = Field(
        None, description="A study's unquantized GGUF of this model (F32, F16 or BF16, as export.reference says), "
        "one you already have: it is the reference that every quant is made from and measured against, linked "
        "into the export rather than converted again; model.name still gives the tokenizer, chat template and "
        "projector. Needs study: true.",
    )


class HubDataset(Section):
    """A dataset on the Hugging Face hub, loaded through `datasets` (and its cache)."""

    hub: str = Field(pattern=HUB_ID.pattern, description="Dataset id, such as HuggingFaceH4/ultrachat_200k.")
    subset: str | None = Field(None, description="Subset (configuration) name, where the dataset has several.")
    split: str = Field("train", min_length=1, description="Split to read, such as train or test_sft.")

    def __str__(self) -> str:
        return f"{self.hub}{f'/{self.subset}' if self.subset else ''}[{self.split}]"


DataSource = Path | HubDataset


class ColumnsSection(Section):
    """Where a dataset keeps what ft needs, for files not in ft's own `messages` form; unset keys are guessed."""

    messages: str | None = Field(None, description="Conversation column (default: messages, else conversations).")
    role: str | None = Field(None, description="Role key of a turn (default: role, else from).")
    content: str | None = Field(None, description="Content key of a turn (default: content, else value).")
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict, description="Role names of the file mapped to system, user or assistant, on top of "
        "the usual ones (human, gpt, model, bot, ...).",
    )
    instruction: str = Field("instruction", description="Alpaca: the instruction column.")
    input: str = Field("input", description="Alpaca: the optional input column, appended to the instruction.")
    output: str = Field("output", description="Alpaca: the answer column.")
    system: str = Field("system", description="Alpaca and sharegpt: an optional system prompt column.")
    images: str = Field("images", description="Column of a row's images (paths, bytes or a datasets Image feature), "
                        "placed at the <image> markers of the text, else before the first user text.")
    audios: str = Field("audios", description="Column of a row's audio clips, placed at <audio> markers likewise.")


class DataSection(Section):
    train: DataSource = Field(description="Training data: a .jsonl, .json, .parquet, .csv or .arrow file, a datasets "
                              "folder (save_to_disk), or a hub dataset id (or {hub, subset, split}).")
    eval: DataSource | None = Field(None, description="Held-out data, from any source data.train takes; evaluated "
                                    "every train.eval_every.")
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = Field(
        "auto", description="Row format: messages (ft's own), sharegpt (turns as from/value or role/content with "
        "images/audios columns), alpaca (instruction/input/output); auto picks by the first row's keys."
    )
    columns: ColumnsSection = Field(default_factory=ColumnsSection, description="Column names of other formats.")
    max_seq_length: int = Field(2048, ge=16, le=131072, description="Longest row in tokens (media tokens included).")
    too_long: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Rows over max_seq_length: drop them, truncate them (text cut at the end, never inside "
        "an image or audio, the turn still closed), or report them as errors."
    )
    max_dropped: float = Field(0.1, ge=0.0, le=1.0, description="Largest share of rows that too_long may drop "
                               "before the run stops.")
    eval_split: float | int = Field(
        0, ge=0, description="Held-out rows taken from data.train when data.eval is not given: a fraction below 1 "
        "or a count; the same rows every run (a seeded hash of each row, train.seed)."
    )
    image_soft_tokens: Literal[70, 140, 280, 560, 1120] = Field(
        280, description="Soft tokens per image (48 px patches); more tokens means more detail and more memory."
    )

    @field_validator("eval_split")
    @classmethod
    def _split_size(cls, value: float | int, info: ValidationInfo) -> float | int:
        if isinstance(value, float) and not value.is_integer() and value >= 1:
            raise ValueError("a fraction must be below 1 (or give a whole number of rows)")
        if value and info.data.get("eval") is not None:
            raise ValueError("data.eval is given: hold rows out of data.train or give data.eval, not both")
        return int(value) if isinstance(value, float) and value >= 1 else value


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: list(LANGUAGE_TARGETS),
        min_length=1,
        description="Language-model projections that carry the LoRA, in every decoder layer.",
    )
    vision: bool = Field(
        False,
        description="Also adapt the image projections (embed_vision.patch_dense and "
        "embed_vision.multimodal_embedder.embedding_projection).",
    )
    audio: bool = Field(False, description="Also adapt the audio projection (embed_audio.embedding_projection).")


class SamplePart(Section):
    """One part of a sample prompt's message, as in the data (`ft.data`): text, or an image or audio file."""

    type: Literal["text", "image", "audio"]
    text: str | None = Field(None, description="The text of a text part.")
    path: Path | None = Field(None, description="An image or audio file (relative to the recipe's folder).")

    @model_validator(mode="after")
    def _has_its_field(self) -> SamplePart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a 'text'")
        if self.type != "text" and self.path is None:
            raise ValueError(f"an {self.type} part needs a 'path'")
        return self


class SampleMessage(Section):
    role: Literal["system", "user", "assistant"]
    content: str | list[SamplePart] = Field(min_length=1)


def _sample_conversation(prompt: str | list[SampleMessage]) -> list[SampleMessage]:
    return [SampleMessage(role="user", content=prompt)] if isinstance(prompt, str) else prompt


class TrainSection(Section):
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="Who builds and trains the model: hf (transformers + peft + bitsandbytes with ft's "
        "memory work; any device) or unsloth (CUDA only); auto is unsloth on CUDA where it imports and a micro-batch "
        "(train.batch_size x data.max_seq_length) is small enough that unsloth is the faster, hf elsewhere (the bound "
        "and its measurements: docs/BENCHMARKS.md, \"Training backends at the Gemma 4 12B shape\")."
    )
    seed: int = Field(0, ge=0, description="Seeds weights of new LoRA layers, data order and dropout.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(1, ge=1, le=4096, description="Rows per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    log_every: int = Field(10, ge=1, description="Log training loss every N optimizer steps.")
    eval_every: int = Field(50, ge=1, description="Evaluate on data.eval every N optimizer steps.")
    save_every: int = Field(50, ge=1, description="Write a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    offload_activations: Literal["auto", "on", "off"] = Field(
        "auto", description="With gradient_checkpointing, keep each layer's checkpointed input in CPU memory instead "
        "of on the GPU (trl's activation offloading); auto is on for CUDA."
    )
    tiled_mlp: Literal["auto", "on", "off"] = Field(
        "auto", description="With gradient_checkpointing, run the MLP over long rows 2048 tokens at a time (less "
        "memory, one more MLP forward); auto tiles when the memory plan would not fit memory_budget_gb otherwise."
    )
    compile_layers: bool = Field(
        False, description="Compile each decoder layer with torch.compile on the hf backend: fewer, fused kernels "
        "a step, after a first step that waits for compilation (worth it only for long runs; see docs/BENCHMARKS.md)."
    )
    group_by_length: bool = Field(
        True, description="Batch rows of similar token length together (less padding); the order stays shuffled."
    )
    memory_budget_gb: float = Field(16.0, gt=0, description="GPU memory the run may use (checked on CUDA).")
    sample_prompts: list[str | list[SampleMessage]] = Field(
        default_factory=list, description="Prompts the model answers while it trains (greedy), into samples.jsonl "
        "and wandb: each a string (one user message) or a conversation in the data's messages form (media allowed) "
        "ending with a user message."
    )
    sample_every: int = Field(50, ge=1, description="Answer train.sample_prompts every N optimizer steps (and at "
                                                    "the end).")
    sample_tokens: int = Field(32, ge=1, le=4096, description="Most new tokens of a sample answer.")
    devices: int = Field(
        1, ge=1, le=1024, description="Processes on this machine, one a GPU: above 1, ft train starts torchrun itself "
        "(data parallel; a step trains batch_size x grad_accum x devices rows). Under torchrun (several machines) "
        "torchrun's --nproc-per-node decides: leave 1 or give the same number."
    )

    @field_validator("offload_activations", "tiled_mlp", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        return _on_off(value)

    @field_validator("sample_prompts")
    @classmethod
    def _sample_turns(cls, value: list[str | list[SampleMessage]]) -> list[str | list[SampleMessage]]:
        for i, prompt in enumerate(value):
            roles = [m.role for m in _sample_conversation(prompt)]
            if not roles or roles[-1] != "user":
                raise ValueError(f"prompt {i} must end with a user message (the model answers it)")
            if "system" in roles[1:]:
                raise ValueError(f"prompt {i}: a system message may only come first")
        return value

    def sample_conversations(self) -> list[list[dict[str, object]]]:
        """sample_prompts as conversations in the data's messages form (media paths as strings)."""
        return [[m.model_dump(mode="json", exclude_none=True) for m in _sample_conversation(p)]
                for p in self.sample_prompts]

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_fits(cls, value: int, info: ValidationInfo) -> int:
        max_steps = info.data.get("max_steps")
        if max_steps is not None and value >= max_steps:
            raise ValueError(f"must be smaller than train.max_steps ({max_steps})")
        return value


class LoggingSection(Section):
    wandb: Literal["auto", "disabled", "offline", "online"] = Field(
        "auto", description="auto is online when WANDB_API_KEY is set, else offline."
    )
    project: str = Field("ft", min_length=1, description="wandb project name.")
    run_name: str | None = Field(None, description="wandb run name; defaults to the output folder's name.")


class OutputSection(Section):
    dir: Path = Field(description="Run directory: resolved recipe, checkpoints, adapter, metrics, plots.")
    overwrite: bool = Field(False, description="Start afresh even if the run directory already has a run in it.")


class VariantSection(Section):
    """One named quantization setting of a study, written to `<export folder>/<name>/`; a key it leaves out is the
    export section's."""

    quants: list[str] | None = Field(None, min_length=1, description="Types to write (default: export.quants).")
    imatrix: Literal["auto", "on", "off"] | None = Field(None, description="As export.imatrix (default: its value).")
    calibration: Path | None = Field(None, description="As export.calibration (default: its value).")
    calibration_rows: int | None = Field(None, ge=1, description="As export.calibration_rows (default: its value).")
    tensor_types: dict[str, str] | None = Field(None, description="As export.tensor_types (default: its value).")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _quant_names(value)

    @field_validator("imatrix", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        return _on_off(value)


class ExportSection(Section):
    """What `ft quantize` writes: GGUF files for llama.cpp and Ollama (merged model, projector, drafter, quants)."""

    quants: list[str] = Field(
        default_factory=lambda: list(DEFAULT_QUANTS), min_length=1,
        description="llama.cpp quantization types to write, e.g. Q8_0 Q6_K Q4_K_M Q3_K_M IQ3_XXS Q2_K IQ2_XXS.",
    )
    reference: Literal["F32", "F16", "BF16"] = Field(
        "BF16", description="Type of the unquantized GGUF that every quant is made from (and eval compares with)."
    )
    projector: bool = Field(True, description="Write the multimodal projector GGUF (images and audio).")
    drafter: str | None = Field(
        None, description="MTP drafter to export: a gemma4_unified_assistant checkpoint directory, or "
        "tiny-random:gemma4-unified-assistant (the tiny drafter of the tiny model).",
    )
    imatrix: Literal["auto", "on", "off"] = Field(
        "auto", description="Importance matrix: auto computes it when a listed type needs one (IQ2_*, IQ3_XXS, ...)."
    )
    calibration: Path | None = Field(
        None, description="Calibration data for the importance matrix (default data.train)."
    )
    calibration_rows: int = Field(128, ge=1, description="Rows of calibration data used for the importance matrix.")
    tensor_types: dict[str, str] = Field(
        default_factory=dict,
        description="Per-tensor type overrides, GGUF tensor name (regex) -> type, e.g. token_embd.weight: Q8_0.",
    )
    dir: Path | None = Field(None, description="Export folder (default: output.dir/gguf).")
    variants: dict[str, VariantSection] = Field(
        default_factory=dict, description="Named quantization settings besides the plain one (name -> settings), "
        "each written to export.dir/NAME/ and measured by ft eval against the same reference in the same pass.",
    )

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: list[str]) -> list[str]:
        return _quant_names(value)

    @field_validator("imatrix", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        return _on_off(value)

    @field_validator("variants")
    @classmethod
    def _folder_names(cls, value: dict[str, VariantSection]) -> dict[str, VariantSection]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == "merged"]
        if bad:
            raise ValueError(f"variant names become folder names: {', '.join(bad)} is not one (letters, digits, "
                             "'_', '.', '-'; not 'merged')")
        return value

    @model_validator(mode="after")
    def _imatrix_available(self) -> ExportSection:
        for name, export in [("", self), *((f"variants.{n}.", self.variant(n)) for n in self.variants)]:
            needing = [q for q in export.quants if q in NEEDS_IMATRIX]
            if export.imatrix == "off" and needing:
                raise ValueError(f"{', '.join(needing)} need an importance matrix, but export.{name}imatrix is off")
        return self

    def variant(self, name: str) -> ExportSection:
        """The export settings of variant `name`: its own keys over this section's, without variants."""
        own = self.variants[name].model_dump(exclude_none=True)
        return self.model_construct(**{**dict(self), **own, "variants": {}})


class EvalSection(Section):
    """What `ft eval` measures: each quant against the unquantized reference GGUF, with llama.cpp as the judge."""

    quants: list[str] = Field(
        default_factory=lambda: list(DEFAULT_QUANTS), min_length=1,
        description="Quant types to measure; files missing from the export are made first.",
    )
    text: Path | None = Field(None, description="Evaluation text file (default: held-out rows, chat-rendered).")
    context: int = Field(512, ge=32, le=32768, description="Tokens per scored chunk (its second half is scored).")
    max_tokens: int = Field(8192, ge=64, description="Tokens of evaluation text used for the divergence metrics.")
    tasks: list[str] = Field(
        default_factory=lambda: ["basic_arithmetic", "chain_sum"],
        description="reasoning-gym task generators for the accuracy test.",
    )
    samples: int = Field(50, ge=0, description="Prompts per reasoning task (0 skips reasoning tasks).")
    heldout: bool = Field(True, description="Also score the held-out set (its last assistant turn is the answer).")
    max_new_tokens: int = Field(48, ge=1, description="Greedy tokens per answer.")
    speed: bool = Field(True, description="Measure decode speed with the MTP drafter on and off.")
    speed_prompts: int = Field(20, ge=1, description="Prompts for the speed and MTP identity test.")
    speed_tokens: int = Field(64, ge=1, description="Tokens decoded per speed prompt.")
    draft_len: int = Field(3, ge=1, le=16, description="Tokens the MTP drafter proposes per step.")
    seed: int = Field(0, ge=0, description="Seed of the generated reasoning tasks.")
    threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp (default: all).")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: list[str]) -> list[str]:
        return _quant_names(value)


class Recipe(Section):
    """A whole `ft` recipe. Relative paths are relative to the recipe file's folder."""

    study: bool = Field(
        False, description="A quant-sensitivity study: nothing is trained; ft quantize exports the model as it is "
        "(model.name, or model.gguf) and ft eval measures its quants. A study has no lora or train section."
    )
    model: ModelSection
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output: OutputSection
    export: ExportSection | None = None
    eval: EvalSection | None = None

    _where: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _gguf_is_a_study(cls, value: ModelSection, info: ValidationInfo) -> ModelSection:
        # a trained run's reference is its merged model: a given GGUF would silently measure something else
        if value.gguf is not None and not info.data.get("study"):
            raise ValueError("model.gguf is the reference of a study, which trains nothing; add study: true")
        return value

    @field_validator("lora", "train")  # runs only for sections the recipe spells out
    @classmethod
    def _nothing_to_train(cls, value: Section, info: ValidationInfo) -> Section:
        if info.data.get("study"):
            raise ValueError(f"a study (study: true) trains nothing; remove the {info.field_name} section")
        return value

    def where(self, key: str) -> str:
        """`file:line: key` (or `override '...': key`) of a recipe key, for errors found after validation.

        List items are keyed by index (`eval.tasks.1`, shown as `eval.tasks[1]`); a key the file does not spell
        out (a default, or an item of an overridden list) is placed at the nearest enclosing key that it does.
        """
        shown = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            if (place := self._where.get(".".join(parts[:end]))) is not None:
                return f"{place}: {shown}"
        return shown

    @contextmanager
    def blame(self, key: str) -> Iterator[None]:
        """Prefix any FtError raised inside with the place of `key` in the recipe."""
        try:
            yield
        except FtError as exc:
            raise type(exc)(f"{self.where(key)}: {exc}") from None

    def export_dir(self, run: Path | None = None) -> Path:
        """Where `ft quantize` writes: export.dir, else `gguf/` in the run directory (`run`, default output.dir)."""
        if self.export is not None and self.export.dir is not None:
            return self.export.dir
        return (run or self.output.dir) / "gguf"

    def eval_dir(self, run: Path | None = None) -> Path:
        """Where `ft eval` writes: `eval/` in the run directory (`run`, default output.dir)."""
        return (run or self.output.dir) / "eval"

    def resolve_paths(self, base: Path) -> Recipe:
        """Return a copy whose relative paths are anchored at `base` (the recipe file's folder)."""
        data = self.data.model_copy(
            update={"train": _data_source(base, self.data.train), "eval": _data_source(base, self.data.eval)}
        )
        output = self.output.model_copy(update={"dir": (base / self.output.dir).resolve()})
        update = {"data": data, "output": output}
        local = base / self.model.name
        model = {}
        if self.model.name.startswith(("./", "../")) or local.is_dir():
            model["name"] = str(local.resolve())
        if self.model.gguf is not None:
            model["gguf"] = (base / self.model.gguf).resolve()
        if model:
            update["model"] = self.model.model_copy(update=model)
        if self.export is not None:
            paths = {key: (base / value).resolve() for key in ("calibration", "dir")
                     if (value := getattr(self.export, key)) is not None}
            variants = {name: v.model_copy(update={"calibration": (base / v.calibration).resolve()})
                        if v.calibration is not None else v for name, v in self.export.variants.items()}
            paths["variants"] = variants
            drafter = self.export.drafter
            if drafter is not None and not drafter.startswith(TINY_PREFIX):
                paths["drafter"] = str((base / drafter).resolve())
            update["export"] = self.export.model_copy(update=paths)
        if self.train.sample_prompts:
            update["train"] = self.train.model_copy(update={"sample_prompts": [
                prompt if isinstance(prompt, str) else [_anchored(message, base) for message in prompt]
                for prompt in self.train.sample_prompts]})
        if self.eval is not None and self.eval.text is not None:
            update["eval"] = self.eval.model_copy(update={"text": (base / self.eval.text).resolve()})
        return self.model_copy(update=update)


def _data_source(base: Path, source: DataSource | None) -> DataSource | None:
    """A data path anchored at `base`, or the hub dataset a bare `owner/name` means when no such file is there."""
    if not isinstance(source, Path):
        return source
    local = (base / source).resolve()
    text = source.as_posix()
    if not local.exists() and HUB_ID.match(text) and source.suffix not in DATA_SUFFIXES and not text.startswith("."):
        return HubDataset(hub=text)
    return local


def _anchored(message: SampleMessage, base: Path) -> SampleMessage:
    """A sample message whose media paths are anchored at `base`."""
    if isinstance(message.content, str):
        return message
    return message.model_copy(update={"content": [
        part.model_copy(update={"path": (base / part.path).resolve()}) if part.path is not None else part
        for part in message.content]})
