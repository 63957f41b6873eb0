"""Minimal, real data for language-model stages: demonstrations and plain text.

Demonstrations come from local JSON / JSONL files (or a saved HF dataset directory) through
Hugging Face ``datasets``, in two schemas: ``{prompt, response}`` and Alpaca's
``{instruction, input, output}``. Plain text comes from local text files. Examples become fixed
length rows {inputs, targets, loss_mask} (B, T), targets being inputs shifted by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from instructrl.tokenizer import Tokenizer


class DataError(ValueError):
    """Bad input: the message names the file, the record (line) and the field."""


def _read_records(path: str) -> list[tuple[str, dict]]:
    """(where, record) pairs of a JSON list, a JSONL file or a saved HF dataset directory;
    ``where`` names the file and the line (JSONL) or record number (JSON list, dataset)."""
    if os.path.isdir(path):
        import datasets

        return [(f"{path}: record {i + 1}", r) for i, r in enumerate(datasets.load_from_disk(path))]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        f.seek(0)
        if head == "[":
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
            return [(f"{path}: record {i + 1}", r) for i, r in enumerate(records)]
        records = []
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from e
        return records


def _field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def load_demonstrations(path: str, skip_invalid: bool = False) -> tuple[list[dict], int]:
    """([{prompt, response}], number skipped) from {prompt, response} or Alpaca
    {instruction, input, output} records.

    Alpaca prompts are the instruction, then the input (when non-empty) after a blank line.
    A bad record (missing or mistyped field, empty response) raises a DataError naming the file,
    the line or record and the field; with ``skip_invalid`` it is skipped and counted instead.
    """
    out, skipped = [], 0
    for where, record in _read_records(path):
        try:
            out.append(_demonstration(record, where))
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    return out, skipped


def _demonstration(record, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if "instruction" in record:
        prompt = _field(record, "instruction", where)
        extra = record.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        response = _field(record, "output", where)
    else:
        prompt = _field(record, "prompt", where)
        response = _field(record, "response", where)
    if not response.strip():
        field = "output" if "instruction" in record else "response"
        raise DataError(f"{where}: field {field!r} is empty")
    return {"prompt": prompt, "response": response}


def encode_demonstration(
    tokenizer: Tokenizer, prompt: str, response: str, seq_len: int, template: str
) -> tuple[list[int], list[int]] | None:
    """Token ids (length <= seq_len + 1) and a 0/1 mask of the response (+ EOS) tokens.

    The prompt is truncated from the left if needed; a response (with its EOS) that does not fit
    with at least one prompt token returns None: it is never silently cut.
    """
    prompt_ids = tokenizer.encode(template.format(prompt=prompt))
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    room = seq_len + 1 - len(response_ids)
    if room < 1:
        return None
    prompt_ids = prompt_ids[-room:]
    ids = prompt_ids + response_ids
    return ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def demonstration_arrays(
    tokenizer: Tokenizer,
    examples: Sequence[dict[str, str]],
    seq_len: int,
    template: str = "{prompt}\n\n",
    skip_too_long: bool = False,
    source: str = "demonstrations",
) -> tuple[dict[str, np.ndarray], int]:
    """Rows {inputs, targets, loss_mask} (N, seq_len); the loss covers response tokens only.

    Returns (arrays, number of skipped examples). An over-long response raises unless
    ``skip_too_long`` is set, in which case it is counted.
    """
    rows, skipped = [], 0
    for index, ex in enumerate(examples):
        encoded = encode_demonstration(tokenizer, ex["prompt"], ex["response"], seq_len, template)
        if encoded is None:
            if not skip_too_long:
                raise DataError(
                    f"{source}: record {index + 1}: field 'response' does not fit in "
                    f"seq_len={seq_len} tokens (set data.skip_too_long=True to skip such records)"
                )
            skipped += 1
            continue
        rows.append(encoded)
    return _pad_rows(rows, seq_len, tokenizer.pad_id), skipped


def _pad_rows(rows, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(rows)
    tokens = np.full((n, seq_len + 1), pad_id, np.int32)
    mask = np.zeros((n, seq_len + 1), np.int32)
    for i, (ids, m) in enumerate(rows):
        tokens[i, : len(ids)] = ids
        mask[i, : len(m)] = m
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask[:, 1:]}


def read_text_files(paths: Iterable[str]) -> list[str]:
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file not found: {path}")
        with open(path, encoding="utf-8") as f:
            out.append(f.read())
    return out


def text_arrays(
    tokenizer: Tokenizer, documents: Iterable[str], seq_len: int
) -> dict[str, np.ndarray]:
    """Documents joined with EOS into one stream, cut into rows of seq_len + 1 tokens.

    Every token is a target (pretraining). The tail shorter than one row is dropped.
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer.encode(doc))
        stream.append(tokenizer.eos_id)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DataError(f"text: {len(stream)} tokens do not fill one row of {seq_len + 1}")
    ids = np.asarray(stream[: n * seq_len + 1], np.int32)
    rows = np.stack([ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "loss_mask": np.ones((n, seq_len), np.int32),
    }


def split(arrays: dict[str, np.ndarray], eval_count: int, seed: int):
    """A deterministic (train, eval) split of rows."""
    n = len(next(iter(arrays.values())))
    if not 0 <= eval_count < n:
        raise DataError(f"data.eval_examples={eval_count} must be in [0, {n})")
    order = np.random.default_rng(seed).permutation(n)
    ev, tr = order[:eval_count], order[eval_count:]
    return {k: v[tr] for k, v in arrays.items()}, {k: v[ev] for k, v in arrays.items()}


class EpochBatcher:
    """Global batches by step: epoch ``e`` visits the rows in a seed-and-epoch permutation.

    ``batch(step)`` is a pure function of (seed, step), so the iterator state is the step, which
    every checkpoint already holds: a resumed run sees exactly the batches it would have seen.
    Each process returns only its rows of the global batch (``host_rows``).
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, host_rows=None):
        self.arrays = arrays
        self.size = len(next(iter(arrays.values())))
        if self.size < batch_size:
            raise DataError(f"{self.size} examples cannot fill one batch of {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = self.size // batch_size
        self.host_rows = host_rows or slice(0, batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's row order: batch i is rows [i * batch_size, (i + 1) * batch_size)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def global_rows(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.global_rows(step)[self.host_rows]
        return {k: v[rows] for k, v in self.arrays.items()}
