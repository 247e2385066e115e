"""Find and load the model a recipe names: a hub id, a local checkpoint directory, or a tiny random model.

Nothing here reaches the network unless the user's machine is online and not in offline mode
(`HF_HUB_OFFLINE=1`); a model that is neither local nor cached fails at once with where ft looked.

    >>> model = load_model("tiny-random:gemma4-unified")
    >>> type(model).__name__
    'Gemma4UnifiedForConditionalGeneration'
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    Gemma4UnifiedForConditionalGeneration,
    PretrainedConfig,
    ProcessorMixin,
)

from ft.errors import ModelError
from ft.recipe import HUB_ID
from ft.tiny import TINY_NAMES, TINY_PREFIX, build_tiny, save_tiny, tiny_config, tiny_processor

MODEL_TYPE = "gemma4_unified"
HUB_PROBE_SECONDS = 5.0  # a reachable endpoint answers a TCP connect in well under a second

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nf4_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit NF4 with double-quantized absmax for the decoder's linear layers. The image and audio
    projections stay unquantized (small, and LoRA targets in their own right), as does the tied output head."""
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["model.embed_vision", "model.embed_audio", "lm_head"],  # prefixes of module names
    )


def offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def locate(name: str) -> str:
    """Return what `from_pretrained` should load: a directory, or a hub id known to be reachable."""
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"model directory {path} has no config.json: not a Hugging Face checkpoint")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelError(f"{config}: cannot read it as a JSON object ({exc})") from None
        if model_type != MODEL_TYPE:
            raise ModelError(f"model directory {path} holds a '{model_type}' model; ft trains '{MODEL_TYPE}' (Gemma 4)")
        return str(path)
    if not HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelError(f"model directory not found: {path.resolve()}")
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return name
    cache = hub_constants.HF_HUB_CACHE
    where = f"model '{name}' is not a local directory and is not in the Hugging Face cache ({cache})"
    fix = (f"Download it on a connected machine (`hf download {name}`) or point model.name at a local checkpoint "
           "directory.")
    if offline():
        raise ModelError(f"{where}; offline mode is on (HF_HUB_OFFLINE=1). {fix}")
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelError(f"{where}, and the hub cannot be reached: {unreachable}. {fix}")
    return name


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face endpoint cannot be reached, found within `timeout` seconds, or None.

    Without it a machine with no network waits out huggingface_hub's retries (about 30 s) before transformers says
    so. Behind a proxy only the proxy can reach the hub, so a direct connection proves nothing and none is tried.
    """
    if set(getproxies()) - {"no"}:  # *_proxy variables of any case (no_proxy alone routes nothing through one)
        return None
    url = urlsplit(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"no connection to {url.hostname}:{port} ({exc})"
    return None


def load_processor(name: str, image_soft_tokens: int = 280) -> ProcessorMixin:
    """The model's processor alone (no weights are loaded)."""
    if name.startswith(TINY_PREFIX):
        _tiny_name(name)  # checks the name
        processor = tiny_processor()
    else:
        try:
            processor = AutoProcessor.from_pretrained(locate(name))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the processor of model '{name}': {exc}") from None
    processor.image_processor.max_soft_tokens = image_soft_tokens
    return processor


def load_config(name: str) -> PretrainedConfig:
    """The model's config alone (no weights, no processor): what the memory planner needs."""
    if name.startswith(TINY_PREFIX):
        _tiny_name(name)  # checks the name
        return tiny_config(tiny_processor().tokenizer)
    try:
        return AutoConfig.from_pretrained(locate(name))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the config of model '{name}': {exc}") from None


def _tiny_name(name: str) -> str:
    tiny = name.removeprefix(TINY_PREFIX)
    if tiny not in TINY_NAMES:
        raise ModelError(f"unknown tiny model '{name}'; known: {', '.join(TINY_PREFIX + n for n in TINY_NAMES)}")
    return tiny


def load_model(
    name: str, dtype: str = "float32", device: str = "cpu", quantization: str = "none"
) -> Gemma4UnifiedForConditionalGeneration:
    """Load the model's weights in `dtype` (a `DTYPES` name), with an NF4 base when quantization is nf4, as
    `ft.resolve` decided them (its processor comes from `load_processor`). Tiny models are built locally from
    `ft.tiny` (through a temporary checkpoint folder when quantized, as bitsandbytes quantizes while loading)."""
    torch_dtype = DTYPES[dtype]
    nf4 = quantization == "nf4"
    if name.startswith(TINY_PREFIX) and not nf4:
        return build_tiny(_tiny_name(name))[0].to(torch_dtype).to(device)
    with checkpoint_folder(name) as source:
        return _from_pretrained(source, name, torch_dtype, device, nf4)


@contextmanager
def checkpoint_folder(name: str) -> Iterator[str]:
    """What a loader that reads checkpoints (bitsandbytes quantizing while loading, unsloth) should be given: a
    local directory or a reachable hub id, and for a tiny model a temporary checkpoint of it with its processor."""
    if not name.startswith(TINY_PREFIX):
        yield locate(name)
        return
    with tempfile.TemporaryDirectory() as folder:
        yield str(save_tiny(Path(folder), _tiny_name(name)))


def _from_pretrained(
    source: str, name: str, dtype: torch.dtype, device: str, nf4: bool
) -> Gemma4UnifiedForConditionalGeneration:
    extra = {"quantization_config": nf4_config(dtype), "device_map": {"": device}} if nf4 else {}
    try:
        model = Gemma4UnifiedForConditionalGeneration.from_pretrained(source, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{name}': {exc}") from None
    return model if nf4 else model.to(device)  # a 4-bit model is placed by device_map and cannot be moved

