"""Ranked comparisons as arrays and batches: what the reward model and DPO train on.

A ranking record is {prompt, responses[K], ranks[K], labeler_id?} (0 = best, equal ranks are
ties). ``encode_rankings`` turns records into (N, K, T) token arrays; ``PackedRankingBatcher``
packs a batch's responses side by side behind one copy of their prompt (branch attention),
``RankingBatcher`` pads them (bucketed by K) and ``expand_pairs`` is the shuffled-pairs
ablation's layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from instructrl.data import lm as lm_data
from instructrl.data import sources
from instructrl.tokenizer import Tokenizer

GROUPS = {"train": 0, "heldout": 1}  # labeler groups of ranking rows (``encode_rankings``)


def encode_rankings(
    tokenizer: Tokenizer,
    rankings: Sequence[dict],
    seq_len: int,
    template: str = "{prompt}\n\n",
    max_responses: int = 9,
    skip_too_long: bool = False,
    heldout_labelers: Sequence[str] = (),
    source: str = "rankings",
) -> tuple[dict[str, np.ndarray], int]:
    """Rankings -> arrays; returns (arrays, number skipped).

    rankings: [{prompt, responses[K], ranks[K], labeler_id?}], K from 2 to ``max_responses``.
    arrays: tokens (N, K, T) int32 right-padded prompt + response + EOS; last (N, K) index of
    the last real token; prompt (N, K) int32, the prompt's tokens in each row (responses with
    the same prompt tokens share one copy of them in ``PackedRankingBatcher``); ranks (N, K)
    int32; mask (N, K) bool; group (N,) int32 (0 training labelers, 1 held-out labelers,
    from ``heldout_labelers``).
    A response that cannot fit beside one prompt token raises (or is dropped and the prompt
    skipped when it leaves fewer than 2 responses, with ``skip_too_long``).
    """
    heldout = set(heldout_labelers)
    rows, skipped = [], 0
    for index, r in enumerate(rankings):
        responses, ranks = list(r["responses"]), list(r["ranks"])
        if len(responses) != len(ranks):
            raise lm_data.DataError(
                f"{source}: record {index + 1}: {len(responses)} responses but {len(ranks)} ranks"
            )
        if len(responses) > max_responses:
            raise lm_data.DataError(
                f"{source}: record {index + 1}: {len(responses)} responses exceed "
                f"rm.max_responses={max_responses}"
            )
        encoded, kept_ranks = [], []
        for response, rank in zip(responses, ranks, strict=True):
            e = lm_data.encode_demonstration(
                tokenizer, r["prompt"], response, seq_len - 1, template
            )
            if e is None:
                if not skip_too_long:
                    raise lm_data.DataError(
                        f"{source}: record {index + 1}: field 'responses' has a response that "
                        f"does not fit in seq_len={seq_len} (set data.skip_too_long=True)"
                    )
                continue
            encoded.append((e[0], len(e[1]) - sum(e[1])))  # ids, prompt tokens
            kept_ranks.append(int(rank))
        if len(encoded) < 2:
            skipped += 1
            continue
        group = GROUPS["heldout"] if r.get("labeler_id") in heldout else GROUPS["train"]
        rows.append((encoded, kept_ranks, group))
    n = len(rows)
    if n == 0:
        raise lm_data.DataError(f"{source}: no usable rankings")
    tokens = np.full((n, max_responses, seq_len), tokenizer.pad_id, np.int32)
    last = np.zeros((n, max_responses), np.int32)
    prompt = np.zeros((n, max_responses), np.int32)
    ranks_arr = np.zeros((n, max_responses), np.int32)
    mask = np.zeros((n, max_responses), bool)
    group = np.zeros((n,), np.int32)
    for i, (encoded, rks, g) in enumerate(rows):
        for k, ((ids, prompt_len), rank) in enumerate(zip(encoded, rks, strict=True)):
            tokens[i, k, : len(ids)] = ids
            last[i, k] = len(ids) - 1
            prompt[i, k] = prompt_len
            ranks_arr[i, k] = rank
            mask[i, k] = True
        group[i] = g
    arrays = {"tokens": tokens, "last": last, "prompt": prompt, "ranks": ranks_arr,
              "mask": mask, "group": group}  # fmt: skip
    return arrays, skipped


def expand_pairs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every ordered pair as its own element with K = 2 (the shuffled-pairs ablation)."""
    out = {k: [] for k in arrays}
    for i in range(len(arrays["tokens"])):
        m, r = arrays["mask"][i], arrays["ranks"][i]
        for a in range(len(m)):
            for b in range(len(m)):
                if m[a] and m[b] and r[a] < r[b]:
                    sel = [a, b]
                    for key in ("tokens", "last", "prompt"):
                        if key in arrays:
                            out[key].append(arrays[key][i, sel])
                    out["ranks"].append(np.array([0, 1], np.int32))
                    out["mask"].append(np.array([True, True]))
                    out["group"].append(arrays["group"][i])
    return {k: np.stack(v) for k, v in out.items()}


class RankingBatcher(lm_data.EpochBatcher):
    """Epoch batches of rankings bucketed by K: each epoch's shuffled rows are grouped by their
    number of responses, cut into batches, and the batches shuffled; each batch keeps only as
    many response slots as its largest ranking has. A K = 2 pair then costs 2 sequences, not
    ``max_responses`` (the recipe mixes HH-RLHF pairs with OpenAssistant rankings of up to 9).
    Still a pure function of (seed, step); the slot count comes from the global batch, so every
    host trims alike. One compiled step per distinct K.
    """

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        # Like EpochBatcher, each epoch leaves out a different random remainder.
        rows = rng.permutation(self.size)[: self.steps_per_epoch * self.batch_size]
        rows = rows[np.argsort(self.arrays["mask"][rows].sum(1), kind="stable")]
        batches = rows.reshape(self.steps_per_epoch, self.batch_size)
        return batches[rng.permutation(self.steps_per_epoch)].reshape(-1)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.global_rows(step)
        k = int(self.arrays["mask"][rows].sum(1).max())
        rows = rows[self.host_rows]
        return {name: v[rows][:, :k] if v.ndim >= 2 else v[rows] for name, v in self.arrays.items()}


class PackedRankingBatcher(lm_data.EpochBatcher):
    """Epoch batches of rankings packed into rows: each ranking's responses follow one copy of
    their prompt (``share_prompt``; branch ids 0 on the prompt, k on response k), so a prompt
    is computed once for its K responses instead of K times, and each response attends to
    its prompt and itself only, its positions continuing the prompt's: every reward equals
    the padded layout's (prompt + response alone) while the step computes about the tokens
    the batch really has (the default pipeline's 6.5 responses of ~30 tokens per ~36-token
    prompt: 46% fewer tokens than one prompt copy per response, which itself is 11% of the
    padded 160 slots). A ranking whose prompt and responses do not fit one row of
    ``row_len`` tokens continues in another row behind another copy of its prompt. Pieces
    are placed first-fit by decreasing length.

    The rows are split over ``shards`` devices (the mesh's batch axes): each shard packs its
    own B / shards rankings, every shard padded to the row count the fullest one needs,
    rounded up to a multiple of 8 / shards (few shapes compile). So the global batch is the
    same whether one process feeds it or many (each host builds its own shards' rows).

    batch(step): tokens, positions, segment_ids, branch_ids (R, row_len) of this host;
    index (B, K) of each response's last token in the flattened (R * row_len) rows of the
    global batch, first (B, K) of its first token (after its prompt); ranks, mask (B, K).
    With ``response_tokens`` N > 0 (a policy's log-probs of each response, DPO) also:
    targets (B, K, N) the response's tokens (after the prompt, through EOS), before (B, K, N)
    the flat global position of the state that predicts each (a response's first token: its
    prompt copy's last position), target_mask (B, K, N).
    """

    def __init__(self, arrays, batch_size, seed, host_rows=None, shards: int = 1,
                 row_len: int | None = None, share_prompt: bool = True,
                 response_tokens: int = 0):  # fmt: skip
        super().__init__(arrays, batch_size, seed, host_rows)
        if batch_size % shards:
            raise ValueError(f"rm: batch size {batch_size} is not split evenly over {shards}")
        self.shards = shards
        self.row_len = max(int(row_len or 0), arrays["tokens"].shape[-1])
        self.share_prompt = share_prompt and "prompt" in arrays
        self.response_tokens = int(response_tokens)
        if self.response_tokens:
            longest = int(response_lengths(arrays).max())
            if longest > self.response_tokens:
                raise ValueError(
                    f"a response of {longest} tokens exceeds response_tokens={self.response_tokens}"
                )

    def _pieces(self, rows: np.ndarray) -> list[tuple[int, int, list[int], int]]:
        """(ranking row, prompt tokens, its responses, tokens) of every piece: one copy of a
        prompt and the responses that follow it (responses share a prompt when their prompt
        tokens are equal; without ``share_prompt`` every response is its own piece)."""
        tokens, last, mask = self.arrays["tokens"], self.arrays["last"], self.arrays["mask"]
        pieces = []
        for i, row in enumerate(rows):
            groups: dict[tuple, list[int]] = {}
            for k in np.flatnonzero(mask[row]):
                if self.share_prompt:
                    p = int(self.arrays["prompt"][row, k])
                    groups.setdefault(tuple(tokens[row, k, :p]), []).append(int(k))
                else:  # each response its own piece, its prompt in it
                    groups[(int(k),)] = [int(k)]
            for prefix, members in groups.items():
                p = len(prefix) if self.share_prompt else 0
                current, length = [], p
                for k in members:
                    n = int(last[row, k]) + 1 - p  # the response's own tokens
                    if current and length + n > self.row_len:
                        pieces.append((i, p, current, length))
                        current, length = [], p
                    current.append(k)
                    length += n
                pieces.append((i, p, current, length))
        return pieces

    def _pack(self, rows: np.ndarray) -> list[list[tuple[int, int, list[int], int]]]:
        """The pieces of each packed row, first fit by decreasing length."""
        pieces = sorted(self._pieces(rows), key=lambda piece: (-piece[3], piece[0], piece[2]))
        packed, room = [], []
        for piece in pieces:
            slot = next((r for r, free in enumerate(room) if free >= piece[3]), None)
            if slot is None:
                packed.append([]), room.append(self.row_len)
                slot = len(packed) - 1
            packed[slot].append(piece)
            room[slot] -= piece[3]
        return packed

    def batch(self, step: int) -> dict[str, np.ndarray]:
        all_rows = self.global_rows(step)
        per_shard = self.batch_size // self.shards
        shards = [all_rows[s : s + per_shard] for s in range(0, self.batch_size, per_shard)]
        packings = [self._pack(r) for r in shards]
        m = max(8 // self.shards, 1)
        num_rows = -(-max(len(p) for p in packings) // m) * m  # per shard
        first = self.host_rows.start // per_shard  # this host's shards
        mine = range(first, self.host_rows.stop // per_shard)
        rows = np.concatenate([shards[s] for s in mine])
        t = self.row_len
        keys = ("tokens", "positions", "segment_ids", "branch_ids")
        out = {key: np.zeros((num_rows * len(mine), t), np.int32) for key in keys}
        tokens, last = self.arrays["tokens"], self.arrays["last"]
        index = np.zeros((len(rows), tokens.shape[1]), np.int32)
        starts = np.zeros_like(index)  # each response's first token
        n_max = self.response_tokens
        if n_max:
            for key, dtype in (("before", np.int32), ("targets", np.int32), ("target_mask", bool)):
                out[key] = np.zeros((len(rows), tokens.shape[1], n_max), dtype)
        at_rows = [(local, local * num_rows + r, pieces) for local, s in enumerate(mine)
                   for r, pieces in enumerate(packings[s])]  # fmt: skip
        for local, r, pieces in at_rows:
            at = 0
            base = (first * num_rows + r) * t  # this row's first flat, global position
            for segment, (j, p, members, length) in enumerate(pieces, start=1):
                i = local * per_shard + j  # this host's ranking row
                out["tokens"][r, at : at + p] = tokens[rows[i], members[0], :p]
                out["positions"][r, at : at + p] = np.arange(p)
                out["segment_ids"][r, at : at + length] = segment
                at_response = at + p
                for branch, k in enumerate(members, start=1):
                    n = int(last[rows[i], k]) + 1 - p
                    span = slice(at_response, at_response + n)
                    out["tokens"][r, span] = tokens[rows[i], k, p : p + n]
                    out["positions"][r, span] = np.arange(p, p + n)
                    out["branch_ids"][r, span] = branch
                    index[i, k] = base + at_response + n - 1
                    # Sequence position s (prompt + response) sits at at + s in the shared
                    # prompt (s < p), else at at_response + s - p in this branch.
                    start = int(self.arrays["prompt"][rows[i], k])
                    starts[i, k] = base + at_response + start - p
                    if n_max:
                        s = np.arange(start, p + n)
                        prev = s - 1
                        flat = np.where(prev < p, at + prev, at_response + prev - p)
                        out["before"][i, k, : len(s)] = base + flat
                        out["targets"][i, k, : len(s)] = tokens[rows[i], k, s]
                        out["target_mask"][i, k, : len(s)] = True
                    at_response += n
                at += length
        out.update(index=index, first=starts, ranks=self.arrays["ranks"][rows],
                   mask=self.arrays["mask"][rows])  # fmt: skip
        return out


def response_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(N, K) tokens of each response after its prompt, through EOS (0 for empty slots)."""
    return np.where(arrays["mask"], arrays["last"] + 1 - arrays["prompt"], 0)


def unseen_labelers(train_rankings: Sequence[dict], eval_rankings: Sequence[dict]) -> list[str]:
    """Labeler ids of ``eval_rankings`` that never ranked a training prompt: the held-out
    labelers of paper section 4.1. Empty unless every training ranking carries a labeler id."""
    train_ids = [r.get("labeler_id") for r in train_rankings]
    if not train_ids or None in train_ids:
        return []
    seen = set(train_ids)
    return sorted({r["labeler_id"] for r in eval_rankings if r.get("labeler_id")} - seen)


def load_rankings(path: str, config) -> tuple[list[dict], int]:
    """Rankings of one file, read through data.sources with ``config.data``'s format/flags."""
    return sources.read_rankings(
        path,
        format=config.data.get("format", "auto"),
        skip_invalid=bool(config.data.get("skip_invalid", False)),
    )


@dataclasses.dataclass
class Loaded:
    """What ``load_arrays`` read: the training and evaluation arrays, the training records,
    the held-out labelers' ids and the skipped records' counts."""

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    rankings: list[dict]
    heldout_labelers: list[str]
    invalid: int
    too_long: int


def load_arrays(config, tokenizer: Tokenizer, max_responses: int, rankings=None,
                eval_rankings=None) -> Loaded:  # fmt: skip
    """The training and evaluation arrays of a stage that learns from rankings (RM, DPO).

    Rankings come from ``config.data.path`` (held-out ones from ``config.data.eval_paths``, or
    ``data.eval_examples`` prompts split off) unless given directly as lists of records.
    The held-out labelers are ``data.heldout_labelers``, else the labelers of the eval
    rankings who ranked no training prompt (``unseen_labelers``).
    """
    data = config.data
    invalid = 0
    if rankings is None:
        rankings, invalid = load_rankings(data.path, config)
    eval_paths = list(data.get("eval_paths", []))
    if eval_rankings is None and eval_paths:
        eval_rankings = []
        for path in eval_paths:
            records, bad = load_rankings(path, config)
            eval_rankings, invalid = eval_rankings + records, invalid + bad
    heldout_labelers = list(data.get("heldout_labelers", []))
    if not heldout_labelers and eval_rankings is not None:
        heldout_labelers = unseen_labelers(rankings, eval_rankings)
    encode = functools.partial(
        encode_rankings,
        tokenizer,
        seq_len=int(data.seq_len),
        template=data.get("template", "{prompt}\n\n"),
        max_responses=max_responses,
        skip_too_long=bool(data.get("skip_too_long", False)),
        heldout_labelers=heldout_labelers,
    )
    arrays, too_long = encode(rankings, source=data.get("path") or "rankings")
    if eval_rankings is not None:
        train_arrays = arrays
        eval_arrays, eval_too_long = encode(eval_rankings, source="eval rankings")
        too_long += eval_too_long
    else:
        train_arrays, eval_arrays = lm_data.split(arrays, int(data.eval_examples), int(config.seed))
    return Loaded(train_arrays, eval_arrays, rankings, heldout_labelers, invalid, too_long)
