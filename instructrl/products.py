"""Matrix products in a low precision with a wider accumulator (``ModelConfig.matmul_dtype``).

``product(dtype, accumulate)`` is a drop-in ``dot_general`` for Flax layers and einsums: its
operands are cast to ``dtype`` (bfloat16), the sum is kept in ``accumulate`` (float32), and its
backward products do the same, through a custom VJP (``_low_product_bwd``), not JAX's transpose
rule, which XLA:CPU would run in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def product(dtype, accumulate):
    """``lax.dot_general`` with its operands cast to ``dtype`` and the product accumulated
    and returned in ``accumulate`` (ModelConfig.matmul_dtype); as is when dtype is None. Its
    gradient products take ``dtype`` operands too (the cotangent cast down, as bf16 autocast
    does): without that JAX's transpose rule multiplies in float32 and the backward pass,
    two thirds of the products, gains nothing."""
    if dtype is None:
        return jax.lax.dot_general

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        return _low_product(lhs, rhs, dimension_numbers, precision, dtype, accumulate)

    return dot_general


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _low_product(lhs, rhs, dimension_numbers, precision, dtype, accumulate):
    return jax.lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dimension_numbers,
                               precision, preferred_element_type=accumulate)  # fmt: skip


def _low_product_fwd(lhs, rhs, dimension_numbers, precision, dtype, accumulate):
    out = _low_product(lhs, rhs, dimension_numbers, precision, dtype, accumulate)
    kinds = (jnp.zeros((), lhs.dtype), jnp.zeros((), rhs.dtype))  # the inputs' dtypes
    return out, (lhs.astype(dtype), rhs.astype(dtype), kinds)


def _low_product_bwd(dimension_numbers, precision, dtype, accumulate, res, g):
    lhs, rhs, (lhs_kind, rhs_kind) = res
    g = g.astype(dtype)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_kept = _kept(lhs.ndim, lhs_contract, lhs_batch)
    rhs_kept = _kept(rhs.ndim, rhs_contract, rhs_batch)
    nb, nl = len(lhs_batch), len(lhs_kept)
    g_batch, g_lhs, g_rhs = range(nb), range(nb, nb + nl), range(nb + nl, g.ndim)
    # d_lhs: g against rhs over rhs's kept dimensions; d_rhs: lhs against g over lhs's.
    by_rhs = [lhs_contract[i] for i in np.argsort(rhs_contract)]
    by_lhs = [rhs_contract[i] for i in np.argsort(lhs_contract)]
    orders = ([*lhs_batch, *lhs_kept, *by_rhs], [*lhs_batch, *by_rhs, *lhs_kept])
    d_lhs = _product_f32(g, rhs, g_rhs, rhs_kept, g_batch, rhs_batch, precision, *orders)
    orders = ([*rhs_batch, *rhs_kept, *by_lhs], [*rhs_batch, *by_lhs, *rhs_kept])
    d_rhs = _product_f32(g, lhs, g_lhs, lhs_kept, g_batch, lhs_batch, precision, *orders)
    return d_lhs.astype(lhs_kind.dtype), d_rhs.astype(rhs_kind.dtype)


def _kept(ndim: int, contract, batch) -> list[int]:
    return [d for d in range(ndim) if d not in (*contract, *batch)]


def _product_f32(g, y, g_contract, y_contract, g_batch, y_batch, precision, order, swapped):
    """A cotangent: g against y, accumulated in float32, its dimensions put in the operand's
    order. ``order`` / ``swapped``: the operand's dimensions that dot_general(g, y) /
    dot_general(y, g) leave in each position; the product is taken in whichever order needs
    no transpose after it (XLA folds such a transpose into the product, and XLA:CPU cannot run
    every folded form in bfloat16).

    Why not JAX's own transpose rule: it returns the operands' dtype (bfloat16), and XLA:CPU
    runs bfloat16 products with a bfloat16 result in float32, so the backward pass, two
    thirds of a step's products, gained nothing from bfloat16."""
    g_dims = (tuple(g_contract), tuple(g_batch))
    y_dims = (tuple(y_contract), tuple(y_batch))
    if order == sorted(order) or swapped != sorted(swapped):
        out = jax.lax.dot_general(g, y, tuple(zip(g_dims, y_dims, strict=True)), precision,
                                  preferred_element_type=jnp.float32)  # fmt: skip
    else:
        order = swapped
        out = jax.lax.dot_general(y, g, tuple(zip(y_dims, g_dims, strict=True)), precision,
                                  preferred_element_type=jnp.float32)  # fmt: skip
    return jnp.transpose(out, np.argsort(order))


_low_product.defvjp(_low_product_fwd, _low_product_bwd)
