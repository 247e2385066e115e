"""Read the records of a data source, whatever its format: a local file, a saved `datasets` folder or a hub dataset.

Everything but JSON goes through `datasets` (its loaders and its cache): parquet, csv and arrow files, `save_to_disk`
folders, and hub ids with a subset and split. JSON and JSONL files are read here, line by line, because Arrow needs
one type per column: ft's own rows hold a message's content as a string in one row and a list of parts in the next,
which `datasets`' JSON loader refuses, and a bad line must be reported with its line number.

A hub dataset that is neither cached nor reachable fails at once, naming the id: with HF_HUB_OFFLINE=1 (or
HF_DATASETS_OFFLINE=1) `datasets` looks only in its cache, and an endpoint that does not answer a connection within
seconds is reported before `datasets` would wait out its retries.

    >>> records, base = read_records(Path("data/demo/train.jsonl"))
    >>> records[0].where, sorted(records[0].values)
    ('data/demo/train.jsonl:1', ['messages'])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import DataError
from ft.recipe import DataSource, HubDataset

TABLE_LOADERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}  # suffix -> datasets' packaged loader


@dataclass
class Record:
    """One row as the source holds it (None when unreadable), where it came from, and what is wrong with it."""

    values: dict[str, Any] | None
    where: str
    problems: list[str] = field(default_factory=list)


def _json_record(text: str, where: str) -> Record:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" themselves ("Invalid control character at").
        return Record(None, where, [f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"])
    if not isinstance(value, dict):
        return Record(None, where, ["a row must be a JSON object"])
    return Record(value, where)


def _read_json_lines(path: Path) -> list[Record]:
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                records.append(Record(None, where, [f"not UTF-8 text (byte {exc.start} of the line)"]))
                continue
            if line.strip():
                records.append(_json_record(line, where))
    return records


def _read_json_array(path: Path) -> list[Record]:
    """A .json file holding one array of row objects (as alpaca's and LLaMA-Factory's files do)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid JSON array ({exc})") from None
    if not isinstance(values, list):
        raise DataError(f"{path}: a .json file must hold an array of rows, or one JSON object a line")
    return [Record(v, f"{path}:row {i}") if isinstance(v, dict) else
            Record(None, f"{path}:row {i}", ["a row must be a JSON object"]) for i, v in enumerate(values)]


def _strip_nulls(value: Any) -> Any:
    """Arrow stores parts as structs with every field present; drop the empty ones."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _undecoded(table: Any) -> Any:
    """The table with its Image and Audio columns left as {bytes, path}: ft decodes media itself when it encodes."""
    import datasets

    for name, feature in table.features.items():
        inner = feature.feature if isinstance(feature, datasets.List) else feature
        if isinstance(inner, datasets.Image | datasets.Audio):
            undecoded = type(inner)(decode=False)
            table = table.cast_column(name, undecoded if inner is feature else datasets.List(undecoded))
    return table


def _table_records(table: Any, label: str) -> list[Record]:
    import datasets

    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"{label}: holds several splits ({', '.join(table)}); point ft at one of them")
    table = _undecoded(table)
    return [Record(_strip_nulls(values), f"{label}:row {i}") for i, values in enumerate(table)]


def _load_hub(source: HubDataset) -> Any:
    import datasets
    from huggingface_hub import constants

    from ft.models import hub_unreachable

    if not (constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE):
        unreachable = hub_unreachable()
        if unreachable:
            raise DataError(f"dataset '{source.hub}': the hub cannot be reached ({unreachable}); set "
                            "HF_HUB_OFFLINE=1 to use the copy in the datasets cache, if there is one")
    try:
        return datasets.load_dataset(source.hub, source.subset, split=source.split)
    except ConnectionError as exc:
        raise DataError(f"dataset '{source.hub}' is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                        f"and the hub is not used (offline mode): {exc}. Load it once on a connected machine, or "
                        "point ft at a local copy") from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataError(f"dataset '{source.hub}' (subset {source.subset}, split {source.split}): {exc}") from None


def read_records(source: DataSource) -> tuple[list[Record], Path]:
    """Every record of `source`, and the folder its relative media paths start from."""
    if isinstance(source, HubDataset):
        return _table_records(_load_hub(source), str(source)), Path.cwd()
    if not source.exists():
        raise DataError(f"data file not found: {source}")
    if source.is_dir():
        import datasets

        try:
            table = datasets.load_from_disk(str(source))
        except Exception as exc:  # datasets raises many types for unreadable input; all mean the same to a user
            raise DataError(f"{source}: cannot read as a datasets folder (save_to_disk): {exc}") from None
        return _table_records(table, str(source)), source
    if source.suffix == ".jsonl" or (source.suffix == ".json" and not _starts_array(source)):
        return _read_json_lines(source), source.parent
    if source.suffix == ".json":
        return _read_json_array(source), source.parent
    if source.suffix not in TABLE_LOADERS:
        raise DataError(f"{source}: unsupported data format '{source.suffix}' (use .jsonl, .json, .parquet, .csv, "
                        ".arrow, a datasets folder or a hub dataset id)")
    import datasets

    try:
        table = datasets.load_dataset(TABLE_LOADERS[source.suffix], data_files=str(source), split="train")
    except Exception as exc:  # as above: a user only needs to know the file could not be read, and why
        raise DataError(f"{source}: cannot read as a {source.suffix[1:]} file: {exc}") from None
    return _table_records(table, str(source)), source.parent


def _starts_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def count_records(source: DataSource) -> int | None:
    r"""How many rows a data source holds, read cheaply (a JSON file's lines, a parquet file's or a datasets
    folder's metadata), for a decision made before the rows load (`ft.resolve`); None where it cannot tell.

    >>> import tempfile
    >>> data = Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = data.write_text('{"messages": []}\n\n{"messages": []}\n')
    >>> count_records(data), count_records(data.with_name("missing.jsonl"))
    (2, None)
    """
    if isinstance(source, HubDataset):
        return None
    try:
        if source.is_dir():
            import datasets

            table = datasets.load_from_disk(str(source))
            return table.num_rows if isinstance(table, datasets.Dataset) else None
        if source.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(source).num_rows
        if source.suffix in (".jsonl", ".json") and not _starts_array(source):
            with source.open("rb") as f:
                return sum(1 for line in f if line.strip())
    except Exception:  # unreadable data is reported when the rows load, naming the file and line
        return None
    return None
