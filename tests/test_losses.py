import chex
import jax
import jax.numpy as jnp
import numpy as np

from instructrl import losses


def _ref_masked_nll(logits, targets, mask):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    nll = logz - picked
    return (nll * mask).sum() / max(mask.sum(), 1), mask.sum()


def test_masked_nll_matches_float64_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        b, t, v = rng.integers(1, 5), rng.integers(1, 9), rng.integers(2, 50)
        logits = rng.normal(size=(b, t, v)) * 3
        targets = rng.integers(0, v, size=(b, t))
        mask = (rng.random((b, t)) < 0.6).astype(np.int32)
        loss, n = losses.masked_nll(jnp.asarray(logits, jnp.float32), targets, mask)
        ref, ref_n = _ref_masked_nll(logits, targets, mask)
        chex.assert_shape(loss, ())
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-6)
        assert float(n) == ref_n


def test_masked_nll_ignores_masked_tokens_and_handles_empty_mask():
    logits = jax.random.normal(jax.random.key(1), (2, 4, 7))
    targets = jnp.zeros((2, 4), jnp.int32)
    mask = jnp.array([[1, 1, 0, 0], [0, 1, 0, 0]])
    changed = logits.at[:, 2:].set(100.0).at[0, 0, 0].add(0.0)
    a, _ = losses.masked_nll(logits, targets, mask)
    b, _ = losses.masked_nll(changed, targets, mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    empty, n = losses.masked_nll(logits, targets, jnp.zeros((2, 4)))
    assert float(empty) == 0.0 and float(n) == 0.0


def test_masked_nll_bf16_logits_are_upcast():
    logits = jax.random.normal(jax.random.key(2), (2, 3, 11)) * 4
    targets = jax.random.randint(jax.random.key(3), (2, 3), 0, 11)
    mask = jnp.ones((2, 3))
    full, _ = losses.masked_nll(logits, targets, mask)
    half, _ = losses.masked_nll(logits.astype(jnp.bfloat16), targets, mask)
    chex.assert_type(half, jnp.float32)
    np.testing.assert_allclose(full, half, rtol=3e-2)
