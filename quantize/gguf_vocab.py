"""Tokenizer metadata for Gemma 4 GGUF files (`tokenizer.ggml.model = "gemma4"`), shared by every converter.

llama.cpp loads a vocabulary for every model (the language model and the MTP drafter alike) and tokenizes Gemma 4
as SPM-style BPE over raw UTF-8: spaces become '▁', BPE merges run on the text between newlines, and pieces that
are not in the vocabulary fall back to `<0xXX>` byte tokens. So the metadata is the `tokenizer.json` vocabulary and
merges verbatim, plus token types that make llama.cpp split added tokens out of text exactly where Hugging Face
does (see `token_types`).

    >>> import tempfile, pathlib, gguf
    >>> from ft.tiny import save_tiny
    >>> checkpoint = save_tiny(pathlib.Path(tempfile.mkdtemp()) / "tiny")
    >>> writer = gguf.GGUFWriter(None, arch="gemma4")
    >>> add_tokenizer(writer, checkpoint)
    1024
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from ft.errors import FtError

# Special tokens the vendored llama.cpp converter keeps visible (USER_DEFINED rather than CONTROL) so that its chat
# parser sees them in generated text: thinking channels, tool calls and string quotes.
VISIBLE_TOKENS = frozenset(
    {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
)
# gguf 0.19.0 has no Keys entry for it; llama.cpp reads it as an optional INT32 array.
SUPPRESS_TOKENS_KEY = "tokenizer.ggml.suppress_tokens"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# tokenizer_config.json field → GGUF writer method. With gemma4, llama.cpp defaults every special id to "none".
_SPECIAL_IDS = {
    "bos_token": "add_bos_token_id",
    "eos_token": "add_eos_token_id",
    "unk_token": "add_unk_token_id",
    "pad_token": "add_pad_token_id",
    "mask_token": "add_mask_token_id",
}


class GGUFConversionError(FtError):
    """The checkpoint cannot be written as a GGUF file that llama.cpp loads."""


def add_tokenizer(writer: gguf.GGUFWriter, checkpoint_dir: Path) -> int:
    """Write all `tokenizer.*` keys for the checkpoint's tokenizer; returns the token count (= embedding rows)."""
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = _read_json(checkpoint_dir / "tokenizer.json")
    config = _read_json(checkpoint_dir / "tokenizer_config.json")
    tokens, added = vocabulary(tokenizer)
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    # BPE ignores scores; the placeholder keeps the array that generic GGUF tools expect.
    writer.add_token_scores([-1000.0] * len(tokens))
    writer.add_token_types([int(t) for t in token_types(tokens, added)])
    writer.add_token_merges(merges(tokenizer))
    _add_special_ids(writer, config, tokens)
    # Gemma 4 prompts start with <bos>; llama.cpp forces this for gemma4 anyway, other readers take it from here.
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    if (template := chat_template(checkpoint_dir, config)) is not None:
        writer.add_chat_template(template)
    writer.add_array(SUPPRESS_TOKENS_KEY, suppress_tokens(checkpoint_dir))  # skipped by the writer when empty
    return len(tokens)


def vocabulary(tokenizer: dict[str, Any]) -> tuple[list[str], dict[int, bool]]:
    """(text of every id 0..N-1, {added token id: its `special` flag}) from a parsed tokenizer.json."""
    by_id = {int(i): text for text, i in tokenizer["model"]["vocab"].items()}
    added = {}
    for token in tokenizer.get("added_tokens", []):
        by_id[int(token["id"])] = token["content"]
        added[int(token["id"])] = bool(token.get("special", False))
    if sorted(by_id) != list(range(len(by_id))):
        raise GGUFConversionError("tokenizer.json: token ids are not contiguous from 0")
    tokens = [by_id[i] for i in range(len(by_id))]
    if len(set(tokens)) != len(tokens):
        raise GGUFConversionError("tokenizer.json: two ids share a token text; llama.cpp needs unique tokens")
    return tokens, added


def token_types(tokens: list[str], added: dict[int, bool]) -> list[TokenType]:
    """llama.cpp token types that reproduce Hugging Face's tokenization.

    llama.cpp splits a token's text out of the input only for CONTROL (when parsing specials) and USER_DEFINED
    (always) tokens; Hugging Face does so for every added token. So every added token must get one of the two,
    whatever transformers' `all_special_ids` says (in transformers 5 it misses `<|turn>`, which would then be cut
    into BPE pieces inside every chat prompt). BYTE makes `<0xXX>` detokenize to the raw byte.
    """
    types = []
    for i, text in enumerate(tokens):
        if _BYTE_TOKEN.fullmatch(text):
            types.append(TokenType.BYTE)
        elif text in VISIBLE_TOKENS or (i in added and not added[i]):
            types.append(TokenType.USER_DEFINED)
        elif i in added:
            types.append(TokenType.CONTROL)
        else:
            types.append(TokenType.NORMAL)
    return types


def merges(tokenizer: dict[str, Any]) -> list[str]:
    """BPE merges as "left right" strings, in rank order (tokenizer.json stores pairs or such strings)."""
    out = []
    for merge in tokenizer["model"].get("merges", []):
        if isinstance(merge, str):
            out.append(merge)
            continue
        left, right = merge
        # llama.cpp splits a merge at its first space after the first character; a space inside `left` would move
        # the split. Gemma's normalizer turns spaces into '▁', so a real vocabulary never has one.
        if " " in left[1:]:
            raise GGUFConversionError(f"tokenizer.json: merge {merge!r} has a space llama.cpp cannot represent")
        out.append(f"{left} {right}")
    if not out:
        raise GGUFConversionError("tokenizer.json: no BPE merges (llama.cpp requires them for gemma4)")
    return out


def chat_template(checkpoint_dir: Path, config: dict[str, Any]) -> str | None:
    """The chat template: tokenizer_config.json's, else chat_template.jinja (transformers 5 saves it there)."""
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = Path(checkpoint_dir) / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def suppress_tokens(checkpoint_dir: Path) -> list[int]:
    """generation_config.json's `suppress_tokens` (ids never to sample), or []."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return []
    return [int(i) for i in json.loads(path.read_text()).get("suppress_tokens") or []]


def _add_special_ids(writer: gguf.GGUFWriter, config: dict[str, Any], tokens: list[str]) -> None:
    ids = {text: i for i, text in enumerate(tokens)}
    for field, method in _SPECIAL_IDS.items():
        text = _token_text(config.get(field))
        if text is None:
            continue
        if text not in ids:
            raise GGUFConversionError(f"tokenizer_config.json: {field} {text!r} is not in the vocabulary")
        getattr(writer, method)(ids[text])


def _token_text(value: str | dict[str, Any] | None) -> str | None:
    """A special token from tokenizer_config.json: a plain string, or an AddedToken dict (older transformers)."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GGUFConversionError(f"{path.parent}: no {path.name} (needed for the GGUF tokenizer metadata)")
    return json.loads(path.read_text())
