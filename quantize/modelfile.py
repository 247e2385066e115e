"""The Ollama Modelfile and the README.md that sit beside an export's GGUF files.

Ollama templates are Go templates, not Jinja, so the Gemma 4 turn format is written here again in Go's syntax.

    >>> text = modelfile("m-Q4_K_M.gguf", "m-mmproj-F16.gguf", None, {"temperature": 1.0})
    >>> text.splitlines()[1]
    'FROM ./m-Q4_K_M.gguf'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Gemma's published sampling defaults, used when the checkpoint's generation_config.json does not set them.
GEMMA_SAMPLING = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}
STOP = "<turn|>"

GO_TEMPLATE = """\
{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{- end }}{{- end }}
{{- if $system }}<|turn>system
{{ $system }}<turn|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|turn>user
{{ .Content }}<turn|>
{{ else if eq .Role "assistant" }}<|turn>model
{{ .Content }}<turn|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|turn>model
<|channel>thought
<channel|>{{ end }}
{{- end }}"""


def sampling_defaults(checkpoint_dir: Path) -> dict[str, Any]:
    """Temperature, top-k and top-p from the checkpoint's generation_config.json, else Gemma's defaults."""
    path = checkpoint_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {key: config.get(key, default) for key, default in GEMMA_SAMPLING.items()}


def modelfile(model: str, projector: str | None, drafter: str | None, sampling: dict[str, Any]) -> str:
    """An Ollama Modelfile: the model, its projector and MTP drafter, the Gemma 4 template and stop token."""
    lines = ["# Made by ft: ollama create NAME -f Modelfile", f"FROM ./{model}"]
    if projector:
        lines.append(f"FROM ./{projector}")
    if drafter:
        lines.append(f"DRAFT ./{drafter}")
    lines.append(f'TEMPLATE """{GO_TEMPLATE}"""')
    lines.append(f'PARAMETER stop "{STOP}"')
    lines += [f"PARAMETER {key} {value}" for key, value in sampling.items()]
    return "\n".join(lines) + "\n"


def export_readme(
    name: str, model: str, projector: str | None, drafter: str | None, files: list[dict[str, Any]]
) -> str:
    """README.md of the export folder: how to run the files in Ollama and llama.cpp, and what each file is."""
    table = "\n".join(
        f"| `{f['file']}` | {f['kind']} | {f['size'] / 2**20:.1f} MiB | {f.get('bits_per_weight', '')} |" for f in files
    )
    mmproj = f" --mmproj {projector}" if projector else ""
    draft = f" --model-draft {drafter} --spec-type draft-mtp" if drafter else ""
    return f"""# {name}: GGUF export

Made by `ft quantize`. Every file is listed with its SHA-256 in `manifest.json`.

## Ollama

```bash
ollama create {name} -f Modelfile
ollama run {name}
```

`Modelfile` uses `{model}`; edit its first `FROM` line to pick another quantization.

## llama.cpp

```bash
llama-server -m {model}{mmproj}{draft} --jinja
```

## Files

| file | kind | size | bits per weight |
|---|---|---|---|
{table}
"""
