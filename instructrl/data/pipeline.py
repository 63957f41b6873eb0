"""The input pipeline of the language-model stages, on Grain: examples -> host batches.

examples (token arrays, ``encode_demonstrations`` / ``text_examples``)
  -> rows: one example each, or several packed into ``seq_len`` tokens (``pack_rows``)
  -> ``grain.MapDataset.source(rows).shuffle(seed)``: a permutation per epoch (Grain folds the
     epoch into the seed), indexed past the end for later epochs, so no epoch drops a remainder
  -> global batch ``s`` is rows [s * B, (s + 1) * B) of that sequence; process p of P reads its
     slice [p * B / P, (p + 1) * B / P) of it (``jax.process_index()``/``process_count()``),
     so P hosts together feed exactly the batch one host would, and their rows are disjoint
  -> a host batch: {inputs, targets, loss_mask} (B / P, L) int32, padded to the smallest of a
     few length buckets L; packed rows add segment_ids (1.., 0 on padding) and per-segment
     positions, which the model turns into a block-diagonal causal mask.

Batches are a pure function of (seed, step): ``batch(step)`` is random access, and the Grain
iterator state (``{"next_index": step}``) is exactly the training step that every checkpoint
holds; a resumed run reads the same batches as an uninterrupted one, also on a different number
of hosts. ``iterate`` prefetches host batches on background threads.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import grain
import jax
import numpy as np

from instructrl.data import formats
from instructrl.data.errors import DataError

KEYS = ("inputs", "targets", "loss_mask")


# --------------------------------------------------------------------------- examples


class Examples:
    """Variable-length next-token examples in flat arrays: example i is
    ``{k: self.flat[k][self.starts[i] : self.starts[i] + self.lengths[i]]}``."""

    def __init__(self, examples: Sequence[dict[str, np.ndarray]]):
        self.lengths = np.asarray([len(e["inputs"]) for e in examples], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.flat = {
            k: (
                np.concatenate([e[k] for e in examples]).astype(np.int32)
                if examples
                else np.zeros((0,), np.int32)
            )
            for k in KEYS
        }

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        a, n = self.starts[i], self.lengths[i]
        return {k: v[a : a + n] for k, v in self.flat.items()}

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples([self[i] for i in indices])


def encode_demonstrations(
    tokenizer,
    fmt,
    demonstrations: Sequence[dict],
    seq_len: int,
    skip_too_long: bool = False,
    source: str = "demonstrations",
) -> tuple[Examples, int]:
    """(Examples of at most seq_len tokens, number skipped as too long).

    The loss covers the response (+ EOS). A response that does not fit raises a DataError
    naming the record and the field, or is counted with ``skip_too_long``."""
    out, too_long = [], 0
    for index, ex in enumerate(demonstrations):
        encoded = formats.encode(tokenizer, fmt, ex, seq_len + 1)
        if encoded is None:
            if not skip_too_long:
                raise DataError(
                    f"{source}: record {index + 1}: field 'response' does not fit in "
                    f"seq_len={seq_len} tokens (set data.skip_too_long=True to skip such records)"
                )
            too_long += 1
            continue
        out.append(formats.shifted(*encoded))
    return Examples(out), too_long


def text_examples(tokenizer, documents: Iterable[str], seq_len: int) -> Examples:
    """Pretraining examples: each document + EOS, cut into chunks of seq_len + 1 tokens that
    overlap by one, so that every token after a document's first is a target exactly once.
    Chunks never span two documents (pack them to fill rows)."""
    out = []
    for doc in documents:
        ids = tokenizer.encode(doc) + [tokenizer.eos_id]
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            chunk = ids[start : start + seq_len + 1]
            out.append(formats.shifted(chunk, [1] * len(chunk)))
    return Examples(out)


# --------------------------------------------------------------------------- packing


def pack_rows(lengths: Sequence[int], seq_len: int, seed: int, open_rows: int = 8) -> list:
    """Rows of example indices, each row's lengths summing to at most seq_len.

    Examples are visited in a seeded random order and placed by first fit among the last
    ``open_rows`` rows (the fullest is closed when a new one opens): O(N * open_rows), and
    within a few percent of the tokens-per-row of a global first-fit-decreasing on SFT data.
    Packing happens once; the rows are then shuffled every epoch.
    """
    order = np.random.default_rng([seed, 0x9ACC]).permutation(len(lengths))
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens of the open rows, parallel to ``open_ids``
    open_ids: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len={seq_len}")
        for slot, free in enumerate(room):
            if free >= n:
                rows[open_ids[slot]].append(i)
                room[slot] -= n
                break
        else:
            if len(open_ids) == open_rows:
                fullest = int(np.argmin(room))
                del room[fullest], open_ids[fullest]
            rows.append([i])
            open_ids.append(len(rows) - 1)
            room.append(seq_len - n)
    return rows


# --------------------------------------------------------------------------- batches


class LMPipeline:
    """Host batches of next-token rows; ``batch(step)`` is a pure function of (seed, step).

    Args:
      examples: ``Examples`` (each at most seq_len tokens).
      batch_size: the global batch size B (rows); every host yields B / P rows.
      seq_len: the row length T (packing capacity and the largest length bucket).
      seed: shuffling seed; epoch e uses Grain's (seed + e) permutation of the rows.
      packing: pack several examples per row, with segment_ids and positions.
      pack_batches: each batch holds the B examples it would hold unpacked, packed into as
        few rows of T as first fit gives: the same examples, the same per-token loss, about the
        tokens they really have. The batch's rows are split over ``shards`` devices (the
        mesh's batch axes); each shard's B / shards examples are packed into its own rows,
        every shard padded to one row count (B / 4, B / 2 or B per shard: three shapes
        compile), so the global batch is the same whether one process feeds it or many.
      shards: the devices the rows are split over (``sharding.batch_shards``); a multiple of
        the host count.
      length_buckets: pad unpacked batches to the smallest bucket that holds their longest
        row (few shapes, few compilations); empty: always T.
      pad_id: the tokenizer's padding id.
      process_index, process_count: this host and the number of hosts (default: jax's).
      prefetch_threads, prefetch: Grain ReadOptions of ``iterate``.
    """

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        seq_len: int,
        seed: int,
        packing: bool = False,
        length_buckets: Sequence[int] = (),
        pack_batches: bool = False,
        shards: int = 1,
        pad_id: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch_threads: int = 1,
        prefetch: int = 4,
    ):
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} not divisible by {process_count} hosts")
        self.examples, self.seq_len, self.seed = examples, int(seq_len), int(seed)
        self.packing, self.pad_id = bool(packing), int(pad_id)
        self.pack_batches = bool(pack_batches) and not self.packing
        self.shards = int(shards)
        if self.pack_batches and (batch_size % self.shards or self.shards % process_count):
            raise ValueError(
                f"pack_batches: batch size {batch_size} over {self.shards} shards on "
                f"{process_count} hosts: each must divide the one before"
            )
        self.buckets = sorted({int(b) for b in length_buckets if int(b) < seq_len} | {seq_len})
        if packing:
            rows = pack_rows(examples.lengths, seq_len, seed)
        else:
            if len(examples) and examples.lengths.max() > seq_len:
                raise ValueError(f"an example is longer than seq_len={seq_len}")
            rows = [[i] for i in range(len(examples))]
        if len(rows) < batch_size:
            raise DataError(f"{len(rows)} rows cannot fill one batch of {batch_size}")
        self.num_rows = len(rows)
        self.batch_size = batch_size
        self.per_host = batch_size // process_count
        self.host_offset = process_index * self.per_host
        self.process_count = process_count
        self.rows = grain.MapDataset.source(rows).shuffle(seed=self.seed)
        self.dataset = grain.MapDataset.range(sys.maxsize).map(self.batch)
        self.read_options = grain.ReadOptions(
            num_threads=prefetch_threads, prefetch_buffer_size=prefetch
        )
        self._iterator, self._next_step = None, None

    # The run-info fields of the stages.
    @property
    def size(self) -> int:
        return len(self.examples)

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows / self.batch_size

    def row_indices(self, step: int) -> list[list[int]]:
        """The example indices of this host's rows of global batch ``step``."""
        first = step * self.batch_size + self.host_offset
        return [self.rows[first + j] for j in range(self.per_host)]

    def _packed_rows(self, step: int) -> list[list[int]]:
        """This host's examples of batch ``step`` packed into rows (``pack_batches``): each of
        its shards' examples first fit into that shard's rows, every shard padded to the row
        count the fullest shard of the batch needs."""
        lengths = self.examples.lengths
        per_shard = self.batch_size // self.shards
        packs = []
        for shard in range(self.shards):
            first = step * self.batch_size + shard * per_shard
            examples = [i for j in range(per_shard) for i in self.rows[first + j]]
            rows, room = [], []
            for i in sorted(examples, key=lambda i: (-int(lengths[i]), i)):
                slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
                if slot is None:
                    rows.append([]), room.append(self.seq_len)
                    slot = len(rows) - 1
                rows[slot].append(i)
                room[slot] -= int(lengths[i])
            packs.append(rows)
        most = max(len(rows) for rows in packs)
        count = next(c for c in self._row_counts() if c >= most)
        first = self.host_offset // per_shard
        mine = packs[first : first + self.per_host // per_shard]
        return [row for rows in mine for row in rows + [[] for _ in range(count - len(rows))]]

    def _row_counts(self) -> list[int]:
        """B / 4, B / 2 and B rows per shard (at least one)."""
        per_shard = self.batch_size // self.shards
        return sorted({max(per_shard // d, 1) for d in (4, 2, 1)})

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``step`` (random access, no iterator state)."""
        rows = self._packed_rows(step) if self.pack_batches else self.row_indices(step)
        lengths = [int(self.examples.lengths[r].sum()) for r in rows]
        packed = self.packing or self.pack_batches
        width = self.seq_len if packed else next(b for b in self.buckets if b >= max(lengths))
        out = {k: np.full((len(rows), width), self.pad_id, np.int32) for k in ("inputs", "targets")}
        out["loss_mask"] = np.zeros((len(rows), width), np.int32)
        if packed:
            out["segment_ids"] = np.zeros((len(rows), width), np.int32)
            out["positions"] = np.zeros((len(rows), width), np.int32)
        flat, starts, sizes = self.examples.flat, self.examples.starts, self.examples.lengths
        for r, row in enumerate(rows):
            at = 0
            for segment, i in enumerate(row, start=1):
                a, n = starts[i], sizes[i]
                for k in KEYS:
                    out[k][r, at : at + n] = flat[k][a : a + n]
                if packed:
                    out["segment_ids"][r, at : at + n] = segment
                    out["positions"][r, at : at + n] = np.arange(n)
                at += n
        return out

    def iterate(self, start_step: int = 0):
        """A Grain iterator of host batches from ``start_step``, prefetched on threads; its
        ``get_state()`` is ``{"next_index": next step}`` and ``set_state`` resumes there."""
        iterator = self.dataset.to_iter_dataset(self.read_options).__iter__()
        iterator.set_state({"next_index": int(start_step)})
        return iterator

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """``batch(step)`` through a prefetching iterator when steps come in order."""
        if self._next_step != step:
            self._iterator, self._next_step = self.iterate(step), step
        self._next_step += 1
        return next(self._iterator)


class PrefetchedBatcher:
    """The ``batcher`` interface of ``train.fit`` (``batch(step)``) over an ``LMPipeline``,
    reading consecutive steps through its prefetching Grain iterator."""

    def __init__(self, pipeline: LMPipeline):
        self.pipeline = pipeline
        self.size = pipeline.size
        self.steps_per_epoch = pipeline.steps_per_epoch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.pipeline(step)


def padded_arrays(examples: Examples, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """All examples as unpacked rows (N, seq_len): held-out sets for evaluators."""
    n = len(examples)
    out = {k: np.full((n, seq_len), pad_id, np.int32) for k in ("inputs", "targets")}
    out["loss_mask"] = np.zeros((n, seq_len), np.int32)
    for i in range(n):
        ex = examples[i]
        for k in KEYS:
            out[k][i, : len(ex[k])] = ex[k]
    return out


def split(items: Sequence, eval_count: int, seed: int) -> tuple[list, list]:
    """A deterministic (train, eval) split of a list."""
    if not 0 <= eval_count < len(items):
        raise DataError(f"data.eval_examples={eval_count} must be in [0, {len(items)})")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[eval_count:]], [items[i] for i in order[:eval_count]]
