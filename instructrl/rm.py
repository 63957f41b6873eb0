"""Reward model stage (paper step 2): K-way rankings, all C(K,2) pairs in one batch element.

The RM is the SFT transformer with the LM head replaced by a scalar head, initialized from the
SFT params (``init_from``). The reward of (prompt, response) is the scalar at the response's
last token (its EOS). Eq. (1) is ``losses.ranking_loss``. With ``rm.pairs="shuffled"`` every
ordered pair becomes its own batch element instead (the ablation of paper section 3.5: each
completion then gets K-1 separate updates, which overfits). After training, a bias is added so
the labelers' demonstrations score mean 0 (section 3.5); it is folded into the scalar head's
bias, so every later use of the RM applies it. The normalized params are written to
``workdir/export``, which ``init_from`` prefers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from instructrl import checkpoint, losses, sharding
from instructrl.data import lm as lm_data
from instructrl.data import sources
from instructrl.evaluators import GROUPS, RankingAccuracy
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.presets import model_config
from instructrl.scoring import rewards_at_last
from instructrl.tokenizer import Tokenizer, make_tokenizer
from instructrl.train import (
    Run,
    TrainState,
    apply_gradients,
    lazy_state,
    optimizer_config,
    total_steps,
    train_state_init,
)


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
    global batch; ranks, mask (B, K).
    """

    def __init__(self, arrays, batch_size, seed, host_rows=None, shards: int = 1,
                 row_len: int | None = None, share_prompt: bool = True):  # fmt: skip
        super().__init__(arrays, batch_size, seed, host_rows)
        if batch_size % shards:
            raise ValueError(f"rm: batch size {batch_size} is not split evenly over {shards}")
        self.shards = shards
        self.row_len = max(int(row_len or 0), arrays["tokens"].shape[-1])
        self.share_prompt = share_prompt and "prompt" in arrays

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
        at_rows = [(local, local * num_rows + r, pieces) for local, s in enumerate(mine)
                   for r, pieces in enumerate(packings[s])]  # fmt: skip
        for local, r, pieces in at_rows:
            at = 0
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
                    index[i, k] = (first * num_rows + r) * t + at_response + n - 1  # flat, global
                    at_response += n
                at += length
        out.update(index=index, ranks=self.arrays["ranks"][rows], mask=self.arrays["mask"][rows])
        return out


def batch_rewards(model: Transformer, params, batch, rules, **kwargs) -> jax.Array:
    """(B, K) rewards of a ranking batch, padded (tokens (B, K, T), last) or packed
    (``PackedRankingBatcher``). kwargs go to ``model.apply`` (dropout)."""
    if "index" not in batch:
        return rewards_at_last(model, params, batch["tokens"], batch["last"], rules, **kwargs)
    with nn.logical_axis_rules(rules):
        values = model.apply(
            {"params": params},
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            branch_ids=batch.get("branch_ids"),
            **kwargs,
        )  # (R, T)
    return values.reshape(-1)[batch["index"]]


def rm_step(model: Transformer, tx, rules, state: TrainState, batch, rng):
    """One update on eq. (1). batch: a padded or packed ranking batch (``batch_rewards``) with
    ranks, mask (B, K)."""
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        rewards = batch_rewards(
            model, params, batch, rules, deterministic=False,
            rngs={"dropout": jax.random.fold_in(rng, 0)},
        )  # fmt: skip
        return losses.ranking_loss(rewards, batch["ranks"], batch["mask"])

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, norms = apply_gradients(state, grads, tx)
    return state, {"loss": loss, **metrics, **norms}


def unseen_labelers(train_rankings: Sequence[dict], eval_rankings: Sequence[dict]) -> list[str]:
    """Labeler ids of ``eval_rankings`` that never ranked a training prompt: the held-out
    labelers of paper section 4.1. Empty unless every training ranking carries a labeler id."""
    train_ids = [r.get("labeler_id") for r in train_rankings]
    if not train_ids or None in train_ids:
        return []
    seen = set(train_ids)
    return sorted({r["labeler_id"] for r in eval_rankings if r.get("labeler_id")} - seen)


def evaluate_rankings(
    config, params, rankings: Sequence[dict], heldout_labelers: Sequence[str] = (), prefix="eval"
) -> dict[str, float]:
    """The ``rm_accuracy`` metrics of RM ``params`` on ranking records, outside training
    (e.g. on the training rankings, to measure overfitting)."""
    tokenizer = make_tokenizer(config.tokenizer)
    model = Transformer(model_config(config, tokenizer), head="scalar")
    arrays, _ = encode_rankings(
        tokenizer,
        rankings,
        int(config.data.seq_len),
        config.data.get("template", "{prompt}\n\n"),
        int(config.rm.max_responses),
        skip_too_long=True,
        heldout_labelers=heldout_labelers,
    )
    mesh = sharding.make_mesh(config.mesh)
    context = {
        "model": model,
        "mesh": mesh,
        "rules": sharding.rules_from_config(config.get("logical_rules")),
        "eval_arrays": arrays,
    }
    state = TrainState(step=0, params=params, opt_state=None)
    return {k: float(v) for k, v in RankingAccuracy(context, prefix=prefix).run(state).items()}


def load_rankings(path: str, config) -> tuple[list[dict], int]:
    """Rankings of one file, read through data.sources with ``config.data``'s format/flags."""
    return sources.read_rankings(
        path,
        format=config.data.get("format", "auto"),
        skip_invalid=bool(config.data.get("skip_invalid", False)),
    )


def normalization_bias(
    model, params, rules, mesh, tokenizer, demonstrations, seq_len, template, batch_size: int = 16
) -> float:
    """-mean reward of the demonstrations: the bias that gives them mean reward 0."""
    encoded = [
        lm_data.encode_demonstration(tokenizer, d["prompt"], d["response"], seq_len - 1, template)
        for d in demonstrations
    ]
    encoded = [e[0] for e in encoded if e is not None]
    if not encoded:
        raise lm_data.DataError("rm.normalize: no demonstration fits in seq_len")
    tokens = np.full((len(encoded), 1, seq_len), tokenizer.pad_id, np.int32)
    last = np.zeros((len(encoded), 1), np.int32)
    for i, ids in enumerate(encoded):
        tokens[i, 0, : len(ids)] = ids
        last[i, 0] = len(ids) - 1

    @jax.jit
    def score(params, tokens, last):
        return rewards_at_last(model, params, tokens, last, rules)

    total = []
    for start in range(0, len(encoded), batch_size):
        t, la = tokens[start : start + batch_size], last[start : start + batch_size]
        real = len(t)
        if real < batch_size:
            t = np.concatenate([t, np.repeat(t[:1], batch_size - real, 0)])
            la = np.concatenate([la, np.repeat(la[:1], batch_size - real, 0)])
        batch = sharding.put_global({"tokens": t, "last": la}, mesh)  # every host: all rows
        total.append(sharding.to_host(score(params, batch["tokens"], batch["last"]))[:real, 0])
    return -float(np.concatenate(total).mean())


def run(config, workdir: str, rankings=None, eval_rankings=None) -> TrainState:
    """Train the reward model of ``config`` in ``workdir``; export normalized params.

    Rankings come from ``config.data.path`` (held-out ones from ``config.data.eval_paths``, or
    ``data.eval_examples`` prompts split off) unless given directly as lists of records.
    Evaluation is split by labeler group: the ids in ``data.heldout_labelers``, else the
    labelers of the eval rankings who ranked no training prompt (``unseen_labelers``).
    """
    run = Run(config, workdir)
    model = Transformer(run.model_cfg, head="scalar")
    data = config.data
    seq_len, template = int(data.seq_len), data.get("template", "{prompt}\n\n")

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
        run.tokenizer,
        seq_len=seq_len,
        template=template,
        max_responses=int(config.rm.max_responses),
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
    run.report_skipped({"invalid": invalid, "too_long": too_long}, "rankings")
    if config.rm.pairs == "shuffled":
        train_arrays = expand_pairs(train_arrays)
    elif config.rm.pairs != "all_in_one":
        raise ValueError(f"rm.pairs must be 'all_in_one' or 'shuffled', got {config.rm.pairs!r}")
    train_arrays.pop("group")
    batch_size = int(config.train.batch_size)
    host_rows = sharding.host_batch_slice(batch_size)
    if config.rm.get("pack", False):
        batcher = PackedRankingBatcher(
            train_arrays, batch_size, int(config.seed), host_rows, sharding.batch_shards(run.mesh),
            row_len=int(config.rm.get("row_len", 0)),
            share_prompt=bool(config.rm.get("share_prompt", True)),
        )  # fmt: skip
    else:
        bucketed = config.rm.get("bucket_by_k", False)
        batcher_cls = RankingBatcher if bucketed else lm_data.EpochBatcher
        batcher = batcher_cls(train_arrays, batch_size, int(config.seed), host_rows)
    steps = total_steps(config.train, batcher.steps_per_epoch)
    tx, schedule = make_optimizer(optimizer_config(config.optimizer, steps))
    k = train_arrays["tokens"].shape[1]
    example = {"tokens": jax.ShapeDtypeStruct((batch_size * k, seq_len), jnp.int32)}
    initial, shardings, abstract = lazy_state(
        train_state_init(model, tx, example, run.rules),
        run.mesh,
        run.rules,
        jax.random.key(int(config.seed)),
    )
    info = {
        "rankings": len(rankings),
        "invalid_skipped": invalid,
        "too_long_skipped": too_long,
        "train_elements": batcher.size,
        # Responses scored per epoch: sum of K all-in-one, 2 per pair when shuffled.
        "train_sequences": int(train_arrays["mask"].sum()),
        "eval_prompts": len(eval_arrays["tokens"]),
        "pairs": config.rm.pairs,
        "heldout_labelers": heldout_labelers,
    }
    run.write_info(**info)

    def init_from(initial):
        trunk = {name: v for name, v in abstract.params.items() if name != "scalar_head"}
        params = dict(run.load(config.init_from, trunk))
        params["scalar_head"] = initial().params["scalar_head"]  # a fresh head on the trunk
        return initial().replace(params=params, opt_state=tx.init(params))

    state = run.fit(
        initial=initial,
        shardings=shardings,
        abstract=abstract,
        step_fn=functools.partial(rm_step, model, tx, run.rules),
        batcher=batcher,
        steps=steps,
        schedule=schedule,
        init_from=init_from if config.get("init_from") else None,
        eval_context={"model": model, "eval_arrays": eval_arrays},
        prefix="rm",
        tokens_per_step=lambda b: (
            int((b["segment_ids"] > 0).sum() if "index" in b else (b["last"] + 1)[b["mask"]].sum())
            * jax.process_count()
        ),
    )
    params, bias = state.params, 0.0
    if config.rm.get("normalize_with"):
        demos, _ = sources.read_demonstrations(config.rm.normalize_with, skip_invalid=True)
        demos = demos[: int(config.rm.get("normalize_examples", 256))]
        bias = normalization_bias(
            model, params, run.rules, run.mesh, run.tokenizer, demos, seq_len, template
        )
        params = add_reward_bias(params, bias)
    checkpoint.export_params(workdir, params, {"reward_bias": bias, **info, "total_steps": steps})
    run.finish(reward_bias=bias)
    return state.replace(params=params)


def add_reward_bias(params, bias: float):
    """Fold a constant into the scalar head's bias (every later use of the RM applies it)."""
    head = dict(params["scalar_head"])
    head["bias"] = head["bias"] + jnp.asarray(bias, head["bias"].dtype)
    return {**params, "scalar_head": head}
