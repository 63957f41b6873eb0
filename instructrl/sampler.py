"""Fast autoregressive sampling with a KV cache: prefill, then decode in ``lax.while_loop``.

Left-padded prompts (B, P) of mixed length are prefilled in one pass into cache slots
[0, P - 1); decode step i feeds one token (the last prompt token, then each sampled token) at
slot P - 1 + i with position id (real prompt length - 1 + i), so each row is computed exactly
as if it had no padding. The prefill's own logits are never used, so XLA drops its (B, P, V)
vocabulary projection. Rows stop at EOS and the loop exits once every row has stopped.
Row r's token i is drawn with the key fold_in(fold_in(rng, i), r), so a row's sample is the
same whatever else is in its batch. Once few rows are still running, the loop goes on over
those rows alone (``generate``'s ``compact``).
Sampling applies temperature, top-k and top-p (``filter_logits``; ``scoring`` teacher-forces
log-probs under the same filtered distribution). Under a mesh, the
batch is split over (data, fsdp) and heads over tensor through the model's logical axis names.

Why the decode runs over unrolled layers: with ``nn.scan`` the per-layer caches are the scan's
xs and its stacked ys, two different buffers, so every decode step copies the whole cache
(measured: one full cache copy per step in the compiled loop). Decoding is memory-bound and the
cache is the largest thing it reads at large batch, so the sampler slices scanned params into
per-layer params once per call (a transient copy of the params) and decodes with one cache
buffer per layer, each a ``lax.while_loop`` carry that ``dynamic_update_slice`` updates in
place. Nothing needs donating: the cache is created inside the jitted call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from instructrl.model import CACHE_AXES, Transformer, init_cache, unstack_layers


def filter_logits(logits: jax.Array, temperature, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering over the last axis (V).

    logits: (..., V) float32; temperature: a Python float or a traced scalar (one compiled
    sampler serves every temperature). Excluded tokens get -inf. Temperature 0 (greedy,
    static) leaves the logits as they are: the greedy token is their argmax, and the sampler
    reports its log-prob under the model's own softmax.
    """
    if is_identity(temperature, top_k, top_p):
        return logits
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def inverse_cdf_sample(keys, logits: jax.Array) -> jax.Array:
    """One token per row of ``logits`` (B, V), drawn from softmax(logits) by inverting its
    cumulative distribution with one uniform number per row, from that row's key (``keys``
    (B,)). The same law as ``jax.random.categorical``, which draws a Gumbel number per
    vocabulary entry (B x V of them, most of a small model's decode step on a CPU). Excluded
    tokens (-inf) are never drawn."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # (B, V)
    uniform = jax.vmap(lambda k: jax.random.uniform(k, (), minval=1e-7))(keys)  # (B,)
    u = uniform[:, None] * cdf[:, -1:]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)


def is_identity(temperature, top_k: int, top_p: float) -> bool:
    """Whether ``filter_logits`` leaves the logits unchanged (greedy, or plain T = 1); a traced
    temperature is never known to be the identity."""
    if not isinstance(temperature, int | float):
        return False
    return temperature == 0.0 or (temperature == 1.0 and not top_k and top_p >= 1.0)


def bind(model: Transformer, *, max_new_tokens: int, eos_id: int, pad_id: int,
         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rules=(),
         stop: tuple[int, ...] = ()):  # fmt: skip
    """``generate`` with its options bound: (params, prompt_tokens, prompt_mask, rng) ->
    Samples. The temperature and the ``stop`` ids (tokens that end a row besides ``eos_id``,
    at most ``MAX_STOP``) travel as arguments of the jitted function (greedy, top-k and top-p
    are static), so samplers at different temperatures or with different stop tokens share
    one compilation."""
    if len(stop) > MAX_STOP:
        raise ValueError(f"stop: at most {MAX_STOP} token ids, got {len(stop)}")
    jitted = _jitted_generate(model, max_new_tokens, eos_id, pad_id, temperature == 0.0,
                              top_k, top_p, rules)  # fmt: skip
    stop_ids = jnp.asarray(tuple(stop) + (eos_id,) * (MAX_STOP - len(stop)), jnp.int32)
    return Bound(jitted, jnp.float32(temperature), stop_ids)


# Stop ids a bound sampler takes (padded with EOS): a few-shot separator, a chat turn's end.
MAX_STOP = 2


@dataclasses.dataclass(frozen=True)
class Bound:
    """A jitted sampler with its temperature and stop ids: called, or lowered (ahead-of-time
    compilation), with (params, prompt_tokens, prompt_mask, rng)."""

    jitted: Any
    temperature: jax.Array
    stop: jax.Array

    def __call__(self, params, prompt_tokens, prompt_mask, rng) -> Samples:
        return self.jitted(params, prompt_tokens, prompt_mask, rng, self.temperature, self.stop)

    def lower(self, params, prompt_tokens, prompt_mask, rng):
        return self.jitted.lower(params, prompt_tokens, prompt_mask, rng, self.temperature,
                                 self.stop)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _jitted_generate(model, max_new_tokens, eos_id, pad_id, greedy, top_k, top_p, rules):
    def fn(params, prompt_tokens, prompt_mask, rng, temperature, stop):
        return generate(model, params, prompt_tokens, prompt_mask, rng,
                        max_new_tokens=max_new_tokens, eos_id=(eos_id, stop), pad_id=pad_id,
                        temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                        rules=rules)  # fmt: skip

    return jax.jit(fn)


@flax.struct.dataclass
class Samples:
    tokens: jax.Array  # (B, N) int32, pad after EOS
    logprobs: jax.Array  # (B, N) float32 log-prob of each token under the sampling distribution
    mask: jax.Array  # (B, N) int32, 1 up to and including EOS


@flax.struct.dataclass
class Decoding:
    """The decode loop's state: what ``prefill`` returns and each ``decode_step`` advances.

    Slots [0, P - 1) of the cache hold the prompt; step i writes slot P - 1 + i, so P and N
    are read off the shapes (S = P + N - 1 slots)."""

    i: jax.Array  # () int32, tokens sampled so far
    token: jax.Array  # (B,) int32, the token step i feeds
    cache: Any  # per-layer {"k", "v"} (B, K, S, H)
    kv_mask: jax.Array  # (B, S) int32, the slots a query may attend to
    first_position: jax.Array  # (B,) position id of the last real prompt token
    samples: Samples  # (B, N) outputs so far
    done: jax.Array  # (B,) bool, the row has sampled EOS
    row: jax.Array  # (B,) int32, the row's index in the caller's batch (its random stream)


def decoding_model(model: Transformer, params, unroll_layers: bool = True):
    """(model, params) the decode loop runs: a scanned model's layers unrolled (the module
    docstring says why) unless ``unroll_layers`` is False."""
    if model.cfg.scan_layers and unroll_layers:
        cfg = dataclasses.replace(model.cfg, scan_layers=False)
        return Transformer(cfg, head=model.head), unstack_layers(params, cfg.num_layers)
    return model, params


def _constrain(model: Transformer, cache, rules):
    """The cache on its mesh axes (batch over data/fsdp, KV heads over tensor)."""
    axes = ("layers", *CACHE_AXES) if model.cfg.scan_layers else CACHE_AXES
    with nn.logical_axis_rules(rules):
        return jax.tree.map(lambda x: nn.with_logical_constraint(x, axes), cache)


def _forward(model, params, tokens, positions, kv_mask, cache, index, rules):
    with nn.logical_axis_rules(rules):
        logits, cache = model.apply(
            {"params": params},
            tokens,
            positions=positions,
            attention_mask=kv_mask,
            cache=cache,
            cache_index=index,
        )
    return logits, _constrain(model, cache, rules)


def prefill(model: Transformer, params, prompt_tokens, prompt_mask, *, max_new_tokens: int,
            pad_id: int, rules=()) -> Decoding:  # fmt: skip
    """A fresh cache for ``max_new_tokens`` more tokens, with all but the last prompt token
    written into it (their logits are dead code; the last one is step 0's input).

    prompt_tokens, prompt_mask: (B, P) left-padded."""
    batch, prompt_len = prompt_tokens.shape
    prompt_mask = prompt_mask.astype(jnp.int32)
    kv_mask = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens - 1)))  # (B, S)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # (B, P)
    cache = _constrain(model, init_cache(model.cfg, batch, prompt_len + max_new_tokens - 1), rules)
    if prompt_len > 1:
        args = (prompt_tokens[:, :-1], positions[:, :-1], kv_mask, cache, 0, rules)
        _, cache = _forward(model, params, *args)
    samples = Samples(
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        mask=jnp.zeros((batch, max_new_tokens), jnp.int32),
    )
    return Decoding(
        i=jnp.int32(0),
        token=prompt_tokens[:, -1].astype(jnp.int32),
        cache=cache,
        kv_mask=kv_mask,
        first_position=positions[:, -1],
        samples=samples,
        done=jnp.zeros((batch,), bool),
        row=jnp.arange(batch, dtype=jnp.int32),
    )


def decode_step(model: Transformer, params, d: Decoding, rng, *, eos_id: int, pad_id: int,
                temperature=1.0, top_k: int = 0, top_p: float = 1.0,
                rules=()) -> Decoding:  # fmt: skip
    """Feed ``d.token`` at slot P - 1 + i and sample token i (key fold_in(rng, i)); a row that
    is done gets pad, mask 0 and log-prob 0. ``temperature``: a float (0.0: greedy) or a
    traced scalar; ``eos_id``: an id or a tuple of ids that end a row (``ends``)."""
    batch, max_new_tokens = d.samples.tokens.shape
    slot = d.kv_mask.shape[1] - max_new_tokens + d.i
    kv_mask = jax.lax.dynamic_update_index_in_dim(
        d.kv_mask, jnp.ones((batch,), jnp.int32), slot, axis=1
    )
    pos = (d.first_position + d.i)[:, None]  # (B, 1)
    logits, cache = _forward(model, params, d.token[:, None], pos, kv_mask, d.cache, slot, rules)
    logits = logits[:, 0]
    if isinstance(temperature, int | float) and temperature == 0.0:
        filtered, new = logits, jnp.argmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits, temperature, top_k, top_p)
        step_key = jax.random.fold_in(rng, d.i)
        keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(d.row)  # per row: (B,)
        new = inverse_cdf_sample(keys, filtered)
    logp = jnp.take_along_axis(jax.nn.log_softmax(filtered), new[:, None], axis=-1)[:, 0]
    new = jnp.where(d.done, pad_id, new.astype(jnp.int32))

    def put(buffer, value):
        return jax.lax.dynamic_update_index_in_dim(buffer, value, d.i, axis=1)

    samples = Samples(
        tokens=put(d.samples.tokens, new),
        logprobs=put(d.samples.logprobs, jnp.where(d.done, 0.0, logp)),
        mask=put(d.samples.mask, (~d.done).astype(jnp.int32)),
    )
    return d.replace(i=d.i + 1, token=new, cache=cache, kv_mask=kv_mask, samples=samples,
                     done=d.done | ends(new, eos_id))  # fmt: skip


def ends(tokens: jax.Array, eos_id) -> jax.Array:
    """Whether each token ends its row: ``eos_id`` is one id or a tuple of ids or (traced)
    arrays of ids (EOS and stop tokens, e.g. a few-shot separator); the ending token is kept
    in the row."""
    ids = eos_id if isinstance(eos_id, tuple) else (eos_id,)
    out = jnp.zeros(tokens.shape, bool)
    for other in ids:
        other = jnp.asarray(other).reshape(-1)
        out = out | jnp.any(tokens[..., None] == other, axis=-1)
    return out


def generate(
    model: Transformer,
    params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature=1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rules=(),
    unroll_layers: bool = True,
    compact: bool = True,
) -> Samples:
    """Sample up to ``max_new_tokens`` per row. Jit-compatible (all options static).

    model: a ``Transformer`` with the LM head; params: its params (scanned or not);
    prompt_tokens, prompt_mask: (B, P) left-padded; rng: a key (the module docstring).
    temperature: a float (0.0: greedy decoding) or a traced scalar. ``unroll_layers=False``
    keeps a scanned model's layer scan (faster compiles for very deep models, one cache copy
    per step).
    ``prefill`` then ``decode_step`` in a ``lax.while_loop`` until every row is done; with
    ``compact``, once a quarter of the rows or fewer are running, the loop goes on over those
    rows alone. Each row draws from its own stream (fold_in(fold_in(rng, i), row)), so a
    row's sample does not depend on the other rows of the batch or on the compaction.
    Returns Samples(tokens, logprobs, mask), each (B, max_new_tokens).
    """
    model, params = decoding_model(model, params, unroll_layers)
    d = prefill(model, params, prompt_tokens, prompt_mask, max_new_tokens=max_new_tokens,
                pad_id=pad_id, rules=rules)  # fmt: skip
    options = dict(eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_k=top_k,
                   top_p=top_p, rules=rules)  # fmt: skip
    body = lambda d: decode_step(model, params, d, rng, **options)  # noqa: E731
    batch = prompt_tokens.shape[0]
    few = batch // COMPACT_FRACTION if compact else 0
    if few < 2:
        return jax.lax.while_loop(
            lambda d: (d.i < max_new_tokens) & ~jnp.all(d.done), body, d
        ).samples
    # Decode the whole batch while more than `few` rows are running, then only the rows
    # still running (a few long answers would otherwise keep every row stepping).
    d = jax.lax.while_loop(lambda d: (d.i < max_new_tokens) & ((~d.done).sum() > few), body, d)
    rows = jnp.argsort(d.done, stable=True)[:few]  # the running rows first
    part = jax.lax.while_loop(
        lambda d: (d.i < max_new_tokens) & ~jnp.all(d.done), body, _take(model, d, rows)
    )
    return jax.tree.map(lambda whole, some: whole.at[rows].set(some), d.samples, part.samples)


# generate decodes only the running rows once at most batch / COMPACT_FRACTION remain.
COMPACT_FRACTION = 4


def _take(model: Transformer, d: Decoding, rows) -> Decoding:
    """The decode state of ``rows`` only (the cache's batch axis is 1 under a layer scan)."""
    axis = 1 if model.cfg.scan_layers else 0
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    return d.replace(
        token=take(d.token),
        cache=jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), d.cache),
        kv_mask=take(d.kv_mask),
        first_position=take(d.first_position),
        samples=jax.tree.map(take, d.samples),
        done=take(d.done),
        row=take(d.row),
    )
