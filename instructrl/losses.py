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


def ranking_loss(
    rewards: jax.Array, ranks: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reward model's K-way ranking loss, paper eq. (1), all pairs of a prompt in one element.

    loss = -1/C(K,2) E[log sigmoid(r(x, y_w) - r(x, y_l))]: for each prompt, the mean over its
    ordered pairs (y_w ranked strictly better than y_l) of -log sigmoid(r_w - r_l); then the
    mean over prompts that have at least one ordered pair (others carry no weight).

    rewards: (B, K) float; ranks: (B, K) int, 0 = best, equal ranks are ties (no pair);
    mask: (B, K) bool, real responses (K varies per prompt).
    Returns (loss, metrics): accuracy (pair-weighted fraction with r_w > r_l), num_pairs,
    num_prompts, reward_mean, reward_std over real responses.
    """
    rewards = rewards.astype(jnp.float32)
    mask = mask.astype(bool)
    better = ranks[:, :, None] < ranks[:, None, :]  # (B, K, K): i ranked above j
    pairs = better & mask[:, :, None] & mask[:, None, :]
    pairs_f = pairs.astype(jnp.float32)
    margin = rewards[:, :, None] - rewards[:, None, :]  # r_i - r_j
    pair_loss = -jax.nn.log_sigmoid(margin)
    per_prompt_pairs = pairs_f.sum(axis=(1, 2))  # (B,)
    per_prompt = (pair_loss * pairs_f).sum(axis=(1, 2)) / jnp.maximum(per_prompt_pairs, 1.0)
    has_pairs = (per_prompt_pairs > 0).astype(jnp.float32)
    num_prompts = has_pairs.sum()
    loss = (per_prompt * has_pairs).sum() / jnp.maximum(num_prompts, 1.0)
    num_pairs = pairs_f.sum()
    correct = ((margin > 0) & pairs).astype(jnp.float32).sum()
    count = jnp.maximum(mask.sum(), 1)
    mean = jnp.where(mask, rewards, 0.0).sum() / count
    var = jnp.where(mask, jnp.square(rewards - mean), 0.0).sum() / count
    metrics = {
        "accuracy": correct / jnp.maximum(num_pairs, 1.0),
        "num_pairs": num_pairs,
        "num_prompts": num_prompts,
        "reward_mean": mean,
        "reward_std": jnp.sqrt(var),
    }
    return loss, metrics
