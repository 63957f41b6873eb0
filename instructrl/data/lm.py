"""Token arrays for every stage: demonstration and text rows, prompts, epoch batches.

Records come from ``data.sources`` (files, datasets); here they become fixed-length arrays:
next-token rows {inputs, targets, loss_mask} (B, T) (targets are inputs shifted by one),
left-padded prompts (B, P) with their mask, and deterministic epoch batches of any arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from instructrl.data import files, formats
from instructrl.data.errors import DataError
from instructrl.tokenizer import Tokenizer


def encode_demonstration(
    tokenizer: Tokenizer, prompt: str, response: str, seq_len: int, template: str
) -> tuple[list[int], list[int]] | None:
    """Token ids (length <= seq_len + 1) and a 0/1 mask of the response (+ EOS) tokens, the
    prompt in ``template`` (``formats.encode`` of a ``PlainFormat``); None when the response
    does not fit beside one prompt token: it is never silently cut."""
    example = {"prompt": prompt, "response": response}
    return formats.encode(tokenizer, formats.PlainFormat(template), example, seq_len + 1)


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


def text_split(tokenizer: Tokenizer, paths: Sequence[str], seq_len: int, eval_rows: int, seed: int):
    """(train, held-out) text rows of the files ``paths`` (``text_arrays``), ``eval_rows``
    held out."""
    arrays = text_arrays(tokenizer, files.read_text(list(paths)), seq_len)
    return split(arrays, eval_rows, seed)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """(tokens, mask) int32 arrays (B, P) with each sequence right-aligned (cut from the left)."""
    length = length or max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        tokens[i, length - len(seq) :] = seq
        mask[i, length - len(seq) :] = 1
    return tokens, mask


def bucket_length(n: int, smallest: int = 32) -> int:
    """``n`` rounded up to a few lengths that grow geometrically: multiples of ``smallest`` up
    to 4x it, then 1.5x / 2x steps (32, 64, 96, 128, 192, 256, 384, 512, 768, ...), so that
    inputs of every length compile a handful of shapes and pad at most a third."""
    size = smallest
    while size < n:
        if size < 4 * smallest:
            size += smallest
        else:
            half = 1 << (size.bit_length() - 1)  # the power of two at or below size
            size = half * 3 // 2 if size == half else 2 * half
    return size


def encode_prompts(tokenizer: Tokenizer, records: Sequence[dict], template: str, length: int):
    """Left-padded (B, length) prompt tokens and mask of records {prompt} in ``template``."""
    ids = [tokenizer.encode(template.format(prompt=r["prompt"])) for r in records]
    return left_pad(ids, tokenizer.pad_id, length)


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
