"""A simple jit-compiled sampler: full forward pass per new token, no KV cache.

Enough for evaluation samples during SFT on small models. Left-padded prompts of mixed length
are handled through the attention mask and mask-derived positions; rows stop at EOS and the
loop exits early once every row has stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering. logits: (B, V) float32."""
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


def sample(
    apply_fn: Callable,
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
):
    """Sample continuations of left-padded prompts.

    apply_fn(params, tokens (B, T), attention_mask (B, T)) -> logits (B, T, V).
    prompt_tokens, prompt_mask: (B, P). temperature 0 means greedy.
    Returns tokens (B, N), logprobs (B, N) of the sampled tokens under the (filtered) sampling
    distribution, and response_mask (B, N): 1 up to and including each row's EOS.
    """
    batch, prompt_len = prompt_tokens.shape
    total = prompt_len + max_new_tokens
    tokens = jnp.concatenate(
        [prompt_tokens, jnp.full((batch, max_new_tokens), pad_id, prompt_tokens.dtype)], axis=1
    )
    mask = jnp.concatenate(
        [prompt_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1
    )
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, mask, logprobs, done = carry
        pos = prompt_len + i
        logits = apply_fn(params, tokens, mask)  # (B, T, V)
        logits = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
        if temperature == 0.0:
            next_token = jnp.argmax(logits, axis=-1)
            filtered = logits
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p)
            next_token = jax.random.categorical(jax.random.fold_in(rng, i), filtered)
        logp = jax.nn.log_softmax(filtered)[jnp.arange(batch), next_token]
        next_token = jnp.where(done, pad_id, next_token).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token, pos, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, (~done).astype(jnp.int32), pos, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(
            logprobs, jnp.where(done, 0.0, logp), i, axis=1
        )
        done = done | (next_token == eos_id)
        return i + 1, tokens, mask, logprobs, done

    _, tokens, mask, logprobs, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), tokens, mask, logprobs, done)
    )
    del total
    return tokens[:, prompt_len:], logprobs, mask[:, prompt_len:]


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None):
    """(tokens, mask) int32 arrays (B, P) with each sequence right-aligned."""
    length = length or max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        seq = seq[-length:]
        tokens[i, length - len(seq) :] = seq
        mask[i, length - len(seq) :] = 1
    return tokens, mask
