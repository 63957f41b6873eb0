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


def _ref_ranking_loss(rewards, ranks, mask):
    """Plain-Python eq. (1): per prompt, mean over ordered pairs; mean over prompts with pairs."""
    per_prompt, correct, total = [], 0, 0
    for r, k, m in zip(rewards.astype(np.float64), ranks, mask, strict=True):
        terms = []
        for i in range(len(r)):
            for j in range(len(r)):
                if m[i] and m[j] and k[i] < k[j]:
                    terms.append(np.log1p(np.exp(-(r[i] - r[j]))))
                    correct += r[i] > r[j]
                    total += 1
        if terms:
            per_prompt.append(np.mean(terms))
    return (np.mean(per_prompt) if per_prompt else 0.0), correct / max(total, 1), total


def test_ranking_loss_matches_float64_reference_with_ties_and_masks():
    rng = np.random.default_rng(0)
    for k in range(2, 10):
        b = 6
        rewards = rng.normal(size=(b, k)) * 2
        ranks = rng.integers(0, k, size=(b, k))  # duplicates give ties
        mask = rng.random((b, k)) < 0.8
        mask[0] = False  # a prompt with no response carries no weight
        mask[1, :2] = True
        ranks[1, :2] = [1, 0]  # at least one ordered pair, also when K = 2
        loss, metrics = jax.jit(losses.ranking_loss)(rewards, ranks, mask)  # one call per K
        ref, acc, pairs = _ref_ranking_loss(rewards, ranks, mask)
        chex.assert_shape(loss, ())
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
        assert int(metrics["num_pairs"]) == pairs > 0


def test_ranking_loss_pairwise_case_and_permutation_invariance():
    rw, rl = 1.3, -0.4
    loss, metrics = losses.ranking_loss(
        jnp.array([[rw, rl]]), jnp.array([[0, 1]]), jnp.ones((1, 2), bool)
    )
    np.testing.assert_allclose(float(loss), -np.log(1 / (1 + np.exp(-(rw - rl)))), rtol=1e-6)
    assert float(metrics["accuracy"]) == 1.0
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(4, 7))
    ranks = rng.integers(0, 7, size=(4, 7))
    mask = rng.random((4, 7)) < 0.9
    base, _ = losses.ranking_loss(rewards, ranks, mask)
    perm = rng.permutation(7)
    permuted, _ = losses.ranking_loss(rewards[:, perm], ranks[:, perm], mask[:, perm])
    np.testing.assert_allclose(float(base), float(permuted), rtol=1e-6)
    # Masked responses do not matter, whatever their reward.
    changed = np.where(mask, rewards, 1e3)
    np.testing.assert_allclose(
        float(losses.ranking_loss(changed, ranks, mask)[0]), float(base), rtol=1e-6
    )


def _ref_plackett_luce(rewards, ranks, mask):
    """Float64 Plackett-Luce by sequential choice: sort a prompt's responses best first; each
    one that beats something is chosen among itself and every response ranked strictly
    below it (tied responses never compete). Mean over a prompt's choices, then prompts."""
    per_prompt = []
    for r, k, m in zip(rewards.astype(np.float64), ranks, mask, strict=True):
        idx = [i for i in np.argsort(k, kind="stable") if m[i]]
        terms = []
        for i in idx:
            rivals = [j for j in idx if k[j] > k[i]]
            if rivals:
                pool = np.array([r[i]] + [r[j] for j in rivals])
                terms.append(np.log(np.exp(pool).sum()) - r[i])
        if terms:
            per_prompt.append(np.mean(terms))
    return np.mean(per_prompt) if per_prompt else 0.0


def test_plackett_luce_matches_float64_reference_with_ties_and_masks():
    rng = np.random.default_rng(3)
    for k in range(2, 10):
        rewards = rng.normal(size=(6, k)) * 2
        ranks = rng.integers(0, k, size=(6, k))  # duplicates give ties
        mask = rng.random((6, k)) < 0.8
        mask[0] = False
        mask[1, :2], ranks[1, :2] = True, [1, 0]
        loss, metrics = jax.jit(losses.plackett_luce_loss)(rewards, ranks, mask)
        chex.assert_shape(loss, ())
        np.testing.assert_allclose(float(loss), _ref_plackett_luce(rewards, ranks, mask),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        _, acc, _ = _ref_ranking_loss(rewards, ranks, mask)
        np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)


def test_plackett_luce_of_a_strict_order_is_the_sequential_choice_likelihood():
    r = np.array([0.3, -1.2, 2.0, 0.7])
    order = [2, 3, 0, 1]  # best first
    ranks = np.argsort(order)[None]
    nll = sum(np.log(np.exp(r[order[i:]]).sum()) - r[order[i]] for i in range(3))  # 3 choices
    loss, _ = losses.plackett_luce_loss(r[None], ranks, np.ones((1, 4), bool))
    np.testing.assert_allclose(float(loss), nll / 3, rtol=1e-6)


def test_dpo_loss_on_a_pair_is_the_dpo_objective_for_both_forms():
    logp, ref = np.array([[-3.0, -5.5]]), np.array([[-4.0, -4.5]])
    beta, ranks, mask = 0.3, np.array([[0, 1]]), np.ones((1, 2), bool)
    want = np.log1p(np.exp(-beta * ((logp - ref)[0, 0] - (logp - ref)[0, 1])))
    for listwise in (False, True):
        loss, metrics = losses.dpo_loss(logp, ref, ranks, mask, beta, listwise)
        np.testing.assert_allclose(float(loss), want, rtol=1e-6)
        assert float(metrics["accuracy"]) == 1.0
        np.testing.assert_allclose(float(metrics["log_ratio"]), 0.0, atol=1e-6)
    # The gradient raises the chosen response's log-prob and lowers the rejected one's.
    grad = jax.grad(lambda lp: losses.dpo_loss(lp, ref, ranks, mask, beta)[0])(jnp.asarray(logp))
    assert grad[0, 0] < 0 < grad[0, 1]


def test_group_advantages_match_float64_formulas():
    rng = np.random.default_rng(4)
    for k in (2, 3, 5):
        r = rng.normal(size=(4 * k,)) * 3
        groups = r.reshape(4, k).astype(np.float64)
        loo = groups - (groups.sum(1, keepdims=True) - groups) / (k - 1)
        std = np.sqrt(
            ((groups - groups.mean(1, keepdims=True)) ** 2).sum(1, keepdims=True) / (k - 1)
        )
        grpo = (groups - groups.mean(1, keepdims=True)) / (std + 1e-4)
        got_loo = losses.group_advantages(jnp.asarray(r), k, "rloo")
        got_grpo = losses.group_advantages(jnp.asarray(r), k, "grpo")
        chex.assert_shape([got_loo, got_grpo], (4 * k,))
        np.testing.assert_allclose(got_loo, loo.reshape(-1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_grpo, grpo.reshape(-1), rtol=1e-5, atol=1e-5)
        # Leave-one-out advantages of a group sum to zero; a shift of a group's returns
        # changes neither estimator.
        np.testing.assert_allclose(np.asarray(got_loo).reshape(4, k).sum(1), 0.0, atol=1e-4)
        shifted = jnp.asarray(r + np.repeat(rng.normal(size=4), k))
        np.testing.assert_allclose(losses.group_advantages(shifted, k, "grpo"), got_grpo, atol=1e-4)


def test_kl_k3_is_the_nonnegative_unbiased_estimator():
    rng = np.random.default_rng(5)
    logp, ref = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    d = ref.astype(np.float64) - logp
    got = losses.kl_k3(jnp.asarray(logp), jnp.asarray(ref))
    np.testing.assert_allclose(got, np.exp(d) - d - 1, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got) >= 0).all()
    # Samples of pi: its mean estimates KL(pi || pi_ref) (two categorical distributions).
    p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
    draws = rng.choice(3, size=200_000, p=p)
    estimate = float(losses.kl_k3(jnp.log(p)[draws], jnp.log(q)[draws]).mean())
    np.testing.assert_allclose(estimate, (p * np.log(p / q)).sum(), rtol=0.02)
