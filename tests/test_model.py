import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl.model import Transformer, count_params, stack_layers, unstack_layers
from instructrl.presets import GPT3_TABLE, preset
from instructrl.products import product


def _init(cfg, head="lm", t=12):
    model = Transformer(cfg, head=head)
    tokens = jax.random.randint(jax.random.key(0), (2, t), 0, cfg.vocab_size)
    params = model.init(jax.random.key(1), tokens)["params"]
    return (
        model,
        jax.tree.map(
            lambda x: x.unbox() if hasattr(x, "unbox") else x,
            params,
            is_leaf=lambda x: hasattr(x, "unbox"),
        ),
        tokens,
    )


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_left_padding_invariance(name):
    cfg = preset(name, vocab_size=97)
    model, params, tokens = _init(cfg)
    pad = 5
    padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), jnp.ones_like(tokens)], axis=1)
    plain = model.apply({"params": params}, tokens)
    left = model.apply({"params": params}, padded, attention_mask=mask)
    chex.assert_shape(left, (2, 12 + pad, 97))
    np.testing.assert_allclose(left[:, pad:], plain, atol=2e-5, rtol=2e-5)
    # Rows of different padding in one batch: row 1 has 3 pads more than row 0.
    mixed_tokens = padded.at[1, : pad + 3].set(0)
    mixed_mask = mask.at[1, : pad + 3].set(0)
    out = model.apply({"params": params}, mixed_tokens, attention_mask=mixed_mask)
    ref = model.apply({"params": params}, tokens[1:, 3:])
    np.testing.assert_allclose(out[1, pad + 3 :], ref[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_scanned_and_unrolled_layers_agree(name):
    scanned = preset(name, vocab_size=64, scan_layers=True)
    unrolled = preset(name, vocab_size=64, scan_layers=False)
    model_s, params_s, tokens = _init(scanned)
    model_u = Transformer(unrolled)
    params_u = unstack_layers(params_s, scanned.num_layers)
    ref_shapes = jax.eval_shape(lambda: model_u.init(jax.random.key(0), tokens)["params"])
    chex.assert_trees_all_equal_shapes(
        jax.tree.map(
            lambda x: x.value if hasattr(x, "value") else x,
            ref_shapes,
            is_leaf=lambda x: hasattr(x, "value"),
        ),
        params_u,
    )
    np.testing.assert_allclose(
        model_s.apply({"params": params_s}, tokens),
        model_u.apply({"params": params_u}, tokens),
        atol=1e-5,
    )
    back = stack_layers(params_u, scanned.num_layers)
    chex.assert_trees_all_equal(back, params_s)


def test_remat_and_bf16_agree_with_reference():
    cfg = preset("llama-tiny", vocab_size=64)
    model, params, tokens = _init(cfg)
    ref = model.apply({"params": params}, tokens)
    remat = Transformer(preset("llama-tiny", vocab_size=64, remat="full"))
    np.testing.assert_allclose(remat.apply({"params": params}, tokens), ref, atol=1e-5)
    bf16 = Transformer(preset("llama-tiny", vocab_size=64, dtype="bfloat16"))
    out = bf16.apply({"params": params}, tokens)
    chex.assert_type(out, jnp.float32)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.1


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_bfloat16_products_keep_float32_activations_and_gradients(name):
    """matmul_dtype=bfloat16: every product (projections, attention, the tied or untied head)
    takes bfloat16 operands, forward and backward, and sums in float32; activations, logits
    and gradients stay float32 and within bfloat16 rounding of the float32 model's."""
    cfg = preset(name, vocab_size=64, scan_layers=False)
    model, params, tokens = _init(cfg, t=40)
    mixed = Transformer(preset(name, vocab_size=64, scan_layers=False, matmul_dtype="bfloat16"))

    def loss(m, p):
        logits = m.apply({"params": p}, tokens)
        return -jax.nn.log_softmax(logits)[..., 0].mean(), logits

    (ref_loss, ref), ref_grads = jax.value_and_grad(lambda p: loss(model, p), has_aux=True)(params)
    grad_fn = jax.value_and_grad(lambda p: loss(mixed, p), has_aux=True)
    (out_loss, out), grads = grad_fn(params)
    chex.assert_type(out, jnp.float32)
    scale = float(np.abs(np.asarray(ref)).max())
    assert 0 < np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.02 * scale
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        chex.assert_type(got, jnp.float32)
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max() + 1e-6
    # Every dot of the forward and backward pass multiplies bfloat16 operands, as compiled:
    # XLA:CPU upcasts a bfloat16 product with a bfloat16 result to float32.
    dots = _compiled_dots(jax.jit(grad_fn).lower(params).compile().as_text())
    assert len(dots) > 10 and all(kinds == ["bf16", "bf16"] for _, kinds in dots), dots


def _compiled_dots(hlo: str) -> list[tuple[str, list[str]]]:
    """(instruction, operand element types) of every dot in compiled HLO text."""
    dots = []
    for block in re.split(r"\n(?=\S)", hlo):  # one computation (fused or not) per block
        kinds = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", block))
        kinds.update(re.findall(r"([\w.\-]+): (\w+)\[", block.split("\n")[0]))
        for name, a, b in re.findall(r"%([\w.\-]+) = \S+ dot\(%([\w.\-]+), %([\w.\-]+)\)", block):
            dots.append((name, [kinds.get(a), kinds.get(b)]))
    return dots


@pytest.mark.parametrize(
    "spec",
    [
        "btd,df->btf",  # a projection
        "btf,vf->btv",  # the tied head (embed.attend)
        "btkgh,bskh->bkgts",  # attention scores (grouped-query)
        "bkgts,bskh->btkgh",  # attention values
        "hbt,thb->bh",  # two contracted dimensions, in different orders
    ],
)
def test_low_precision_products_differentiate_like_float64(spec):
    """``product``'s own backward rule (float32 accumulation, the transpose it needs taken
    by whichever operand order needs none): the gradients of both operands, against a
    float64 NumPy einsum, for projections, attention and contractions over several
    dimensions in different orders."""
    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    sizes = dict(b=2, t=5, s=5, d=6, f=7, v=9, k=2, g=3, h=4)
    rng = np.random.default_rng(0)
    a = rng.normal(size=[sizes[c] for c in a_spec])
    b = rng.normal(size=[sizes[c] for c in b_spec])
    w = rng.normal(size=[sizes[c] for c in out])  # d loss / d out

    def loss(x, y):
        z = jnp.einsum(spec, x, y, _dot_general=product(jnp.float32, jnp.float32))
        return (z * w).sum()

    da, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(a.astype(np.float32), b.astype(np.float32))
    chex.assert_type((da, db), jnp.float32)
    np.testing.assert_allclose(da, np.einsum(f"{out},{b_spec}->{a_spec}", w, b), atol=1e-5)
    np.testing.assert_allclose(db, np.einsum(f"{a_spec},{out}->{b_spec}", a, w), atol=1e-5)


def test_scalar_head_shares_trunk_and_dropout_is_stochastic():
    cfg = preset("tiny", vocab_size=64, dropout=0.5)
    model, params, tokens = _init(cfg, head="scalar")
    values = model.apply({"params": params}, tokens)
    chex.assert_shape(values, (2, 12))
    chex.assert_type(values, jnp.float32)
    assert "scalar_head" in params and "lm_head" not in params
    a = model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    b = model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(values, model.apply({"params": params}, tokens))


def test_llama_is_untied_with_grouped_query_attention():
    cfg = preset("llama-tiny", vocab_size=64, scan_layers=True)
    _, params, _ = _init(cfg)
    assert "lm_head" in params and "pos_embed" not in params
    chex.assert_shape(params["layers"]["attn"]["key"]["kernel"], (2, 64, 2, 16))
    chex.assert_shape(params["layers"]["attn"]["query"]["kernel"], (2, 64, 4, 16))


def test_causality():
    cfg = preset("tiny", vocab_size=64)
    model, params, tokens = _init(cfg)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 64)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", sorted(GPT3_TABLE))
def test_gpt3_preset_parameter_counts(name):
    stated = GPT3_TABLE[name][0]
    n = count_params(preset(name))
    assert abs(n - stated) / stated < 0.02, (name, n, stated)


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_init_from_converts_between_scanned_and_unrolled(saved_scanned, tmp_path):
    """A stage whose model unrolls its layers starts from a checkpoint written scanned (an
    imported Hugging Face model) and the other way round: same values, the model's shardings."""
    from instructrl import checkpoint

    scanned = preset("tiny", vocab_size=64, scan_layers=True)
    _, params_s, _ = _init(scanned)
    params_u = unstack_layers(params_s, scanned.num_layers)
    saved, wanted = (params_s, params_u) if saved_scanned else (params_u, params_s)
    checkpoint.export_params(str(tmp_path), saved)
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("data",)), jax.sharding.PartitionSpec()
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), wanted
    )
    got = checkpoint.latest_params(str(tmp_path), abstract)
    chex.assert_trees_all_equal(got, wanted)
    assert all(x.sharding == sharding for x in jax.tree.leaves(got))
