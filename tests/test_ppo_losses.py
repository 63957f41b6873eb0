"""PPO math against float64 NumPy formulas and plain Python loops, with ragged masks."""

import chex
import jax.numpy as jnp
import numpy as np

from instructrl import losses


def _ragged(rng, b, t):
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = t
    return (np.arange(t)[None] < lengths[:, None]).astype(np.float64), lengths


def test_kl_penalized_rewards():
    rng = np.random.default_rng(0)
    mask, lengths = _ragged(rng, 6, 9)
    scores, lp, ref = rng.normal(size=6), rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    out = losses.kl_penalized_rewards(scores, lp, ref, mask, 0.05)
    expected = -0.05 * (lp - ref) * mask
    for i, n in enumerate(lengths):
        if n:
            expected[i, n - 1] += scores[i]
    chex.assert_shape(out, (6, 9))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _gae_loop(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for s in reversed(range(n)):
            next_v = values[i, s + 1] if s + 1 < n else 0.0
            delta = rewards[i, s] + gamma * next_v - values[i, s]
            last = delta + gamma * lam * last
            adv[i, s] = last
    return adv, (adv + values) * mask


def test_gae_matches_python_loop():
    rng = np.random.default_rng(1)
    for gamma, lam in [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)]:
        mask, _ = _ragged(rng, 7, 11)
        rewards = rng.normal(size=(7, 11)) * mask
        values = rng.normal(size=(7, 11))  # garbage past the mask must be ignored
        adv, ret = losses.gae(jnp.asarray(rewards), jnp.asarray(values), mask, gamma, lam)
        ref_adv, ref_ret = _gae_loop(rewards, values * mask, mask, gamma, lam)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_whiten():
    rng = np.random.default_rng(2)
    mask, _ = _ragged(rng, 5, 8)
    x = rng.normal(size=(5, 8)) * 3 + 2
    sel = x[mask > 0]
    out = np.asarray(losses.whiten(x, mask))
    np.testing.assert_allclose(
        out[mask > 0], (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8), rtol=1e-4
    )
    assert np.all(out[mask == 0] == 0)
    kept = np.asarray(losses.whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(
        kept[mask > 0], (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8) + sel.mean(), rtol=1e-4
    )


def test_policy_and_value_losses():
    rng = np.random.default_rng(3)
    mask, _ = _ragged(rng, 6, 10)
    lp, old = rng.normal(size=(6, 10)) * 0.3, rng.normal(size=(6, 10)) * 0.3
    adv = rng.normal(size=(6, 10))
    eps = 0.2
    loss, m = losses.ppo_policy_loss(lp, old, adv, mask, eps)
    ratio = np.exp(lp - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    np.testing.assert_allclose(float(loss), (per * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(
        float(m["clipfrac"]), ((np.abs(ratio - 1) > eps) * mask).sum() / mask.sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(m["approx_kl"]), ((ratio - 1 - (lp - old)) * mask).sum() / mask.sum(), rtol=1e-4
    )

    v, v_old, ret = rng.normal(size=(6, 10)), rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    vloss, _ = losses.ppo_value_loss(v, v_old, ret, mask, eps)
    vclip = v_old + np.clip(v - v_old, -eps, eps)
    per_v = 0.5 * np.maximum((v - ret) ** 2, (vclip - ret) ** 2)
    np.testing.assert_allclose(float(vloss), (per_v * mask).sum() / mask.sum(), rtol=1e-5)
    ev = losses.explained_variance(ret, ret, mask)
    np.testing.assert_allclose(float(ev), 1.0, rtol=1e-6)


def test_policy_loss_gradient_vanishes_outside_clip_range():
    import jax

    adv = jnp.ones((1, 3))
    old = jnp.zeros((1, 3))
    lp = jnp.array([[0.5, 0.0, -0.5]])  # ratio 1.65 (clipped, A > 0), 1.0, 0.61
    grad = jax.grad(lambda x: losses.ppo_policy_loss(x, old, adv, jnp.ones((1, 3)), 0.2)[0])(lp)
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 1]) < 0 and float(grad[0, 2]) < 0


def test_minibatch_order_covers_rows_and_tolerates_few_ptx_rows():
    """Every rollout row is in exactly one minibatch per epoch; with fewer pretraining rows
    than minibatches each minibatch still gets one (a PPO-ptx update used to fail there)."""
    import dataclasses
    import os
    import sys

    import jax

    from instructrl import ppo
    from instructrl.tokenizer import ByteTokenizer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import ppo as ppo_config  # configs/ppo.py

    hp = ppo.Hparams.from_config(ppo_config.get_config("runlocal"), ByteTokenizer())
    hp = dataclasses.replace(hp, num_minibatches=4, epochs=2)
    idx, ptx_idx = ppo.minibatch_order(jax.random.key(0), hp, batch=16, ptx_rows=3)
    idx, ptx_idx = np.asarray(idx), np.asarray(ptx_idx)
    assert idx.shape == (8, 4) and ptx_idx.shape == (8, 1)
    for epoch in range(2):
        assert sorted(idx[4 * epoch : 4 * epoch + 4].ravel()) == list(range(16))
    assert set(ptx_idx.ravel()) <= {0, 1, 2}
    _, ptx_idx = ppo.minibatch_order(jax.random.key(0), hp, batch=16, ptx_rows=8)
    assert np.asarray(ptx_idx).shape == (8, 2)
    assert sorted(np.asarray(ptx_idx)[:4].ravel()) == list(range(8))
