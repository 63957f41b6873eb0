"""Forward pass and train steps on 8 simulated CPU devices equal the single-device run."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructrl import sharding
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.presets import preset
from instructrl.sft import lm_step
from instructrl.train import init_train_state


def _run(mesh_shape, devices, family):
    cfg = preset(
        family,
        vocab_size=128,
        num_heads=4,
        num_kv_heads=2 if family.startswith("llama") else None,
        scan_layers=True,  # the layer axis of stacked params stays replicated
    )
    model = Transformer(cfg)
    mesh = sharding.make_mesh(mesh_shape, devices)
    rules = sharding.LOGICAL_RULES
    opt = ml_collections.ConfigDict(
        dict(
            lr=1e-2, warmup_steps=1, total_steps=3, final_frac=0.1, weight_decay=0.1, grad_clip=1.0
        )
    )
    tx, _ = make_optimizer(opt)
    example = {"tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
    state, shardings, _ = init_train_state(model, tx, jax.random.key(0), example, mesh, rules)
    rng = np.random.default_rng(0)
    step = jax.jit(lambda s, b, r: lm_step(model, tx, rules, s, b, r), donate_argnums=(0,))
    losses = []
    for _ in range(3):
        toks = rng.integers(0, 128, size=(8, 17)).astype(np.int32)
        batch = {
            "inputs": toks[:, :-1],
            "targets": toks[:, 1:],
            "loss_mask": (rng.random((8, 16)) < 0.8).astype(np.int32),
        }
        with mesh:
            state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return state, shardings, losses


@pytest.mark.parametrize("family", ["tiny", "llama-tiny"])
def test_mesh_2x2x2_matches_single_device(family):
    assert jax.device_count() >= 8, "run with --xla_force_host_platform_device_count=8"
    single, _, single_losses = _run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], family)
    multi, shardings, multi_losses = _run(
        {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8], family
    )
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    # Parameters really are sharded over fsdp and tensor.
    qkernel = multi.params["layers"]["attn"]["query"]["kernel"]
    assert tuple(qkernel.sharding.spec)[:3] == (None, "fsdp", "tensor")
    assert len(qkernel.addressable_shards) == 8
    assert qkernel.addressable_shards[0].data.shape[1] == qkernel.shape[1] // 2
    chex.assert_trees_all_close(
        jax.device_get(multi.params), jax.device_get(single.params), atol=2e-5, rtol=2e-5
    )


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert mesh.shape == {"data": jax.device_count() // 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
