"""PPO over packed (prompt, response) rows equals PPO over the left-padded batch.

``scoring.pack`` lays each pair side by side in rows with its own positions and segment, so
every log-prob, value and RM score must equal the padded layout's (to float32 rounding), and
one PPO iteration with ``hp.pack`` (the same samples, the same minibatches, each packed) must
leave the same state as without it: on one device and with the rows split over 8.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from instructrl import ppo, scoring, sharding
from instructrl.data.lm import left_pad
from instructrl.model import Transformer
from instructrl.presets import preset

VOCAB, EOS, PAD = 61, 60, 0


def _models():
    cfg = preset("tiny", vocab_size=VOCAB)
    rules = sharding.LOGICAL_RULES
    return scoring.Models(Transformer(cfg, head="lm"), Transformer(cfg, head="scalar"), rules)


def _params(models, seed):
    tokens = jnp.zeros((1, 4), jnp.int32)
    lm = nn.unbox(models.policy.init(jax.random.key(seed), tokens)["params"])
    scalar = nn.unbox(models.scalar.init(jax.random.key(seed + 1), tokens)["params"])
    return lm, scalar


def _pairs(batch=12, prompt_len=10, new=7, seed=0):
    """Left-padded prompts of 2..prompt_len tokens and responses of 1..new tokens (mask
    through the last), padding elsewhere."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, EOS, size=rng.integers(2, prompt_len + 1)) for _ in range(batch)]
    prompt_tokens, prompt_mask = left_pad(prompts, PAD, prompt_len)
    tokens = np.full((batch, new), PAD, np.int32)
    mask = np.zeros((batch, new), np.int32)
    for b in range(batch):
        n = int(rng.integers(1, new + 1))
        tokens[b, :n] = rng.integers(1, EOS, size=n)
        mask[b, :n] = 1
    return prompt_tokens, prompt_mask, tokens, mask


def test_pack_lays_out_each_pair_once_with_its_own_positions():
    pt, pm, t, m = _pairs()
    fewest = scoring.pack(pt, pm, t, m, row_len=17, rows=tuple(range(1, 13))).tokens.shape[0]
    assert fewest < 12  # pairs share rows
    with pytest.raises(ValueError, match="do not fit"):
        scoring.pack(pt, pm, t, m, row_len=17, rows=(fewest - 1,))
    packed = scoring.pack(pt, pm, t, m, row_len=17, rows=(fewest - 1, fewest, 12))
    assert packed.tokens.shape[0] == fewest  # the fewest candidate rows that hold them
    chex.assert_shape(packed.index, t.shape)
    flat = packed.tokens.reshape(-1)
    for b in range(len(t)):
        n, p = int(m[b].sum()), int(pm[b].sum())
        # The state before response token i is the previous token: the prompt's last, then i-1.
        before = np.concatenate([pt[b, -1:], t[b, : n - 1]])
        np.testing.assert_array_equal(flat[packed.index[b, :n]], before)
        assert flat[packed.last[b]] == t[b, n - 1]
        seg = packed.segment_ids.reshape(-1)[packed.last[b]]
        assert (packed.segment_ids == seg).sum() >= p + n  # whole pair in one segment
    assert (packed.segment_ids > 0).sum() == int(pm.sum() + m.sum())


def test_packed_scores_equal_padded_scores():
    models = _models()
    lm, scalar = _params(models, 0)
    pt, pm, t, m = _pairs()
    packed = scoring.pack(pt, pm, t, m, row_len=17, rows=(6, 12))
    args = tuple(map(jnp.asarray, (pt, pm, t, m)))
    sampling = scoring.Sampling(0.7)  # the filtered distribution, as PPO scores
    want, _ = scoring.response_logprobs(models, lm, *args, sampling)
    got, _ = scoring.response_logprobs(models, lm, *args, sampling, packed=packed)
    on = m > 0  # response tokens (past them, each layout pads its own way)
    np.testing.assert_allclose(np.asarray(got)[on], np.asarray(want)[on], atol=2e-5)
    want = scoring.response_values(models, scalar, *args)
    got = scoring.response_values(models, scalar, *args, packed=packed)
    np.testing.assert_allclose(np.asarray(got)[on], np.asarray(want)[on], atol=2e-5)
    want = scoring.reward_scores(models, scalar, *args)
    got = scoring.reward_scores(models, scalar, *args, packed=packed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # An RM that averages its head over the response: the same in both layouts, and the
    # float64 mean of the head's outputs on the response tokens of the padded rows.
    cfg = dataclasses.replace(models.scalar.cfg, reward_readout="mean")
    mean_models = dataclasses.replace(models, scalar=Transformer(cfg, head="scalar"))
    want = np.asarray(scoring.reward_scores(mean_models, scalar, *args))
    got = scoring.reward_scores(mean_models, scalar, *args, packed=packed)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    full = np.asarray(scoring.apply(models.scalar, models.rules, scalar,
                                    *scoring._full(*args)), np.float64)  # fmt: skip
    p = pt.shape[1]
    for b in range(len(t)):
        assert abs(want[b] - full[b, p : p + int(m[b].sum())].mean()) < 2e-5
    assert not np.allclose(want, np.asarray(scoring.reward_scores(models, scalar, *args)))


def test_packed_iteration_equals_padded_iteration():
    """One make_step iteration (sample, score, advantages, 2 minibatch updates) with and
    without packing, from the same state and key, on 8 sharded devices: the same metrics and
    parameters."""
    models = _models()
    mesh = sharding.make_mesh({"data": 8}, jax.devices())
    hp = ppo.Hparams(
        kl_coef=0.1, target_kl=0.0, kl_horizon=1e4, ptx_coef=0.0, clip_eps=0.2,
        value_clip_eps=0.2, gamma=1.0, lam=0.95, whiten_advantages=True,
        whiten_rewards=False, score_clip=0.0, no_eos_penalty=None, num_minibatches=2,
        epochs=1, ema_decay=0.992, max_new_tokens=7, sampling=scoring.Sampling(),
        eos_id=EOS, pad_id=PAD,
    )  # fmt: skip
    # SGD: an update is linear in the gradient, so the layouts' rounding stays at its level
    # (Adam would blow a rounding-level gradient up to a full step of either sign).
    tx, value_tx = optax.sgd(0.5), optax.sgd(0.5)
    lm, scalar = _params(models, 3)
    pt, pm, _, _ = _pairs(batch=16, seed=1)
    batch = sharding.shard_batch({"prompt_tokens": pt, "prompt_mask": pm}, mesh)
    results = []
    for pack in (False, True):
        h = dataclasses.replace(hp, pack=pack)
        init = ppo.state_init(models, h, tx, value_tx)
        state, _, _ = sharding.create_sharded(init, mesh, models.rules, jax.random.key(0))
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the state is donated)
        state = state.replace(
            params=copy(lm),
            ema_params=copy(lm),
            value_params=copy(scalar),
            opt_state=tx.init(lm),
            value_opt_state=value_tx.init(scalar),
        )
        frozen = {"ref": lm, "rm": scalar}
        step = ppo.make_step(models, h, tx, value_tx, frozen, mesh)
        state, metrics = step(state, batch, jax.random.key(7))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p0, m0), (p1, m1) = results
    for key in ("score", "kl_to_ref", "policy_loss", "value_loss", "approx_kl", "entropy"):
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-4, atol=1e-5, err_msg=key)
    step0 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p0, lm)
    step1 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p1, lm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), step1, step0)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(step0)) > 1e-3  # it did move
