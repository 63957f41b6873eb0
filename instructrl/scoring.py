"""Scoring sampled responses: teacher-forced log-probs, values, reward scores and sequence KL.

One module for what PPO, evaluation, the rankings stage and the experiments measure on
(prompt, response) batches, so that each quantity is computed one way everywhere:

  response_logprobs  log pi(y_t | x, y_<t) under the *same filtered distribution the sampler
                     draws from* (temperature, top-k, top-p: ``sampler.filter_logits``), so a
                     PPO ratio compares like with like at T != 1
  response_values    a scalar-head model's outputs at the state before each response token
  reward_scores      the reward model's score, read at each response's last token (its EOS)
  rewards_at_last    the RM's scores of K responses per prompt, (B, K, T) -> (B, K)
  sequence_kl        sum over response tokens of log pi - log pi_ref (a sample estimate of
                     KL(pi || pi_ref) on responses drawn from pi)

Prompts are left-padded (B, P) with a mask; responses (B, N) with a mask marking tokens through
EOS. The reference policy's log-probs are taken at the sampling temperature without top-k /
top-p truncation (``reference_sampling``): a token the policy samples may lie outside the
reference's truncated support, where a truncated log-prob would be -inf and the KL infinite.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from instructrl import losses
from instructrl.model import Transformer
from instructrl.sampler import filter_logits, is_identity


@dataclasses.dataclass(frozen=True)
class Models:
    """The two model definitions of the pipeline (one trunk, two heads) and the logical rules."""

    policy: Transformer  # LM head: policy, reference, SFT
    scalar: Transformer  # scalar head: reward and value models
    rules: tuple


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling distribution: what ``sampler.generate`` draws from and ``scoring`` scores."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def reference(self) -> Sampling:
        """The reference policy's distribution: the same temperature, no truncation."""
        return Sampling(temperature=self.temperature)


def apply(model: Transformer, rules, params, tokens, mask, head_positions=None):
    """model(tokens) with ``mask`` as the attention mask, under the logical rules (the head on
    ``head_positions`` only, when given)."""
    with nn.logical_axis_rules(rules):
        return model.apply(
            {"params": params}, tokens, attention_mask=mask, head_positions=head_positions
        )


def _full(prompt_tokens, prompt_mask, tokens, mask):
    full = jnp.concatenate([prompt_tokens, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    return full, full_mask


def response_logprobs(
    models: Models, params, prompt_tokens, prompt_mask, tokens, mask, sampling=Sampling()
):
    """Teacher-forced log-probs (B, N) of the response tokens and the filtered logits
    (B, N, V) they come from (-inf where top-k / top-p exclude a token)."""
    full, full_mask = _full(prompt_tokens, prompt_mask, tokens, mask)
    p, n = prompt_tokens.shape[1], tokens.shape[1]
    logits = apply(models.policy, models.rules, params, full, full_mask, (p - 1, p + n - 1))
    if not is_identity(sampling.temperature, sampling.top_k, sampling.top_p):
        logits = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return losses.token_logprobs(logits, tokens), logits


def response_values(models: Models, params, prompt_tokens, prompt_mask, tokens, mask):
    """Scalar-head outputs (B, N) at the state before each response token."""
    full, full_mask = _full(prompt_tokens, prompt_mask, tokens, mask)
    p, n = prompt_tokens.shape[1], tokens.shape[1]
    return apply(models.scalar, models.rules, params, full, full_mask, (p - 1, p + n - 1))


def reward_scores(models: Models, rm_params, prompt_tokens, prompt_mask, tokens, mask):
    """RM score (B,) read at each response's last token (its EOS when it has one)."""
    full, full_mask = _full(prompt_tokens, prompt_mask, tokens, mask)
    values = apply(models.scalar, models.rules, rm_params, full, full_mask)  # (B, P + N)
    last = prompt_tokens.shape[1] + losses.last_index(mask)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def rewards_at_last(model: Transformer, params, tokens, last, rules, **kwargs) -> jax.Array:
    """Scalar rewards (B, K) of K right-padded sequences per prompt, tokens (B, K, T), read at
    index ``last`` (B, K) (each sequence's EOS). kwargs go to ``model.apply`` (dropout)."""
    b, k, t = tokens.shape
    with nn.logical_axis_rules(rules):
        values = model.apply({"params": params}, tokens.reshape(b * k, t), **kwargs)  # (BK, T)
    picked = jnp.take_along_axis(values, last.reshape(b * k, 1), axis=1)[:, 0]
    return picked.reshape(b, k)


def sequence_kl(logprobs, ref_logprobs, mask):
    """(B,) sum over response tokens of log pi - log pi_ref (NumPy or JAX arrays, (B, N))."""
    return ((logprobs - ref_logprobs) * mask).sum(axis=1)


def ended_with_eos(tokens, mask, eos_id: int):
    """(B,) whether each response emitted EOS (rather than being cut at max_new_tokens)."""
    return ((tokens == eos_id) & (mask > 0)).any(axis=1)
