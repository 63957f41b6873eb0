"""One decoder-only transformer for every model of the pipeline.

Two families share one module:
  * ``gpt``: GPT-2 / GPT-3 (learned positions, LayerNorm, GELU MLP, biases, tied embeddings);
  * ``llama``: Llama (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, untied output).

The trunk maps tokens (B, T) to hidden states (B, T, D); a head maps them to next-token logits
(``head="lm"``, policy and reference models) or to one scalar per position (``head="scalar"``,
reward and value models, which read it at the last real token). Every parameter and key
activation carries a logical axis name; ``instructrl.sharding.LOGICAL_RULES`` maps them to mesh
axes. Left-padded rows are correct when the caller passes ``attention_mask`` (and the positions
that ``positions_from_mask`` derives from it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructrl.products import product

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Every projection of a block (attention and MLP, both families): LoRA's default targets.
LORA_TARGETS = ("query", "key", "value", "out", "fc_in", "fc_out", "gate", "up")
READOUTS = ("last", "mean")  # ModelConfig.reward_readout


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of the transformer.

    ``num_kv_heads < num_heads`` gives grouped-query attention; ``head_dim`` defaults to
    d_model // num_heads; ``mlp_dim`` defaults to 4 * d_model (gpt) or the Llama 8/3 rule.
    ``remat`` is "none", "full" (recompute each layer) or "dots" (save matmul outputs only).
    ``attention`` None computes causal attention block by block of ``attention_block`` queries
    (``causal_attention``: no work above the diagonal's blocks; 0 = one block); a name is
    passed to ``jax.nn.dot_product_attention(implementation=...)``: "cudnn" forces the fused
    GPU kernel, "xla" JAX's reference path. The KV-cache decode step always uses the latter.
    ``matmul_dtype`` "bfloat16" feeds every matrix product (projections, attention, the LM
    head) bfloat16 operands and accumulates it in float32, the activations and everything
    else staying in ``dtype`` (what a TPU does to float32 products by default; on a CPU with
    AVX512-BF16 the products run at twice the float32 rate); "" multiplies in ``dtype``.
    ``qkv_bias`` adds biases to the query/key/value projections (default: gpt only; Qwen2 has
    them on llama). ``rope_scaling`` stretches RoPE for long contexts: "linear" divides every
    frequency by ``rope_factor``; "llama3" (Llama 3.1) divides only the low frequencies, with
    a smooth ramp between ``rope_low_freq_factor`` and ``rope_high_freq_factor``.
    ``reward_readout`` is how a scalar-head model scores a response as a reward model
    (``scoring.span_rewards``): "last", the paper's, reads the head at the response's last token
    (its EOS); "mean" averages the head over the response's tokens, so a flaw anywhere in it
    (a false fact) counts where it stands instead of having to reach the EOS state.
    """

    family: str = "gpt"
    vocab_size: int = 384
    max_len: int = 256
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    dropout: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    matmul_dtype: str = ""
    scan_layers: bool = True
    remat: str = "none"
    attention: str | None = None
    attention_block: int = 64
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None
    init_std: float = 0.02
    # LoRA (Hu et al. 2021): with lora_rank > 0, ``init`` adds a rank-r adapter to each
    # projection named in lora_targets (``adapt``); applied wherever the params hold one.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    reward_readout: str = "last"

    def __post_init__(self):
        if self.family not in ("gpt", "llama"):
            raise ValueError(f"model.family must be 'gpt' or 'llama', got {self.family!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"model.remat must be none|full|dots, got {self.remat!r}")
        if self.matmul_dtype and self.matmul_dtype not in DTYPES:
            raise ValueError(
                f"model.matmul_dtype must be '' or one of {sorted(DTYPES)}, "
                f"got {self.matmul_dtype!r}"
            )
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise ValueError(
                f"model.rope_scaling must be none|linear|llama3, got {self.rope_scaling!r}"
            )
        if self.reward_readout not in READOUTS:
            raise ValueError(
                f"model.reward_readout must be one of {READOUTS}, got {self.reward_readout!r}"
            )
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(
                f"lora.targets: unknown projections {sorted(unknown)}; choose from {LORA_TARGETS}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.kv_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        if self.family == "gpt":
            return 4 * self.d_model
        return 256 * -(-int(8 * self.d_model / 3) // 256)  # Llama: 2/3 of 4d, rounded up

    @property
    def has_qkv_bias(self) -> bool:
        return self.family == "gpt" if self.qkv_bias is None else self.qkv_bias

    @property
    def tied(self) -> bool:
        return self.family == "gpt" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def product_dtype(self):
        """The dtype matrix-product operands are cast to (None: as they are)."""
        return DTYPES[self.matmul_dtype] if self.matmul_dtype else None


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids (B, T) that start at 0 on each row's first real token (left padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _dense(cfg: ModelConfig, cls):
    """``cls`` (nn.Dense or nn.DenseGeneral) with the family's bias and the config's dtypes."""
    return functools.partial(
        cls, use_bias=cfg.family == "gpt", dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        dot_general=product(cfg.product_dtype, cfg.compute_dtype),
    )  # fmt: skip


def _init(cfg: ModelConfig, names: tuple[str | None, ...], scale: float = 1.0):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std * scale), names)


def _ones(names):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def adapt(module: nn.Module, cfg: ModelConfig, name: str, x, y, in_axes, out_axes):
    """``y`` (projection ``name`` of ``x``) plus its LoRA update (alpha / r) * (x A) B.

    A: (*in, r) and B: (r, *out) are params of ``module`` named ``{name}_lora_a`` and
    ``{name}_lora_b``, the kernel's input and output dims (logical axes ``in_axes`` and
    ``out_axes``) around the rank. ``init`` creates them when cfg.lora_rank > 0 and the name is
    a target: A ~ N(0, 1 / fan_in), B = 0, so the adapted model starts equal to the base; any
    other call applies them only where the params hold them (the same model runs base and
    merged params, ``instructrl.lora``), with r read from A's shape. Only x A and its product
    with B are computed: no gradient of the base kernel is formed."""
    a_name, b_name = f"{name}_lora_a", f"{name}_lora_b"
    if module.is_initializing():
        if not (cfg.lora_rank and name in cfg.lora_targets):
            return y
    elif not module.has_variable("params", a_name):
        return y
    in_shape, out_shape = x.shape[x.ndim - len(in_axes) :], y.shape[y.ndim - len(out_axes) :]
    fan_in = functools.reduce(lambda m, n: m * n, in_shape, 1)
    rank = cfg.lora_rank
    a = module.param(
        a_name,
        nn.with_logical_partitioning(nn.initializers.normal(fan_in**-0.5), (*in_axes, None)),
        (*in_shape, rank),
        cfg.weight_dtype,
    )
    b = module.param(b_name, _zeros((None, *out_axes)), (a.shape[-1], *out_shape), cfg.weight_dtype)
    h = jnp.tensordot(x.astype(cfg.compute_dtype), a.astype(cfg.compute_dtype), len(in_shape))
    delta = jnp.tensordot(h, b.astype(cfg.compute_dtype), 1) * (cfg.lora_alpha / a.shape[-1])
    return y + delta.astype(y.dtype)


class Norm(nn.Module):
    """LayerNorm (gpt) or RMSNorm (llama), computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        xf = x.astype(jnp.float32)
        scale = self.param("scale", _ones(("norm",)), (cfg.d_model,), cfg.weight_dtype)
        if cfg.family == "gpt":
            bias = self.param("bias", _zeros(("norm",)), (cfg.d_model,), cfg.weight_dtype)
            mean = xf.mean(-1, keepdims=True)
            var = jnp.square(xf - mean).mean(-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale + bias
        else:
            y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + cfg.norm_eps) * scale
        return y.astype(cfg.compute_dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies theta^(-2i/H), i < H/2, after ``cfg.rope_scaling``. (H/2,)"""
    half = cfg.head_size // 2
    freqs = 1.0 / cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "linear":
        freqs = freqs / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: wavelengths longer than original_max_len / low_freq_factor are stretched by
        # `factor`, shorter than original_max_len / high_freq_factor kept, a linear ramp between.
        wavelen = 2 * jnp.pi / freqs
        ramp = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smooth = jnp.clip(ramp, 0.0, 1.0)
        freqs = (1 - smooth) * freqs / cfg.rope_factor + smooth * freqs
    return freqs


def causal_attention(q, k, v, mask=None, block: int = 64, product_dtype=None) -> jax.Array:
    """Causal softmax attention, one block of ``block`` queries at a time: the queries of block
    i attend to keys [0, end of block i) only, so the scores above the diagonal's blocks are
    never computed (with 4 blocks, 5/8 of the full T x T work; each block's scores are also
    a quarter the size). Scores and softmax in float32.

    q: (B, T, N, H); k, v: (B, T, K, H) with N a multiple of K (grouped-query attention);
    mask: None (plain causal) or (B, 1, T, T) bool, already causal (padding, segments).
    Returns (B, T, N, H). A query row with every key masked (a padding position) gets uniform
    weights, as jax.nn.dot_product_attention gives it; nothing reads it. ``product_dtype``:
    the two products' operand dtype (ModelConfig.matmul_dtype), accumulated in float32.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = (q * h**-0.5).reshape(b, t, kv_heads, n // kv_heads, h)  # (B, T, K, G, H)
    scores_product = product(product_dtype, jnp.float32)
    values_product = product(product_dtype, v.dtype)
    starts = range(0, t, block) if block else [0]
    outs = []
    for start in starts:
        stop = min(start + block, t) if block else t
        scores = jnp.einsum(
            "btkgh,bskh->bkgts",
            q[:, start:stop],
            k[:, :stop],
            preferred_element_type=jnp.float32,
            _dot_general=scores_product,
        )  # (B, K, G, Tq, S)
        allowed = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # (Tq, S)
        if mask is not None:
            allowed = allowed & mask[:, :, None, start:stop, :stop]  # (B, 1, 1, Tq, S)
        probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1).astype(v.dtype)
        outs.append(
            jnp.einsum("bkgts,bskh->btkgh", probs, v[:, :stop], _dot_general=values_product)
        )
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


def rotary(x: jax.Array, positions: jax.Array, theta: float, freqs=None) -> jax.Array:
    """RoPE (Su et al. 2021) in the half-split layout of the Hugging Face Llama code.

    x: (B, T, N, H); positions: (B, T); freqs: (H/2,) (default theta^(-2i/H)).
    Pairs feature i with feature i + H/2.
    """
    half = x.shape[-1] // 2
    if freqs is None:
        freqs = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, H/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        """x: (B, T, D); positions: (B, T); mask: None (plain causal) or (B, 1, T, S) bool.

        With ``cache`` = {"k", "v"} (B, K, S, H) (head-major, ``CACHE_AXES``), the new keys and
        values are written at slots [cache_index, cache_index + T) and the queries attend over
        all S slots (under mask).
        Returns (output (B, T, D), updated cache or None).
        """
        cfg = self.cfg
        dense = _dense(cfg, nn.DenseGeneral)

        def project(name, heads, head_axis):
            y = dense(
                (heads, cfg.head_size),
                use_bias=cfg.has_qkv_bias,
                kernel_init=_init(cfg, ("embed", head_axis, "kv")),
                bias_init=_zeros((head_axis, "kv")),
                name=name,
            )(x)
            return adapt(self, cfg, name, x, y, ("embed",), (head_axis, "kv"))

        q = project("query", cfg.num_heads, "heads")  # (B, T, N, H)
        k = project("key", cfg.kv_heads, "kv_heads")  # (B, T, K, H)
        v = project("value", cfg.kv_heads, "kv_heads")  # (B, T, K, H)
        if cfg.family == "llama":
            freqs = rope_frequencies(cfg)
            q = rotary(q, positions, cfg.rope_theta, freqs)
            k = rotary(k, positions, cfg.rope_theta, freqs)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", "act_kv"))
        k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_kv_heads", "act_kv"))
        v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_kv_heads", "act_kv"))
        if cache is not None:
            # In-place (the decode loop carries the cache, so XLA updates its buffer).
            ck = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.astype(cache["k"].dtype).transpose(0, 2, 1, 3), cache_index, axis=2
            )
            cv = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.astype(cache["v"].dtype).transpose(0, 2, 1, 3), cache_index, axis=2
            )
            cache = {"k": ck, "v": cv}
            k, v = ck.transpose(0, 2, 1, 3), cv.transpose(0, 2, 1, 3)
        if cache is None and cfg.attention is None:
            kv = (k.astype(q.dtype), v.astype(q.dtype))
            out = causal_attention(
                q, *kv, mask, cfg.attention_block, cfg.product_dtype
            )  # (B, T, N, H)
        else:  # decoding over a cache, or a named kernel (cudnn: the fused GPU one)
            out = jax.nn.dot_product_attention(
                q,
                k.astype(q.dtype),
                v.astype(q.dtype),
                mask=mask,
                is_causal=mask is None,
                implementation=cfg.attention if mask is None else None,
            )  # (B, T, N, H)
        out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", "act_kv"))
        # GPT-2's scaled init of residual projections: std / sqrt(2 * num_layers).
        y = dense(
            cfg.d_model,
            axis=(-2, -1),
            kernel_init=_init(cfg, ("heads", "kv", "embed"), (2 * cfg.num_layers) ** -0.5),
            bias_init=_zeros(("embed",)),
            name="out",
        )(out)
        return adapt(self, cfg, "out", out, y, ("heads", "kv"), ("embed",)), cache


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = _dense(cfg, nn.Dense)
        up = dict(kernel_init=_init(cfg, ("embed", "mlp")), bias_init=_zeros(("mlp",)))

        def project_up(name):
            y = dense(cfg.hidden_dim, name=name, **up)(x)
            return adapt(self, cfg, name, x, y, ("embed",), ("mlp",))

        if cfg.family == "gpt":
            h = nn.gelu(project_up("fc_in"), approximate=True)
        else:
            h = nn.silu(project_up("gate")) * project_up("up")
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        y = dense(
            cfg.d_model,
            kernel_init=_init(cfg, ("mlp", "embed"), (2 * cfg.num_layers) ** -0.5),
            bias_init=_zeros(("embed",)),
            name="fc_out",
        )(h)
        return adapt(self, cfg, "fc_out", h, y, ("mlp",), ("embed",))


class Block(nn.Module):
    """Pre-norm residual block. Returns (x, cache) so that ``nn.scan`` carries x and stacks the
    per-layer KV caches."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic or cfg.dropout == 0.0)
        h, cache = Attention(cfg, name="attn")(
            Norm(cfg, name="norm_attn")(x), positions, mask, cache, cache_index
        )
        x = x + drop(h)
        x = x + drop(Mlp(cfg, name="mlp")(Norm(cfg, name="norm_mlp")(x)))
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        return x, cache


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    policy = None
    if cfg.remat == "dots":
        policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=policy)


class Transformer(nn.Module):
    """Decoder-only transformer with an LM head or a scalar head.

    __call__(tokens (B, T) int, positions (B, T) int | None, attention_mask (B, T) | None,
             segment_ids (B, T) int | None, deterministic, cache, cache_index) ->
      head "lm": logits (B, T, V) float32;  head "scalar": values (B, T) float32;
      head "none": hidden states (B, T, D);  with a cache (``init_cache``): (output, cache).
    ``head_positions=(start, stop)`` (static) applies the head to positions [start, stop) only,
    e.g. a response's: the vocabulary projection of the prompt is never computed.
    ``head_index`` (int array of any shape) applies it to those positions of the rows
    flattened to (B * T) instead: the output has head_index's shape (+ V for "lm"), e.g. a
    packed batch's response positions (``scoring.Packed``).
    ``branch_ids`` (B, T) int, with segment_ids: 0 on a segment's shared prefix (a prompt),
    k > 0 on one of its continuations (a response); a token attends to its segment's prefix
    and its own continuation only, so several responses share one copy of their prompt and
    each is computed exactly as if alone after it (its positions continue the prompt's).
    With neither attention_mask nor segment_ids the attention is plain causal (the fused
    kernel's fastest path): right padding needs no mask because no real token sees it.
    """

    cfg: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        attention_mask=None,
        segment_ids=None,
        deterministic: bool = True,
        cache=None,
        cache_index=None,
        head_positions: tuple[int, int] | None = None,
        head_index: jax.Array | None = None,
        branch_ids=None,
    ):
        cfg = self.cfg
        _, seq_len = tokens.shape
        if cache is not None:
            # Decoding: attention_mask (B, S) marks filled cache slots; the queries sit at slots
            # cache_index + [0, T) and see earlier slots only. Positions come from the caller.
            slots = attention_mask.shape[1]
            query_slot = cache_index + jnp.arange(seq_len)
            causal = jnp.arange(slots)[None, :] <= query_slot[:, None]  # (T, S)
            mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        elif attention_mask is not None and positions is None:
            positions = positions_from_mask(attention_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len), tokens.shape)
        if cache is None:
            mask = None
        if cache is None and (attention_mask is not None or segment_ids is not None):
            mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]  # (1, 1, T, S)
            if attention_mask is not None:
                mask = mask & attention_mask.astype(bool)[:, None, None, :]
            if segment_ids is not None:
                mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
            if branch_ids is not None:  # the shared prefix, or the query's own branch
                key_branch = branch_ids[:, None, None, :]
                mask = mask & ((key_branch == 0) | (key_branch == branch_ids[:, None, :, None]))

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=_init(cfg, ("vocab", "embed")),
            param_dtype=cfg.weight_dtype,
            dtype=cfg.compute_dtype,
            name="embed",
        )
        x = embed(tokens)  # (B, T, D)
        if cfg.family == "gpt":
            pos_table = self.param(
                "pos_embed",
                _init(cfg, (None, "embed")),
                (cfg.max_len, cfg.d_model),
                cfg.weight_dtype,
            )
            x = x + jnp.take(pos_table, positions, axis=0).astype(cfg.compute_dtype)
        x = x.astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic or cfg.dropout == 0.0)(x)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

        block = _block_class(cfg)
        if cfg.scan_layers:
            x, cache = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, name="layers")(x, positions, mask, cache, cache_index)
        else:
            new_cache = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else cache[i]
                x, layer_cache = block(cfg, deterministic, name=f"layers_{i}")(
                    x, positions, mask, layer_cache, cache_index
                )
                new_cache.append(layer_cache)
            cache = None if cache is None else new_cache
        x = Norm(cfg, name="final_norm")(x)
        if head_positions is not None:  # only these positions' outputs are wanted
            x = x[:, head_positions[0] : head_positions[1]]
        if head_index is not None:  # these positions of the flattened rows
            x = x.reshape(-1, x.shape[-1])[head_index]  # (*head_index.shape, D)
        out = self._head(x, embed)
        return out if cache is None else (out, cache)

    def _head(self, x, embed):
        cfg = self.cfg
        if self.head == "none":
            return x
        if self.head == "scalar":
            # Small-scale init keeps initial rewards and values near zero.
            values = nn.Dense(
                1,
                kernel_init=_init(cfg, ("embed", None), 1.0 / (cfg.d_model**0.5)),
                bias_init=_zeros((None,)),
                dtype=jnp.float32,
                param_dtype=cfg.weight_dtype,
                name="scalar_head",
            )(x.astype(jnp.float32))
            return values[..., 0]
        if cfg.tied:
            table = embed.embedding.astype(cfg.compute_dtype)  # (V, D)
            logits = product(cfg.product_dtype, cfg.compute_dtype)(
                x, table, (((x.ndim - 1,), (1,)), ((), ()))
            )  # embed.attend, with the config's product dtype
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                kernel_init=_init(cfg, ("embed", "vocab")),
                dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype,
                dot_general=product(cfg.product_dtype, cfg.compute_dtype),
                name="lm_head",
            )(x)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_len", "act_vocab"))
        return logits.astype(jnp.float32)


# Cached keys/values are head-major, (B, K, S, H): the decode step's attention contracts over
# (S, H) with (B, K) as batch dimensions, which XLA wants major; the (B, S, K, H) layout made
# it transpose (copy) the whole cache at every decode step.
CACHE_AXES = ("act_batch", "act_kv_heads", "act_len", "act_kv")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
    """An empty KV cache of ``length`` slots: {"k", "v"} (L, B, K, S, H) for scanned layers, a
    list of per-layer {"k", "v"} (B, K, S, H) otherwise. dtype defaults to the compute dtype."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, cfg.kv_heads, length, cfg.head_size)
    if cfg.scan_layers:
        full = (cfg.num_layers, *shape)
        return {"k": jnp.zeros(full, dtype), "v": jnp.zeros(full, dtype)}
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
    ]


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Unrolled params (layers_0 ... layers_{L-1}) -> scanned params (layers, stacked on axis 0)."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned params -> unrolled params; inverse of ``stack_layers``."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


def count_params(cfg: ModelConfig, head: str = "lm") -> int:
    """Number of parameters, computed with ``jax.eval_shape`` (nothing is allocated)."""
    model = Transformer(cfg, head=head)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    return sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters in matrix products, the N of 6N FLOPs per trained token: all but GPT's
    position table, a lookup (the tied embedding counts once, as the LM head)."""
    return count_params(cfg) - (cfg.max_len * cfg.d_model if cfg.family == "gpt" else 0)
