"""Fast autoregressive sampling with a KV cache: prefill, then decode in ``lax.while_loop``.

Left-padded prompts (B, P) of mixed length are prefilled in one pass into cache slots [0, P);
new token i goes to slot P + i, with position id (real prompt length + i), so each row is
computed exactly as if it had no padding. The cache is a loop carry, so XLA updates it in
place; rows stop at EOS and the loop exits once every row has stopped. Sampling applies
temperature, top-k and top-p (``sampling.filter_logits``). Under a mesh, the batch is split over
(data, fsdp) and heads over tensor through the model's logical axis names.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from instructrl.model import Transformer, init_cache
from instructrl.sampling import filter_logits


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
) -> Samples:
    """Sample up to ``max_new_tokens`` per row. Jit-compatible (all options static).

    model: a ``Transformer`` with the LM head; prompt_tokens, prompt_mask: (B, P) left-padded.
    temperature 0 is greedy decoding.
    """
    cfg = model.cfg
    batch, prompt_len = prompt_tokens.shape
    slots = prompt_len + max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    next_position = prompt_mask.sum(axis=1)  # (B,)

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

    def pick(logits, key):
        """logits (B, V) -> (token (B,), its log-prob under the sampling distribution)."""
        if temperature == 0.0:
            filtered = logits
            token = jnp.argmax(logits, axis=-1)
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p)
            token = jax.random.categorical(key, filtered)
        logp = jnp.take_along_axis(jax.nn.log_softmax(filtered), token[:, None], axis=-1)[:, 0]
        return token.astype(jnp.int32), logp

    cache = init_cache(cfg, batch, slots)
    logits, cache = apply(prompt_tokens, positions, kv_mask, cache, 0)  # prefill
    token, logp = pick(logits[:, -1], jax.random.fold_in(rng, 0))
    out_tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    out_logp = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logp)
    out_mask = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(1)
    done = token == eos_id

    def cond(carry):
        i, _, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, kv_mask, out, logps, done = carry
        out_tokens, out_mask = out
        slot = prompt_len + i - 1  # where the previous token goes
        kv_mask = jax.lax.dynamic_update_index_in_dim(
            kv_mask, jnp.ones((batch,), jnp.int32), slot, axis=1
        )
        pos = (next_position + i - 1)[:, None]
        logits, cache = apply(token[:, None], pos, kv_mask, cache, slot)
        new, logp = pick(logits[:, 0], jax.random.fold_in(rng, i))
        new = jnp.where(done, pad_id, new)
        out_tokens = jax.lax.dynamic_update_index_in_dim(out_tokens, new, i, axis=1)
        out_mask = jax.lax.dynamic_update_index_in_dim(out_mask, (~done).astype(jnp.int32), i, 1)
        logps = jax.lax.dynamic_update_index_in_dim(logps, jnp.where(done, 0.0, logp), i, 1)
        done = done | (new == eos_id)
        return i + 1, new, cache, kv_mask, (out_tokens, out_mask), logps, done

    carry = (jnp.int32(1), token, cache, kv_mask, (out_tokens, out_mask), out_logp, done)
    _, _, _, _, (out_tokens, out_mask), out_logp, _ = jax.lax.while_loop(cond, body, carry)
    return Samples(tokens=out_tokens, logprobs=out_logp, mask=out_mask)
