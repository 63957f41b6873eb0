"""The algorithm's math as small pure functions over (B, T) arrays.

Each is tested against a float64 NumPy formula in ``tests/test_losses.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets] in float32.

    logits: (B, T, V); targets: (B, T) int. Returns (B, T).
    """
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def masked_nll(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean negative log-likelihood over the tokens where mask is 1.

    logits: (B, T, V) float; targets: (B, T) int; mask: (B, T) 0/1.
    Returns (loss scalar, num_tokens scalar). The mean is over all masked tokens of the whole
    (global) batch, not per row, so every token weighs the same. A batch with no masked token
    has loss 0.
    """
    mask = mask.astype(jnp.float32)
    nll = -token_logprobs(logits, targets)  # (B, T)
    num_tokens = mask.sum()
    return (nll * mask).sum() / jnp.maximum(num_tokens, 1.0), num_tokens
