"""Language-model stages: pretraining on plain text and SFT on demonstrations (paper step 1).

Both minimize ``losses.masked_nll``: pretraining over every token, SFT over response tokens only
(prompt tokens are masked), averaged per token over the global batch. Paper appendix C.1: 16
epochs, cosine decay to 10% of the peak learning rate, residual dropout 0.2, the final model
selected on validation data (``checkpoint.select_by``).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from instructrl import checkpoint, evaluators, losses, sampling, sharding
from instructrl.data import formats, sources
from instructrl.data import lm as lm_data
from instructrl.data import pipeline as data_pipeline
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.presets import pad_vocab, preset
from instructrl.tokenizer import make_tokenizer
from instructrl.train import TrainState, apply_gradients, fit, init_train_state

log = logging.getLogger(__name__)


def model_config(config, tokenizer):
    """The ModelConfig of ``config.model`` (a preset name plus overrides)."""
    fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    fields.setdefault("vocab_size", pad_vocab(tokenizer.vocab_size))
    if fields["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={fields['vocab_size']} < tokenizer vocabulary {tokenizer.vocab_size}"
        )
    return preset(config.model.preset, **fields)


def lm_step(model: Transformer, tx, rules, state: TrainState, batch, rng):
    """One update on masked NLL. batch: inputs, targets, loss_mask (B, T) [, positions,
    segment_ids (B, T)]. Pure: (state, batch, rng) -> (state, metrics)."""
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

    (loss, num_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, norms = apply_gradients(state, grads, tx)
    return state, {"loss": loss, "num_tokens": num_tokens, **norms}


@evaluators.register("heldout_loss")
class HeldoutLoss:
    """Token-weighted mean NLL on held-out rows: ``{prefix}/loss`` and ``{prefix}/perplexity``."""

    def __init__(self, context, batch_size: int = 16, prefix: str = "eval"):
        self.ctx, self.batch_size, self.prefix = context, batch_size, prefix
        model, rules = context["model"], context["rules"]

        @jax.jit
        def sums(params, batch):
            with nn.logical_axis_rules(rules):
                logits = model.apply({"params": params}, batch["inputs"])  # dropout off
            loss, n = losses.masked_nll(logits, batch["targets"], batch["loss_mask"])
            return loss * n, n

        self._sums = sums

    def run(self, state):
        arrays, mesh = self.ctx["eval_arrays"], self.ctx["mesh"]
        n = len(arrays["inputs"])
        # Pad the last batch with fully masked rows so every batch has one shape.
        total, count = 0.0, 0.0
        for start in range(0, n, self.batch_size):
            rows = {k: v[start : start + self.batch_size] for k, v in arrays.items()}
            short = self.batch_size - len(rows["inputs"])
            if short:
                rows = {
                    k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)])
                    for k, v in rows.items()
                }
            batch = sharding.shard_batch(rows, mesh)
            s, c = self._sums(state.params, batch)
            total, count = total + float(s), count + float(c)
        loss = total / max(count, 1.0)
        return {f"{self.prefix}/loss": loss, f"{self.prefix}/perplexity": float(np.exp(loss))}


@evaluators.register("samples")
class Samples:
    """Samples responses to fixed prompts; writes them to workdir/samples.jsonl."""

    def __init__(self, context, max_new_tokens: int = 48, temperature: float = 0.0):
        self.ctx = context
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        tok, cfg = context["tokenizer"], context["config"]
        prompts = context["eval_prompts"]
        template = cfg.data.get("template", "{prompt}\n\n")
        ids = [tok.encode(template.format(prompt=p)) for p in prompts]
        limit = context["model"].cfg.max_len - max_new_tokens
        self.prompts = prompts
        self.tokens, self.mask = sampling.left_pad(ids, tok.pad_id, min(max(map(len, ids)), limit))
        model, rules = context["model"], context["rules"]

        def apply_fn(params, tokens, mask):
            with nn.logical_axis_rules(rules):
                return model.apply({"params": params}, tokens, attention_mask=mask)

        self._sample = jax.jit(
            functools.partial(
                sampling.sample,
                apply_fn,
                max_new_tokens=max_new_tokens,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=temperature,
            )
        )

    def run(self, state):
        tok = self.ctx["tokenizer"]
        tokens, _, mask = self._sample(
            state.params, jnp.asarray(self.tokens), jnp.asarray(self.mask), jax.random.key(0)
        )
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        step = int(jax.device_get(state.step))
        if jax.process_index() == 0:
            with open(os.path.join(self.ctx["workdir"], "samples.jsonl"), "a") as f:
                for prompt, row in zip(self.prompts, tokens, strict=True):
                    text = tok.decode_until_eos(row)
                    f.write(json.dumps({"step": step, "prompt": prompt, "response": text}) + "\n")
        ended = (tokens == tok.eos_id).any(axis=1)
        return {"samples/mean_length": float(mask.sum(1).mean()), "samples/eos_rate": ended.mean()}


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
        docs = sources.read_text(list(data.text_files))
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


def run(config, workdir: str) -> TrainState:
    """Train the stage described by ``config`` in ``workdir``; return the final state."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(config.tokenizer)
    cfg = model_config(config, tokenizer)
    model = Transformer(cfg, head="lm")
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("logical_rules"))

    train_examples, eval_arrays, eval_prompts, skipped = load_data(config, tokenizer)
    batch_size = int(config.train.batch_size)
    # Batches are a pure function of (seed, step): the checkpointed step is the iterator state.
    batcher = data_pipeline.PrefetchedBatcher(
        data_pipeline.LMPipeline(
            train_examples,
            batch_size,
            int(config.data.seq_len),
            int(config.seed),
            packing=bool(config.data.get("packing", False)),
            length_buckets=list(config.data.get("length_buckets", [])),
            pad_id=tokenizer.pad_id,
        )
    )
    total_steps = int(config.train.get("steps") or 0) or int(
        round(float(config.train.epochs) * batcher.steps_per_epoch)
    )
    opt_cfg = config.optimizer.copy_and_resolve_references()
    with opt_cfg.unlocked():
        opt_cfg.total_steps = total_steps
    tx, schedule = make_optimizer(opt_cfg)
    seq_len = int(config.data.seq_len)
    example = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)}
    state, shardings, abstract = init_train_state(
        model, tx, jax.random.key(int(config.seed)), example, mesh, rules
    )
    _write_run_info(workdir, config, cfg, total_steps, batcher, skipped)

    def init_from(state):
        params = checkpoint.latest_params(config.init_from, abstract.params)
        return state.replace(params=params, opt_state=tx.init(params))

    def step_fn(state, batch, rng):
        state, metrics = lm_step(model, tx, rules, state, batch, rng)
        return state, {**metrics, "lr": schedule(state.step - 1)}

    context = {
        "config": config,
        "model": model,
        "mesh": mesh,
        "rules": rules,
        "tokenizer": tokenizer,
        "eval_arrays": eval_arrays,
        "eval_prompts": eval_prompts,
    }
    return fit(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        state_shardings=shardings,
        abstract_state=abstract,
        step_fn=step_fn,
        batcher=batcher,
        total_steps=total_steps,
        tokens_per_step=lambda b: int(b["loss_mask"].size) * jax.process_count(),
        init_from=init_from if config.get("init_from") else None,
        eval_context=context,
        prefix=config.get("stage", "sft"),
    )


def _write_run_info(workdir, config, cfg, total_steps, batcher, skipped):
    if jax.process_index() != 0:
        return
    info = {
        "stage": config.get("stage", "sft"),
        "total_steps": total_steps,
        "steps_per_epoch": batcher.steps_per_epoch,
        "train_examples": batcher.size,
        "skipped_examples": skipped,
        "model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
