"""LoRA (instructrl.lora, model.adapt): adapters start at the base model, merge into the
kernels they adapt (against a float64 NumPy formula), give the gradient the merged weights
give, split from and combine with the frozen base, and train the same on 8 sharded devices
as on one. The stages' LoRA runs (PPO learns, a preempted run resumes) are in
tests/test_methods.py, on the toy task."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from instructrl import lora, sharding
from instructrl.model import LORA_TARGETS, ModelConfig, Transformer
from instructrl.optim import make_optimizer
from instructrl.presets import preset
from instructrl.sft import lm_step
from instructrl.train import params_init, train_state_init

ALPHA = 16.0


def _model(family, scan, rank=4, targets=LORA_TARGETS, head="lm"):
    name = "llama-tiny" if family == "llama" else "tiny"
    cfg = preset(name, vocab_size=128, scan_layers=scan, lora_rank=rank, lora_alpha=ALPHA,
                 lora_targets=targets)  # fmt: skip
    return Transformer(cfg, head=head)


def _init(model, seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(jax.jit(model.init)(jax.random.key(seed), tokens))["params"]


def _random_adapters(trainable, seed=1):
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten(
        [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


@pytest.mark.parametrize("family,scan", [("gpt", True), ("llama", False)])
def test_adapters_start_at_the_base_and_merge_into_their_kernels(family, scan):
    model = _model(family, scan)
    plain = Transformer(dataclasses.replace(model.cfg, lora_rank=0))
    params = _init(model)
    base, trainable = lora.split(params)
    names = {k for p in _flat(trainable) for k in p.split("'") if lora.is_adapter(k)}
    want = {"query", "key", "value", "out", "fc_in" if family == "gpt" else "gate", "fc_out"}
    assert {n.rsplit("_lora_", 1)[0] for n in names} >= want
    assert _flat(base).keys() == _flat(_init(plain)).keys()  # the base is the plain model's
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 128)
    apply, apply_plain = jax.jit(model.apply), jax.jit(plain.apply)
    # B = 0: the adapted model is the base model, exactly.
    np.testing.assert_array_equal(apply({"params": params}, tokens),
                                  apply_plain({"params": base}, tokens))  # fmt: skip
    trainable = _random_adapters(trainable)
    full = lora.combine(base, trainable)
    merged = lora.merge(full, ALPHA)
    assert _flat(merged).keys() == _flat(base).keys()
    # Each merged kernel is W + (alpha / r) A B in float64 (layer by layer when scanned).
    got, f = _flat(merged), _flat(full)
    checked = 0
    for path, w in _flat(base).items():
        if not path.endswith("['kernel']"):
            continue
        name = path.rsplit("[", 2)[-2].strip("[]'")
        scope = path[: -len(f"['{name}']['kernel']")]
        a_path = f"{scope}['{name}_lora_a']"
        if a_path not in f:
            np.testing.assert_array_equal(got[path], w, err_msg=path)
            continue
        a = f[a_path].astype(np.float64)
        b = f[f"{scope}['{name}_lora_b']"].astype(np.float64)
        layers = w.shape[0] if scan else 1
        a, b = a.reshape(layers, -1, a.shape[-1]), b.reshape(layers, b.shape[int(scan)], -1)
        want_w = w.astype(np.float64) + (ALPHA / a.shape[-1]) * (a @ b).reshape(w.shape)
        np.testing.assert_allclose(got[path], want_w, rtol=1e-5, atol=1e-6, err_msg=path)
        checked += 1
    assert checked >= 6
    # The plain model on the merged weights computes what the adapted model computes.
    adapted = apply({"params": full}, tokens)
    assert float(jnp.abs(adapted - apply({"params": params}, tokens)).max()) > 1e-2
    np.testing.assert_allclose(apply_plain({"params": merged}, tokens), adapted, atol=2e-5)
    np.testing.assert_allclose(apply({"params": merged}, tokens), adapted, atol=2e-5)


def test_adapter_gradients_are_the_merged_weights_gradients():
    """The adapted forward pass (x A B beside x W, no gradient of W formed) and the merged
    weights W + (alpha / r) A B give the same loss and the same gradient to A and B."""
    model = _model("gpt", True, targets=("query", "value", "fc_out"))
    base, trainable = lora.split(_init(model))
    trainable = _random_adapters(trainable)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 128)

    def loss(params):
        logp = jax.nn.log_softmax(model.apply({"params": params}, tokens[:, :-1]))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean(), {}

    (want_loss, _), want = jax.jit(jax.value_and_grad(
        lambda t: loss(lora.merge(lora.combine(base, t), ALPHA)), has_aux=True
    ))(trainable)  # fmt: skip
    for merge_alpha in (None, ALPHA):  # lora.compute "adapters" and "merged"
        (got_loss, _), got = jax.jit(
            lambda t, a=merge_alpha: lora.value_and_grad(loss, t, base, merge_alpha=a)
        )(trainable)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        chex.assert_trees_all_equal_structs(got, trainable)  # the adapters' gradient only
        for path, g in _flat(got).items():
            np.testing.assert_allclose(g, _flat(want)[path], rtol=2e-4, atol=1e-7, err_msg=path)
        assert all(np.abs(g).max() > 0 for g in _flat(got).values())


def test_split_keeps_a_new_head_trainable_and_combine_inverts_it():
    model = _model("llama", True, targets=("query", "up"), head="scalar")
    params = _init(model)
    base, trainable = lora.split(params, train=("scalar_head",))
    assert "scalar_head" in trainable and "scalar_head" not in base
    assert all(lora.is_adapter(p.rsplit("[", 1)[-1].strip("[]'")) or "scalar_head" in p
               for p in _flat(trainable))  # fmt: skip
    chex.assert_trees_all_equal(lora.combine(base, trainable), params)
    # A module trained in full replaces the base's copy (the value model's head over the RM).
    head = jax.tree.map(lambda x: x + 1, trainable["scalar_head"])
    both = lora.combine(params, {"scalar_head": head})
    chex.assert_trees_all_equal(both["scalar_head"], head)


def test_lora_config_errors_name_the_field():
    section = dict(rank=4, alpha=8.0, targets=["query"], train=[], export="zip", compute="merged")
    c = ml_collections.ConfigDict({"lora": section})
    with pytest.raises(ValueError, match="config.lora.export"):
        lora.Spec.from_config(c)
    c.lora.export, c.lora.compute = "merged", "fused"
    with pytest.raises(ValueError, match="config.lora.compute"):
        lora.Spec.from_config(c)
    c.lora.compute, c.lora.targets = "adapters", ["qkv"]
    spec = lora.Spec.from_config(c)
    with pytest.raises(ValueError, match="lora.targets.*qkv"):
        spec.model_config(ModelConfig())
    c.lora.rank = 0
    assert lora.Spec.from_config(c) is None  # full fine-tuning


def _sft_steps(mesh_shape, devices):
    """Two LoRA SFT steps (rank 4 on every projection) on ``mesh_shape``: the adapters,
    their optimizer state and the losses."""
    model = _model("llama", True)
    mesh, rules = sharding.make_mesh(mesh_shape, devices), sharding.LOGICAL_RULES
    tx, _ = make_optimizer(ml_collections.ConfigDict(
        dict(lr=1e-2, warmup_steps=0, total_steps=2, final_frac=0.1, weight_decay=0.1,
             grad_clip=1.0)))  # fmt: skip
    example = {"tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
    trainable = lambda p: lora.split(p)[1]  # noqa: E731
    state, shardings, _ = sharding.create_sharded(
        train_state_init(model, tx, example, rules, trainable), mesh, rules, jax.random.key(0)
    )
    base_init = lambda rng: lora.split(params_init(model, example, rules)(rng))[0]  # noqa: E731
    base = sharding.create_sharded(base_init, mesh, rules, jax.random.key(5))[0]
    step = jax.jit(functools.partial(lm_step, model, tx, rules), donate_argnums=(0,))
    toks = np.random.default_rng(0).integers(0, 128, size=(8, 17)).astype(np.int32)
    batch = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": np.ones((8, 16), np.int32),
    }
    losses = []
    for _ in range(2):  # the same batch twice: the second loss is lower
        state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(1), base)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), shardings, losses


def test_lora_steps_on_8_sharded_devices_equal_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    one, _, one_losses = _sft_steps({"data": 1}, jax.devices()[:1])
    many, shardings, many_losses = _sft_steps({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    # The adapters are laid out like the kernels they adapt: B of the query over heads.
    spec = shardings.params["layers"]["attn"]["query_lora_b"].spec
    assert "tensor" in jax.tree.leaves(tuple(spec)), spec
    assert one_losses[1] < one_losses[0]
    np.testing.assert_allclose(many_losses, one_losses, rtol=1e-5)
    chex.assert_trees_all_close(many.params, one.params, rtol=1e-4, atol=1e-5)
