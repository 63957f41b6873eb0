"""Fast autoregressive sampling with a KV cache: prefill, then decode in ``lax.while_loop``.

Left-padded prompts (B, P) of mixed length are prefilled in one pass into cache slots
[0, P - 1); decode step i feeds one token (the last prompt token, then each sampled token) at
slot P - 1 + i with position id (real prompt length - 1 + i), so each row is computed exactly
as if it had no padding. The prefill's own logits are never used, so XLA drops its (B, P, V)
vocabulary projection. Rows stop at EOS and the loop exits once every row has stopped.
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

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from instructrl.model import CACHE_AXES, Transformer, init_cache, unstack_layers


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering over the last axis (V).

    logits: (..., V) float32. Excluded tokens get -inf. Temperature 0 (greedy) leaves the
    logits as they are: the greedy token is their argmax, and the sampler reports its log-prob
    under the model's own softmax.
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


def inverse_cdf_sample(key, logits: jax.Array) -> jax.Array:
    """One token per row of ``logits`` (B, V), drawn from softmax(logits) by inverting its
    cumulative distribution with one uniform number per row. The same law as
    ``jax.random.categorical``, which draws a Gumbel number per vocabulary entry (B x V of them,
    most of a small model's decode step on a CPU). Excluded tokens (-inf) are never drawn."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # (B, V)
    u = jax.random.uniform(key, (logits.shape[0], 1), minval=1e-7) * cdf[:, -1:]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)


def is_identity(temperature: float, top_k: int, top_p: float) -> bool:
    """Whether ``filter_logits`` leaves the logits unchanged (greedy, or plain T = 1)."""
    return temperature == 0.0 or (temperature == 1.0 and not top_k and top_p >= 1.0)


def bind(model: Transformer, *, max_new_tokens: int, eos_id: int, pad_id: int,
         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rules=()):  # fmt: skip
    """``generate`` with its static options bound, jitted: (params, prompt_tokens,
    prompt_mask, rng) -> Samples."""
    return jax.jit(
        functools.partial(
            generate,
            model,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            rules=rules,
        )
    )


@flax.struct.dataclass
class Samples:
    tokens: jax.Array  # (B, N) int32, pad after EOS
    logprobs: jax.Array  # (B, N) float32 log-prob of each token under the sampling distribution
    mask: jax.Array  # (B, N) int32, 1 up to and including EOS


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
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rules=(),
    unroll_layers: bool = True,
) -> Samples:
    """Sample up to ``max_new_tokens`` per row. Jit-compatible (all options static).

    model: a ``Transformer`` with the LM head; params: its params (scanned or not);
    prompt_tokens, prompt_mask: (B, P) left-padded; rng: a key (token i uses fold_in(rng, i)).
    temperature 0 is greedy decoding. ``unroll_layers=False`` keeps a scanned model's layer
    scan (faster compiles for very deep models, one cache copy per step).
    Returns Samples(tokens, logprobs, mask), each (B, max_new_tokens).
    """
    cfg = model.cfg
    if cfg.scan_layers and unroll_layers:
        cfg = dataclasses.replace(cfg, scan_layers=False)
        model = Transformer(cfg, head=model.head)
        params = unstack_layers(params, cfg.num_layers)
    batch, prompt_len = prompt_tokens.shape
    slots = prompt_len + max_new_tokens - 1
    prompt_mask = prompt_mask.astype(jnp.int32)
    kv_mask = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens - 1)))  # (B, S)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # (B, P)
    first_position = positions[:, -1]  # (B,) position of the last prompt token

    def apply(tokens, positions, kv_mask, cache, index):
        with nn.logical_axis_rules(rules):
            return model.apply(
                {"params": params},
                tokens,
                positions=positions,
                attention_mask=kv_mask,
                cache=cache,
                cache_index=index,
            )

    def constrain(cache):
        with nn.logical_axis_rules(rules):
            axes = CACHE_AXES if not cfg.scan_layers else ("layers", *CACHE_AXES)
            return jax.tree.map(lambda x: nn.with_logical_constraint(x, axes), cache)

    def pick(logits, key):
        """logits (B, V) -> (token (B,), its log-prob under the sampling distribution)."""
        if temperature == 0.0:
            filtered = logits
            token = jnp.argmax(logits, axis=-1)
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p)
            token = inverse_cdf_sample(key, filtered)
        logp = jnp.take_along_axis(jax.nn.log_softmax(filtered), token[:, None], axis=-1)[:, 0]
        return token.astype(jnp.int32), logp

    cache = constrain(init_cache(cfg, batch, slots))
    if prompt_len > 1:  # prefill all but the last prompt token; its logits are dead code
        _, cache = apply(prompt_tokens[:, :-1], positions[:, :-1], kv_mask, cache, 0)
        cache = constrain(cache)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, kv_mask, out, done = carry
        out_tokens, out_logps, out_mask = out
        slot = prompt_len - 1 + i  # where ``token`` goes
        kv_mask = jax.lax.dynamic_update_index_in_dim(
            kv_mask, jnp.ones((batch,), jnp.int32), slot, axis=1
        )
        pos = (first_position + i)[:, None]  # (B, 1)
        logits, cache = apply(token[:, None], pos, kv_mask, cache, slot)
        new, logp = pick(logits[:, 0], jax.random.fold_in(rng, i))
        new = jnp.where(done, pad_id, new)
        out_tokens = jax.lax.dynamic_update_index_in_dim(out_tokens, new, i, axis=1)
        out_logps = jax.lax.dynamic_update_index_in_dim(
            out_logps, jnp.where(done, 0.0, logp), i, axis=1
        )
        out_mask = jax.lax.dynamic_update_index_in_dim(
            out_mask, (~done).astype(jnp.int32), i, axis=1
        )
        done = done | (new == eos_id)
        return i + 1, new, constrain(cache), kv_mask, (out_tokens, out_logps, out_mask), done

    out = (
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch, max_new_tokens), jnp.int32),
    )
    done = jnp.zeros((batch,), bool)
    carry = (jnp.int32(0), prompt_tokens[:, -1].astype(jnp.int32), cache, kv_mask, out, done)
    _, _, _, _, (tokens, logprobs, mask), _ = jax.lax.while_loop(cond, body, carry)
    return Samples(tokens=tokens, logprobs=logprobs, mask=mask)
