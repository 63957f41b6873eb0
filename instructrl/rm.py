"""Reward model stage (paper step 2): K-way rankings, all C(K,2) pairs in one batch element.

The RM is the SFT transformer with the LM head replaced by a scalar head, initialized from the
SFT params (``init_from``). The reward of (prompt, response) is the scalar at the response's
last token (its EOS, ``model.reward_readout="last"``, the paper's) or its mean over the
response's tokens ("mean": ``scoring.span_rewards``). Eq. (1) is ``losses.ranking_loss``.
With ``rm.pairs="shuffled"`` every ordered pair becomes its own batch element instead (the
ablation of paper section 3.5: each completion then gets K-1 separate updates, which
overfits). After training, a bias is added so
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

from instructrl import lora, losses, sharding
from instructrl.data import lm as lm_data
from instructrl.data import sources
from instructrl.data.comparisons import (  # noqa: F401  (rm.* names of the ranking data)
    PackedRankingBatcher,
    RankingBatcher,
    encode_rankings,
    expand_pairs,
    load_arrays,
    load_rankings,
    unseen_labelers,
)
from instructrl.evaluators import RankingAccuracy
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.presets import model_config
from instructrl.scoring import ranking_rewards, span_rewards
from instructrl.tokenizer import make_tokenizer
from instructrl.train import (
    Run,
    TrainState,
    apply_gradients,
    lazy_state,
    optimizer_config,
    total_steps,
    train_state_init,
)


def batch_rewards(model: Transformer, params, batch, rules, **kwargs) -> jax.Array:
    """(B, K) rewards of a ranking batch, padded (tokens (B, K, T), prompt, last) or packed
    (``PackedRankingBatcher``), read as ``model.cfg.reward_readout`` says. kwargs go to
    ``model.apply`` (dropout)."""
    if "index" not in batch:
        return ranking_rewards(
            model, params, batch["tokens"], batch["prompt"], batch["last"], rules, **kwargs
        )
    with nn.logical_axis_rules(rules):
        values = model.apply(
            {"params": params},
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            branch_ids=batch.get("branch_ids"),
            **kwargs,
        )  # (R, T)
    readout, width = model.cfg.reward_readout, values.shape[1]
    return span_rewards(values.reshape(-1), batch["first"], batch["index"], readout, width)


def rm_step(model: Transformer, tx, rules, state: TrainState, batch, rng, base=None,
            merge_alpha=None):  # fmt: skip
    """One update on eq. (1). batch: a padded or packed ranking batch (``batch_rewards``) with
    ranks, mask (B, K). ``base``: LoRA's frozen trunk (``state.params`` then holds the
    adapters and the scalar head), ``merge_alpha`` its ``Spec.merge_alpha``."""
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        rewards = batch_rewards(
            model, params, batch, rules, deterministic=False,
            rngs={"dropout": jax.random.fold_in(rng, 0)},
        )  # fmt: skip
        return losses.ranking_loss(rewards, batch["ranks"], batch["mask"])

    (loss, metrics), grads = lora.value_and_grad(
        loss_fn, state.params, base, merge_alpha=merge_alpha
    )
    state, norms = apply_gradients(state, grads, tx)
    return state, {"loss": loss, **metrics, **norms}


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


def normalization_bias(
    model, params, rules, mesh, tokenizer, demonstrations, seq_len, template, batch_size: int = 16
) -> float:
    """-mean reward of the demonstrations: the bias that gives them mean reward 0."""
    encoded = [
        lm_data.encode_demonstration(tokenizer, d["prompt"], d["response"], seq_len - 1, template)
        for d in demonstrations
    ]
    encoded = [e for e in encoded if e is not None]
    if not encoded:
        raise lm_data.DataError("rm.normalize: no demonstration fits in seq_len")
    arrays = {
        "tokens": np.full((len(encoded), 1, seq_len), tokenizer.pad_id, np.int32),
        "prompt": np.zeros((len(encoded), 1), np.int32),  # the response's first index
        "last": np.zeros((len(encoded), 1), np.int32),
    }
    for i, (ids, loss_mask) in enumerate(encoded):
        arrays["tokens"][i, 0, : len(ids)] = ids
        arrays["prompt"][i, 0] = len(loss_mask) - sum(loss_mask)
        arrays["last"][i, 0] = len(ids) - 1

    @jax.jit
    def score(params, batch):
        return batch_rewards(model, params, batch, rules)

    total = []
    for start in range(0, len(encoded), batch_size):
        rows = {k: v[start : start + batch_size] for k, v in arrays.items()}
        real = len(rows["tokens"])
        if real < batch_size:
            rows = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, 0)])
                    for k, v in rows.items()}  # fmt: skip
        batch = sharding.put_global(rows, mesh)  # every host: all rows
        total.append(sharding.to_host(score(params, batch))[:real, 0])
    return -float(np.concatenate(total).mean())


def run(config, workdir: str, rankings=None, eval_rankings=None) -> TrainState:
    """Train the reward model of ``config`` in ``workdir``; export normalized params.

    Rankings come from ``config.data.path`` (held-out ones from ``config.data.eval_paths``, or
    ``data.eval_examples`` prompts split off) unless given directly as lists of records.
    Evaluation is split by labeler group: the ids in ``data.heldout_labelers``, else the
    labelers of the eval rankings who ranked no training prompt (``unseen_labelers``).
    """
    run = Run(config, workdir)
    if run.lora is not None:  # the new head is trained in full beside the adapters
        run.lora = run.lora.with_train("scalar_head")
    model = Transformer(run.model_cfg, head="scalar")
    data = config.data
    seq_len, template = int(data.seq_len), data.get("template", "{prompt}\n\n")

    loaded = load_arrays(config, run.tokenizer, int(config.rm.max_responses), rankings,
                         eval_rankings)  # fmt: skip
    train_arrays, eval_arrays, heldout_labelers = loaded.train, loaded.eval, loaded.heldout_labelers
    rankings, invalid, too_long = loaded.rankings, loaded.invalid, loaded.too_long
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
        train_state_init(model, tx, example, run.rules, run.trainable),
        run.mesh,
        run.rules,
        jax.random.key(int(config.seed)),
    )
    base = run.lora_base(model, example)  # LoRA: init_from's trunk, frozen
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
        step_fn=functools.partial(rm_step, model, tx, run.rules, merge_alpha=run.merge_alpha),
        batcher=batcher,
        steps=steps,
        schedule=schedule,
        init_from=init_from if config.get("init_from") else None,
        eval_context={"model": model, "eval_arrays": eval_arrays},
        prefix="rm",
        base=base,
        tokens_per_step=lambda b: (
            int((b["segment_ids"] > 0).sum() if "index" in b else (b["last"] + 1)[b["mask"]].sum())
            * jax.process_count()
        ),
    )
    bias = 0.0
    if config.rm.get("normalize_with"):
        demos, _ = sources.read_demonstrations(config.rm.normalize_with, skip_invalid=True)
        demos = demos[: int(config.rm.get("normalize_examples", 256))]
        bias = normalization_bias(
            model, lora.full(state.params, base), run.rules, run.mesh, run.tokenizer, demos,
            seq_len, template,
        )  # fmt: skip
    # LoRA: the head (with its bias) is among the trainable params the export merges.
    params = add_reward_bias(state.params, bias)
    run.export(params, {"reward_bias": bias, **info, "total_steps": steps}, base)
    run.finish(reward_bias=bias)
    return state.replace(params=params)


def add_reward_bias(params, bias: float):
    """Fold a constant into the scalar head's bias (every later use of the RM applies it)."""
    head = dict(params["scalar_head"])
    head["bias"] = head["bias"] + jnp.asarray(bias, head["bias"].dtype)
    return {**params, "scalar_head": head}
