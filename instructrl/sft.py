"""Language-model stages: pretraining on plain text and SFT on demonstrations (paper step 1).

Both minimize ``losses.masked_nll``: pretraining over every token, SFT over response tokens only
(prompt tokens are masked), averaged per token over the global batch. Paper appendix C.1: 16
epochs, cosine decay to 10% of the peak learning rate, residual dropout 0.2, the final model
selected on validation data (``checkpoint.select_by``).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import linen as nn

from instructrl import checkpoint, lora, losses, sharding
from instructrl.data import files, formats, sources
from instructrl.data import lm as lm_data
from instructrl.data import pipeline as data_pipeline
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.train import (
    Run,
    TrainState,
    apply_gradients,
    lazy_state,
    optimizer_config,
    total_steps,
    train_state_init,
)


def lm_step(model: Transformer, tx, rules, state, batch, rng, base=None, merge_alpha=None):
    """One update on masked NLL. batch: inputs, targets, loss_mask (B, T) [, positions,
    segment_ids (B, T)]. Pure: (state, batch, rng) -> (state, metrics). ``base``: LoRA's
    frozen weights (``state.params`` then holds the adapters), ``merge_alpha`` its
    ``Spec.merge_alpha`` (``lora.value_and_grad``)."""
    rng = jax.random.fold_in(rng, state.step)
    dropout_rng = jax.random.fold_in(rng, 0)

    def loss_fn(params):
        with nn.logical_axis_rules(rules):
            logits = model.apply(
                {"params": params},
                batch["inputs"],
                positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"),
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )  # (B, T, V)
        return losses.masked_nll(logits, batch["targets"], batch["loss_mask"])

    (loss, num_tokens), grads = lora.value_and_grad(
        loss_fn, state.params, base, merge_alpha=merge_alpha
    )
    state, norms = apply_gradients(state, grads, tx)
    return state, {"loss": loss, "num_tokens": num_tokens, **norms}


def load_data(config, tokenizer):
    """(train Examples, eval arrays, eval prompts, skipped counts) for ``config.data``.

    data.kind "text": ``text_files``; contiguous windows, or with ``packing`` one document per
    segment. "demonstrations": ``path`` in any demonstration ``format`` of data.sources,
    rendered by ``template`` or ``chat_format`` (data.formats). Skipped records are counted
    by reason ({"invalid", "too_long"}) when ``skip_invalid`` / ``skip_too_long`` allow it.
    """
    data = config.data
    seq_len = int(data.seq_len)
    skipped = {"invalid": 0, "too_long": 0}
    if data.kind == "text":
        docs = files.read_text(list(data.text_files))
        if data.get("packing", False):
            examples = data_pipeline.text_examples(tokenizer, docs, seq_len)
        else:
            rows = lm_data.text_arrays(tokenizer, docs, seq_len)
            examples = data_pipeline.Examples(
                [{k: rows[k][i] for k in data_pipeline.KEYS} for i in range(len(rows["inputs"]))]
            )
        prompts = list(data.get("eval_prompts", []))
    elif data.kind == "demonstrations":
        demos, skipped["invalid"] = sources.read_demonstrations(
            data.path,
            format=data.get("format", "auto"),
            skip_invalid=bool(data.get("skip_invalid", False)),
        )
        if data.get("max_examples"):
            demos = demos[: int(data.max_examples)]
        examples, skipped["too_long"] = data_pipeline.encode_demonstrations(
            tokenizer,
            formats.make_format(data),
            demos,
            seq_len,
            skip_too_long=bool(data.get("skip_too_long", False)),
            source=data.path,
        )
        prompts = list(data.get("eval_prompts", [])) or [
            d["prompt"] for d in demos[: int(data.get("num_eval_prompts", 4))]
        ]
    else:
        raise ValueError(f"data.kind must be 'text' or 'demonstrations', got {data.kind!r}")
    train, held_out = data_pipeline.split(
        range(len(examples)), int(data.eval_examples), int(config.seed)
    )
    eval_arrays = data_pipeline.padded_arrays(examples.subset(held_out), seq_len, tokenizer.pad_id)
    return examples.subset(train), eval_arrays, prompts, skipped


def run(config, workdir: str):
    """Train the stage described by ``config`` in ``workdir``; returns the final state."""
    run = Run(config, workdir)
    model = Transformer(run.model_cfg, head="lm")
    train_examples, eval_arrays, eval_prompts, skipped = load_data(config, run.tokenizer)
    run.report_skipped(skipped)
    batch_size, seq_len = int(config.train.batch_size), int(config.data.seq_len)
    # Batches are a pure function of (seed, step): the checkpointed step is the iterator state.
    batcher = data_pipeline.PrefetchedBatcher(
        data_pipeline.LMPipeline(
            train_examples,
            batch_size,
            seq_len,
            int(config.seed),
            packing=bool(config.data.get("packing", False)),
            length_buckets=list(config.data.get("length_buckets", [])),
            pack_batches=bool(config.data.get("pack_batches", False)),
            shards=sharding.batch_shards(run.mesh),
            pad_id=run.tokenizer.pad_id,
        )
    )
    steps = total_steps(config.train, batcher.steps_per_epoch)
    tx, schedule = make_optimizer(optimizer_config(config.optimizer, steps))
    example = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)}
    initial, shardings, abstract = lazy_state(
        train_state_init(model, tx, example, run.rules, run.trainable),
        run.mesh,
        run.rules,
        jax.random.key(int(config.seed)),
    )
    base = run.lora_base(model, example)  # LoRA: init_from's weights, frozen
    run.write_info(
        steps_per_epoch=batcher.steps_per_epoch,
        train_examples=batcher.size,
        skipped_examples=skipped,
        model=vars(run.model_cfg),
    )

    def init_from(initial):
        params = run.load(config.init_from, abstract.params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    state = run.fit(
        initial=initial,
        shardings=shardings,
        abstract=abstract,
        step_fn=functools.partial(lm_step, model, tx, run.rules, merge_alpha=run.merge_alpha),
        batcher=batcher,
        steps=steps,
        schedule=schedule,
        init_from=init_from if config.get("init_from") else None,
        eval_context={"model": model, "eval_arrays": eval_arrays, "eval_prompts": eval_prompts},
        prefix=config.get("stage", "sft"),
        tokens_per_step=lambda b: int(b["loss_mask"].size) * jax.process_count(),
        base=base,
    )
    if base is not None:  # LoRA: the checkpoints hold adapters; later stages read plain params
        if os.path.basename(checkpoint.params_source(workdir)[0]) != "best":
            run.export(state.params, {"total_steps": steps}, base)
        elif run.lora.export == "separate":  # best/ holds the best params, merged
            lora.write_adapters(workdir, run.lora, state.params, {"base": config.init_from})
    run.finish()
    return state
