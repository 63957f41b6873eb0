"""Scoring sampled responses: teacher-forced log-probs, values, reward scores and sequence KL.

One module for what PPO, evaluation, the rankings stage and the experiments measure on
(prompt, response) batches, so that each quantity is computed one way everywhere:

  response_logprobs  log pi(y_t | x, y_<t) under the *same filtered distribution the sampler
                     draws from* (temperature, top-k, top-p: ``sampler.filter_logits``), so a
                     PPO ratio compares like with like at T != 1
  response_values    a scalar-head model's outputs at the state before each response token
  reward_scores      the reward model's score of each response (``span_rewards``: the head at
                     its last token, its EOS, or averaged over its tokens: ``reward_readout``)
  ranking_rewards    the RM's scores of K responses per prompt, (B, K, T) -> (B, K)
  sequence_kl        sum over response tokens of log pi - log pi_ref (a sample estimate of
                     KL(pi || pi_ref) on responses drawn from pi)

Prompts are left-padded (B, P) with a mask; responses (B, N) with a mask marking tokens through
EOS. The reference policy's log-probs are taken at the sampling temperature without top-k /
top-p truncation (``reference_sampling``): a token the policy samples may lie outside the
reference's truncated support, where a truncated log-prob would be -inf and the KL infinite.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
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


@flax.struct.dataclass
class Packed:
    """B (prompt, response) pairs packed side by side into R rows of L tokens: each pair keeps
    its own positions from 0 and attends within its own segment only, so every score equals
    the left-padded layout's while the model runs over about the tokens the pairs really have
    (a rollout's prompts are left-padded to the longest, its responses right-padded to the
    longest). Built on the host by ``pack``.

    tokens, positions, segment_ids (R, L) int32 (segment 0: padding); index (B, N) int32: the
    flat position (row * L + column) of the state before each response token (its logits
    predict that token; positions past a response's end repeat its last state and are masked
    by the caller); last (B,) int32: the flat position of each response's last token.
    """

    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    last: jax.Array


def pack(prompt_tokens, prompt_mask, tokens, mask, row_len: int, rows: tuple[int, ...]) -> Packed:
    """Pack rows of a left-padded prompt batch (B, P) and its responses (B, N) (host arrays)
    into the fewest of ``rows`` (candidate row counts, ascending) rows of ``row_len`` tokens
    that first-fit-decreasing packing fills; the largest candidate must hold one pair per row.
    Returns a ``Packed`` of NumPy arrays."""
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    batch, n = tokens.shape
    prompt_len = prompt_mask.sum(1).astype(int)
    response_len = np.maximum(mask.sum(1).astype(int), 1)
    lengths = prompt_len + response_len
    if lengths.max() > row_len:
        raise ValueError(
            f"a prompt and response of {lengths.max()} tokens exceed rows of {row_len}"
        )
    order = np.argsort(-lengths, kind="stable")
    placed = None
    for num_rows in rows:
        room, where = [row_len] * num_rows, {}
        for b in order:
            r = next((r for r in range(num_rows) if room[r] >= lengths[b]), None)
            if r is None:
                break
            where[b] = (r, row_len - room[r])
            room[r] -= int(lengths[b])
        if len(where) == batch:
            placed = (num_rows, where)
            break
    if placed is None:
        raise ValueError(f"{batch} pairs do not fit in {rows[-1]} rows of {row_len} tokens")
    num_rows, where = placed
    out = {
        k: np.zeros((num_rows, row_len), np.int32) for k in ("tokens", "positions", "segment_ids")
    }
    index = np.zeros((batch, n), np.int32)
    last = np.zeros((batch,), np.int32)
    segment = np.zeros(num_rows, np.int32)
    for b in range(batch):
        r, at = where[b]
        p, m = int(prompt_len[b]), int(response_len[b])
        seq = np.concatenate([prompt_tokens[b, prompt_tokens.shape[1] - p :], tokens[b, :m]])
        segment[r] += 1
        out["tokens"][r, at : at + p + m] = seq
        out["positions"][r, at : at + p + m] = np.arange(p + m)
        out["segment_ids"][r, at : at + p + m] = segment[r]
        before = r * row_len + at + p - 1 + np.minimum(np.arange(n), m - 1)  # state before t
        index[b] = before
        last[b] = r * row_len + at + p + m - 1
    return Packed(out["tokens"], out["positions"], out["segment_ids"], index, last)


def apply_packed(model: Transformer, rules, params, packed: Packed, index):
    """model over the packed rows, its head applied at ``index`` (flat positions)."""
    with nn.logical_axis_rules(rules):
        return model.apply(
            {"params": params},
            packed.tokens,
            positions=packed.positions,
            segment_ids=packed.segment_ids,
            head_index=index,
        )


def _full(prompt_tokens, prompt_mask, tokens, mask):
    full = jnp.concatenate([prompt_tokens, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    return full, full_mask


def response_logprobs(
    models: Models,
    params,
    prompt_tokens,
    prompt_mask,
    tokens,
    mask,
    sampling=Sampling(),
    packed: Packed | None = None,
):
    """Teacher-forced log-probs (B, N) of the response tokens and the filtered logits
    (B, N, V) they come from (-inf where top-k / top-p exclude a token). With ``packed`` (the
    same pairs from ``pack``) the model runs over the packed rows; the prompt arguments are
    then unused."""
    if packed is not None:
        logits = apply_packed(models.policy, models.rules, params, packed, packed.index)
    else:
        full, full_mask = _full(prompt_tokens, prompt_mask, tokens, mask)
        p, n = prompt_tokens.shape[1], tokens.shape[1]
        logits = apply(models.policy, models.rules, params, full, full_mask, (p - 1, p + n - 1))
    if not is_identity(sampling.temperature, sampling.top_k, sampling.top_p):
        logits = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return losses.token_logprobs(logits, tokens), logits


def response_values(models: Models, params, prompt_tokens, prompt_mask, tokens, mask,
                    packed: Packed | None = None):  # fmt: skip
    """Scalar-head outputs (B, N) at the state before each response token (``packed``: as in
    ``response_logprobs``)."""
    if packed is not None:
        return apply_packed(models.scalar, models.rules, params, packed, packed.index)
    full, full_mask = _full(prompt_tokens, prompt_mask, tokens, mask)
    p, n = prompt_tokens.shape[1], tokens.shape[1]
    return apply(models.scalar, models.rules, params, full, full_mask, (p - 1, p + n - 1))


def reward_scores(models: Models, rm_params, prompt_tokens, prompt_mask, tokens, mask,
                  packed: Packed | None = None):  # fmt: skip
    """RM score (B,) of each response, read as ``models.scalar``'s ``reward_readout`` says
    (``span_rewards``); ``packed``: as in ``response_logprobs``."""
    readout = models.scalar.cfg.reward_readout
    if packed is not None:
        if readout == "last":  # the head at the last tokens only
            return apply_packed(models.scalar, models.rules, rm_params, packed, packed.last)
        values = apply_packed(models.scalar, models.rules, rm_params, packed, None)  # (R, L)
        first = packed.index[:, 0] + 1  # the state before a response's first token, + 1
        return span_rewards(values.reshape(-1), first, packed.last, readout, packed.index.shape[1])
    full, full_mask = _full(prompt_tokens, prompt_mask, tokens, mask)
    values = apply(models.scalar, models.rules, rm_params, full, full_mask)  # (B, P + N)
    p, width = prompt_tokens.shape[1], values.shape[1]
    rows = jnp.arange(values.shape[0]) * width
    last = rows + p + losses.last_index(mask)
    return span_rewards(values.reshape(-1), rows + p, last, readout, tokens.shape[1])


def span_rewards(values, first, last, readout: str, width: int) -> jax.Array:
    """A reward model's score of each response from its scalar head's outputs ``values`` (L,)
    (rows flattened): "last" (the paper's) the output at flat position ``last`` (an int array
    of any shape, each response's last token); "mean" the mean of the outputs at positions
    ``first`` .. ``last`` (the response's tokens, at most ``width`` of them). A reward read
    at one token depends on that token's state alone; the mean lets every token of the
    response carry its share (``ModelConfig.reward_readout``)."""
    if readout == "last":
        return values[last]
    if readout != "mean":
        raise ValueError(f"model.reward_readout must be 'last' or 'mean', got {readout!r}")
    offsets = jnp.arange(width)
    inside = offsets <= (last - first)[..., None]  # (..., width)
    picked = values[jnp.minimum(first[..., None] + offsets, last[..., None])]
    return jnp.where(inside, picked, 0.0).sum(-1) / inside.sum(-1)


def ranking_rewards(model: Transformer, params, tokens, first, last, rules, **kwargs) -> jax.Array:
    """Scalar rewards (B, K) of K right-padded sequences per prompt, tokens (B, K, T), each
    response running from index ``first`` (B, K) (after its prompt) to ``last`` (B, K) (its
    EOS), read by ``span_rewards``. kwargs go to ``model.apply`` (dropout)."""
    b, k, t = tokens.shape
    with nn.logical_axis_rules(rules):
        values = model.apply({"params": params}, tokens.reshape(b * k, t), **kwargs)  # (BK, T)
    rows = jnp.arange(b * k).reshape(b, k) * t
    return span_rewards(values.reshape(-1), rows + first, rows + last, model.cfg.reward_readout, t)


def sequence_kl(logprobs, ref_logprobs, mask):
    """(B,) sum over response tokens of log pi - log pi_ref (NumPy or JAX arrays, (B, N))."""
    return ((logprobs - ref_logprobs) * mask).sum(axis=1)


def ended_with_eos(tokens, mask, eos_id: int):
    """(B,) whether each response emitted EOS (rather than being cut at max_new_tokens)."""
    return ((tokens == eos_id) & (mask > 0)).any(axis=1)
