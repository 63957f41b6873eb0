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


def plackett_luce_loss(
    rewards: jax.Array, ranks: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The listwise loss of a K-way ranking: -log of its Plackett-Luce likelihood (Plackett
    1975; Luce 1959; the DPO paper's appendix A.3 uses it with implicit rewards).

    Each response i that some response is ranked strictly below contributes
    -log(exp(r_i) / (exp(r_i) + sum over j ranked strictly worse than i of exp(r_j))): the
    probability that i is chosen first among itself and everything it beats. Tied responses
    are never in each other's denominator (no comparison between them, as ``ranking_loss``
    makes no pair of a tie); without ties this is exactly the Plackett-Luce likelihood of the
    order (the last response's term is log 1). Per prompt the mean over its terms, then the
    mean over prompts with at least one term.

    rewards: (B, K); ranks: (B, K) int, 0 = best; mask: (B, K) bool. Returns (loss, metrics):
    accuracy (pairwise, as ``ranking_loss``), num_terms, num_prompts.
    """
    rewards = rewards.astype(jnp.float32)
    mask = mask.astype(bool)
    worse = (ranks[:, None, :] > ranks[:, :, None]) & mask[:, :, None] & mask[:, None, :]
    pool = worse | jnp.eye(rewards.shape[1], dtype=bool)[None]  # (B, K, K): i and what it beats
    logits = jnp.where(pool, rewards[:, None, :], -jnp.inf)
    terms = jax.nn.logsumexp(logits, axis=-1) - rewards  # (B, K): -log P(i first in its pool)
    has_term = worse.any(-1) & mask
    per_prompt_terms = has_term.sum(-1).astype(jnp.float32)
    per_prompt = jnp.where(has_term, terms, 0.0).sum(-1) / jnp.maximum(per_prompt_terms, 1.0)
    has_prompt = (per_prompt_terms > 0).astype(jnp.float32)
    num_prompts = has_prompt.sum()
    loss = (per_prompt * has_prompt).sum() / jnp.maximum(num_prompts, 1.0)
    margin = rewards[:, :, None] - rewards[:, None, :]
    correct = ((margin > 0) & worse).astype(jnp.float32).sum()
    metrics = {
        "accuracy": correct / jnp.maximum(worse.astype(jnp.float32).sum(), 1.0),
        "num_terms": per_prompt_terms.sum(),
        "num_prompts": num_prompts,
    }
    return loss, metrics


def dpo_loss(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    ranks: jax.Array,
    mask: jax.Array,
    beta: float,
    listwise: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO (Rafailov et al. 2023) on K-way rankings: the implicit reward of a response is
    beta * (log pi(y|x) - log pi_ref(y|x)), summed over its tokens, and it enters eq. (1) in
    place of the reward model's (every C(K,2) pair of a prompt, ``ranking_loss``) or, with
    ``listwise``, the Plackett-Luce loss of the whole ranking (``plackett_luce_loss``). With
    K = 2 both are DPO's -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).

    logprobs, ref_logprobs: (B, K) sequence log-probs; ranks, mask: (B, K).
    Returns (loss, metrics): the chosen loss's metrics, the implicit rewards' mean and the
    mean log-ratio of real responses (an estimate of KL(pi || pi_ref) on the data's responses
    only when they come from pi).
    """
    log_ratio = (logprobs - ref_logprobs).astype(jnp.float32)
    rewards = beta * log_ratio
    if listwise:
        loss, metrics = plackett_luce_loss(rewards, ranks, mask)
    else:
        loss, metrics = ranking_loss(rewards, ranks, mask)
    metrics = {k: v for k, v in metrics.items() if not k.startswith("reward_")}
    metrics["reward_mean"] = masked_mean(rewards, mask)
    metrics["log_ratio"] = masked_mean(log_ratio, mask)
    return loss, metrics


# --- PPO (paper eq. 2; Ziegler et al. 2019; Schulman et al. 2017) ------------------------------


def last_index(mask: jax.Array) -> jax.Array:
    """Index (B,) of the last position where mask (B, T) is 1 (0 for an empty row)."""
    t = mask.shape[-1]
    idx = jnp.where(mask.astype(bool), jnp.arange(t), -1).max(axis=-1)
    return jnp.maximum(idx, 0)


def kl_penalized_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array,
) -> jax.Array:
    """Per-token rewards: -kl_coef * (log pi - log pi_ref), plus the RM score at the last token.

    scores: (B,) reward-model scores; logprobs, ref_logprobs, mask: (B, T), mask marking
    response tokens. kl_coef is beta in eq. 2. Returns (B, T), zero outside the mask.
    """
    mask = mask.astype(jnp.float32)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = jax.nn.one_hot(last_index(mask), mask.shape[-1], dtype=jnp.float32) * mask
    return rewards + scores[:, None] * last


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016) as a reverse ``lax.scan``.

    rewards, values, mask: (B, T); values after the last masked position count as 0.
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    Returns (advantages, returns = advantages + values), both (B, T) and zero outside the mask.
    """
    mask = mask.astype(jnp.float32)
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def step(carry, xs):
        delta, m_next = xs
        adv = delta + gamma * lam * m_next * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), (deltas.T, next_mask.T), reverse=True)
    advantages = adv.T * mask
    return advantages, (advantages + values) * mask


def group_advantages(returns: jax.Array, group_size: int, kind: str) -> jax.Array:
    """Critic-free advantages of (B,) sequence returns, the B rows being B / k groups of k
    answers to one prompt each (consecutive rows):

      rloo  R_i - mean of the other k - 1 answers' R (REINFORCE leave-one-out; Kool et al.
            2019, Ahmadian et al. 2024): an unbiased baseline from the same prompt
      grpo  (R_i - mean of the group) / (std of the group + 1e-4), the std over the k with
            Bessel's correction (GRPO, Shao et al. 2024)

    Returns (B,) float32."""
    k = group_size
    if k < 2:
        raise ValueError(f"{kind} needs at least 2 answers per prompt, got group size {k}")
    r = returns.astype(jnp.float32).reshape(-1, k)
    if kind == "rloo":
        baseline = (r.sum(1, keepdims=True) - r) / (k - 1)
        return (r - baseline).reshape(-1)
    if kind == "grpo":
        return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(
            -1
        )
    raise ValueError(f"group advantages are 'rloo' or 'grpo', got {kind!r}")


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) on tokens drawn from pi: exp(d) - d - 1 with
    d = log pi_ref - log pi (Schulman 2020's k3: unbiased and never negative), GRPO's KL
    term."""
    d = ref_logprobs - logprobs
    return jnp.exp(d) - d - 1.0


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / std over the masked entries (all rows together); with shift_mean=False the
    mean is added back (scale only). Zero outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(x.dtype)


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate objective (Schulman et al. 2017), a loss to minimize.

    All (B, T); the mean is over masked tokens. Metrics: clipfrac (tokens whose ratio left the
    clip range), approx_kl (mean of (r - 1) - log r, Schulman's low-variance estimator).
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) over masked tokens, with
    V_clip = V_old + clip(V - V_old, -clip_eps, clip_eps). All (B, T)."""
    clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    err = jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    loss = 0.5 * masked_mean(err, mask)
    metrics = {
        "value_clipfrac": masked_mean(
            (jnp.abs(values - old_values) > clip_eps).astype(jnp.float32), mask
        ),
    }
    return loss, metrics


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[R - V] / Var[R] over masked tokens."""
    var_r = masked_mean(jnp.square(returns - masked_mean(returns, mask)), mask)
    resid = returns - values
    var_e = masked_mean(jnp.square(resid - masked_mean(resid, mask)), mask)
    return 1.0 - var_e / jnp.maximum(var_r, 1e-8)


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean entropy of the token distributions (B, T, V) over masked positions; tokens a
    top-k / top-p filter excluded (logit -inf) contribute 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0).sum(-1)
    return masked_mean(ent, mask)
