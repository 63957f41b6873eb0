"""File backends of ``data.sources``: every record of a file (or dataset) with its location.

JSON lists, JSONL, either gzipped, Parquet, Arrow/Feather and CSV files through Hugging Face
``datasets`` (or the standard library for JSON), a directory written by
``Dataset.save_to_disk`` (``load_from_disk``), ``hf:<name>[:<split>]`` (the hub, only when a
user names it) and ``tfds:<name>[:<split>]`` (a prepared TFDS dataset in ``data_dir``).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator

from instructrl import fs
from instructrl.data.errors import DataError

Record = tuple[str, object]  # (where: "file:line" or "file: record n", the decoded record)


def read_records(path: str, split: str | None = None, data_dir: str | None = None):
    """Yield (where, record) for every record of ``path`` (see the module docstring)."""
    if path.startswith("hf:"):
        return _hf_hub(path[3:], split)
    if path.startswith("tfds:"):
        return _tfds(path[5:], split, data_dir)
    if fs.isdir(path):
        return _hf_dataset(path, _load_from_disk(path, split))
    if not fs.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".parquet", ".arrow", ".feather", ".csv")):
        return _hf_dataset(path, _load_files(path))
    return json_records(path)


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(fs.open(path, "rb"), "rt", encoding="utf-8")
    return fs.open(path)


def json_records(path: str) -> Iterator[Record]:
    with _open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
            for i, r in enumerate(records):
                yield f"{path}: record {i + 1}", r
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                # Carries the location; the reader decides whether to skip it.
                record = DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})")
            yield f"{path}:{lineno}", record


def _load_from_disk(path: str, split: str | None):
    import datasets  # heavy (pyarrow): only for the file kinds that need it

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
    return ds


def _load_files(path: str):
    import datasets  # heavy (pyarrow): only for the file kinds that need it

    name = path[:-3] if path.endswith(".gz") else path
    builder = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".csv": "csv"}
    kind = builder[os.path.splitext(name)[1]]
    return datasets.load_dataset(kind, data_files=path, split="train")


def _hf_dataset(path: str, ds) -> Iterator[Record]:
    for i, r in enumerate(ds):
        yield f"{path}: record {i + 1}", r


def _hf_hub(spec: str, split: str | None) -> Iterator[Record]:
    import datasets  # heavy (pyarrow): only for the file kinds that need it

    name, _, spec_split = spec.partition(":")
    yield from _hf_dataset(f"hf:{name}", datasets.load_dataset(name, split=spec_split or split))


def _tfds(spec: str, split: str | None, data_dir: str | None) -> Iterator[Record]:
    """A prepared TFDS dataset (never downloaded); byte strings are decoded as UTF-8."""
    import tensorflow_datasets as tfds  # optional: only for tfds: sources

    name, _, spec_split = spec.partition(":")
    split = spec_split or split or "train"
    builder = tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
        yield f"tfds:{name}[{split}]: record {i + 1}", _decode_bytes(source[i])


def _decode_bytes(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_decode_bytes(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _decode_bytes(value.tolist())
    return value


def read_text(paths) -> list[str]:
    """The contents of plain text files (gzip when the name ends in .gz)."""
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        if not fs.isfile(path):
            raise FileNotFoundError(f"text file not found: {path}")
        with _open_text(path) as f:
            out.append(f.read())
    return out
