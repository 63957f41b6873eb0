"""Hugging Face checkpoints <-> instructrl params: GPT-2 and the Llama family.

The Llama family (``llama``, ``qwen2``, ``mistral``; SmolLM is ``llama``) shares one layout:
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, RMSNorms, RoPE in
the rotate-half convention (which is ours: feature i pairs with i + H/2), optional tied
embeddings, grouped-query attention, and Qwen2's q/k/v biases. torch ``Linear`` weights are
(out, in), our kernels (in, out): every projection is transposed and its head axis split.
GPT-2 keeps ``Conv1D`` weights, already (in, out), with q/k/v fused in ``c_attn``.

A scalar head (reward / value model) maps to ``*ForSequenceClassification`` with one label:
``score.weight`` is our kernel; ``score`` has no bias in transformers, so ours is written to
config.json as ``instructrl_score_bias`` (a constant shift of every reward) and read back.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from instructrl.convert.loading import (
    Source,
    check_sources,
    const,
    identity,
    transpose,
    used_tensors,
)
from instructrl.convert.safetensors import SafetensorsReader, save_file
from instructrl.model import ModelConfig

LLAMA_TYPES = ("llama", "qwen2", "mistral")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # our GELU is the tanh approximation
SCORE_BIAS = "instructrl_score_bias"
# Buffers some checkpoints carry that are not parameters.
BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
    """(ModelConfig, head) of a config.json; unknown architectures fail loudly."""
    arch = (hf.get("architectures") or [""])[0]
    head = "scalar" if arch.endswith("ForSequenceClassification") else "lm"
    if head == "scalar" and hf.get("num_labels", len(hf.get("id2label") or [0])) != 1:
        raise ValueError(f"{arch}: only one-label (reward / value) classifiers are supported")
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf), head
    if model_type in LLAMA_TYPES:
        return _llama_config(hf), head
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r} ({arch or 'no architectures'}); "
        f"supported: gpt2, {', '.join(LLAMA_TYPES)}"
    )


def _gpt2_config(hf) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise ValueError(f"gpt2: activation_function={activation!r} is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx=True is not supported")
    return ModelConfig(
        family="gpt",
        vocab_size=hf["vocab_size"],
        max_len=hf.get("n_positions", 1024),
        num_layers=hf["n_layer"],
        d_model=hf["n_embd"],
        num_heads=hf["n_head"],
        mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        scan_layers=True,
    )


def _llama_config(hf) -> ModelConfig:
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{model_type}: hidden_act={hf['hidden_act']!r} is not supported")
    if hf.get("mlp_bias"):
        raise ValueError(f"{model_type}: mlp_bias=True is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ValueError("llama: attention_bias=True (bias on o_proj too) is not supported")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
        raise ValueError(f"{model_type}: sliding-window attention is not supported")
    # transformers >= 5 writes rope_parameters; older files rope_theta + rope_scaling.
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = dict(rope_scaling="none")
    if kind == "linear":
        scaling = dict(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif kind == "llama3":
        scaling = dict(
            rope_scaling="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_len=int(rope["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise ValueError(f"{model_type}: rope scaling type {kind!r} is not supported")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or None,
        scan_layers=True,
        **scaling,
    )


def sources(cfg: ModelConfig, head: str = "lm", score_bias: float = 0.0) -> dict:
    """Our param path (layer params under "layers", names holding {i}) -> Source."""
    if cfg.family == "gpt":
        out = _gpt2_sources(cfg)
        embed_name = "transformer.wte.weight"
    else:
        out = _llama_sources(cfg)
        embed_name = "model.embed_tokens.weight"
    d, v = cfg.d_model, cfg.vocab_size
    if head == "scalar":
        out[("scalar_head", "kernel")] = Source(("score.weight",), ((1, d),), transpose, transpose)
        out[("scalar_head", "bias")] = const([score_bias])
    elif not cfg.tied:
        out[("lm_head", "kernel")] = Source(("lm_head.weight",), ((v, d),), transpose, transpose)
    out[("embed", "embedding")] = Source((embed_name,), ((v, d),), identity, identity)
    return out


def _llama_sources(cfg: ModelConfig) -> dict:
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.hidden_dim
    layer = "model.layers.{i}."

    def proj(name, heads):  # (heads * h, d) -> (d, heads, h)
        return Source(
            (layer + name,),
            ((heads * h, d),),
            lambda w: w.T.reshape(d, heads, h),
            lambda ours, _: ours.reshape(d, heads * h).T,
        )

    def linear(name, out_dim, in_dim):  # (out, in) -> (in, out)
        return Source((layer + name,), ((out_dim, in_dim),), transpose, transpose)

    def vector(name, size):
        return Source((layer + name,), ((size,),), identity, identity)

    out = {
        ("layers", "norm_attn", "scale"): vector("input_layernorm.weight", d),
        ("layers", "attn", "query", "kernel"): proj("self_attn.q_proj.weight", n),
        ("layers", "attn", "key", "kernel"): proj("self_attn.k_proj.weight", k),
        ("layers", "attn", "value", "kernel"): proj("self_attn.v_proj.weight", k),
        ("layers", "attn", "out", "kernel"): Source(
            (layer + "self_attn.o_proj.weight",),
            ((d, n * h),),
            lambda w: w.T.reshape(n, h, d),
            lambda ours, _: ours.reshape(n * h, d).T,
        ),
        ("layers", "norm_mlp", "scale"): vector("post_attention_layernorm.weight", d),
        ("layers", "mlp", "gate", "kernel"): linear("mlp.gate_proj.weight", f, d),
        ("layers", "mlp", "up", "kernel"): linear("mlp.up_proj.weight", f, d),
        ("layers", "mlp", "fc_out", "kernel"): linear("mlp.down_proj.weight", d, f),
        ("final_norm", "scale"): Source(("model.norm.weight",), ((d,),), identity, identity),
    }
    if cfg.has_qkv_bias:
        for ours, theirs, heads in (("query", "q", n), ("key", "k", k), ("value", "v", k)):
            out[("layers", "attn", ours, "bias")] = Source(
                (layer + f"self_attn.{theirs}_proj.bias",),
                ((heads * h,),),
                lambda b, heads=heads: b.reshape(heads, h),
                lambda ours, _: ours.reshape(-1),
            )
    return out


def _gpt2_sources(cfg: ModelConfig) -> dict:
    d, n, h, f = cfg.d_model, cfg.num_heads, cfg.head_size, cfg.hidden_dim
    if n * h != d or cfg.kv_heads != n or cfg.has_qkv_bias is False:
        raise ValueError("gpt2 layout needs num_heads * head_dim == d_model, no GQA, biases")
    layer, top = "transformer.h.{i}.", "transformer."

    def fused(part):  # c_attn: (d, 3d) = [q | k | v] columns, already (in, out)
        cols = slice(part * d, (part + 1) * d)

        def put(ours, tensor):
            tensor = tensor.copy()
            tensor[..., cols] = ours.reshape(*tensor.shape[:-1], d)
            return tensor

        return {
            "kernel": Source(
                (layer + "attn.c_attn.weight",),
                ((d, 3 * d),),
                lambda w: w[:, cols].reshape(d, n, h),
                put,
            ),
            "bias": Source(
                (layer + "attn.c_attn.bias",), ((3 * d,),), lambda b: b[cols].reshape(n, h), put
            ),
        }

    def tensor(name, shape, fn=identity, inverse=identity, prefix=layer):
        return Source((prefix + name,), (shape,), fn, inverse)

    out = {}
    for part, ours in enumerate(("query", "key", "value")):
        for leaf, source in fused(part).items():
            out[("layers", "attn", ours, leaf)] = source
    out.update(
        {
            ("layers", "norm_attn", "scale"): tensor("ln_1.weight", (d,)),
            ("layers", "norm_attn", "bias"): tensor("ln_1.bias", (d,)),
            ("layers", "attn", "out", "kernel"): tensor(
                "attn.c_proj.weight",
                (d, d),
                lambda w: w.reshape(n, h, d),
                lambda ours, _: ours.reshape(d, d),
            ),
            ("layers", "attn", "out", "bias"): tensor("attn.c_proj.bias", (d,)),
            ("layers", "norm_mlp", "scale"): tensor("ln_2.weight", (d,)),
            ("layers", "norm_mlp", "bias"): tensor("ln_2.bias", (d,)),
            ("layers", "mlp", "fc_in", "kernel"): tensor("mlp.c_fc.weight", (d, f)),
            ("layers", "mlp", "fc_in", "bias"): tensor("mlp.c_fc.bias", (f,)),
            ("layers", "mlp", "fc_out", "kernel"): tensor("mlp.c_proj.weight", (f, d)),
            ("layers", "mlp", "fc_out", "bias"): tensor("mlp.c_proj.bias", (d,)),
            ("final_norm", "scale"): tensor("ln_f.weight", (d,), prefix=top),
            ("final_norm", "bias"): tensor("ln_f.bias", (d,), prefix=top),
            ("pos_embed",): tensor("wpe.weight", (cfg.max_len, d), prefix=top),
        }
    )
    return out


class AliasedReader:
    """A reader that finds ``transformer.h.0...`` also as ``h.0...`` (original GPT-2 files)
    and ``model.x`` also as ``x`` (bare base-model files), and says which tensors went unread."""

    PREFIXES = ("transformer.", "model.")

    def __init__(self, reader):
        self._reader = reader
        self._present = set(reader.names())

    def resolve(self, name: str) -> str:
        if name in self._present:
            return name
        for prefix in self.PREFIXES:
            if name.startswith(prefix) and name[len(prefix) :] in self._present:
                return name[len(prefix) :]
        return name

    def names(self) -> list[str]:
        return [*self._present, *(n for p in self.PREFIXES for n in self._with_prefix(p))]

    def _with_prefix(self, prefix):
        return [prefix + n for n in self._present if not n.startswith(self.PREFIXES)]

    def shape(self, name):
        return self._reader.shape(self.resolve(name))

    def read(self, name):
        return self._reader.read(self.resolve(name))

    def unused(self, used: set[str]) -> list[str]:
        used = {self.resolve(n) for n in used}
        return sorted(n for n in self._present - used if not n.endswith(BUFFERS))


def read_config(directory: str) -> tuple[ModelConfig, str, dict[str, Any]]:
    """(ModelConfig, head, raw config.json) of a Hugging Face model directory."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no config.json")
    with open(path) as f:
        hf = json.load(f)
    cfg, head = config_from_hf(hf)
    return cfg, head, hf


def open_checkpoint(directory: str) -> tuple[ModelConfig, str, dict, AliasedReader]:
    """Config, head, Sources and a reader of a Hugging Face directory, all tensors checked."""
    cfg, head, hf = read_config(directory)
    table = sources(cfg, head, float(hf.get(SCORE_BIAS, 0.0)))
    reader = AliasedReader(SafetensorsReader(directory))
    check_sources(table, reader, cfg.num_layers)
    unused = reader.unused(used_tensors(table, cfg.num_layers))
    if cfg.tied:
        unused = [n for n in unused if n != "lm_head.weight"]  # some files store the tie twice
    if unused:
        raise ValueError(f"{directory}: tensors with no place in the model: {unused[:8]}")
    return cfg, head, table, reader


# ---------------------------------------------------------------------------------- export


def hf_config(cfg: ModelConfig, head: str = "lm", score_bias: float = 0.0, **ids) -> dict:
    """The config.json of our model; ``ids``: bos/eos/pad_token_id when known."""
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tied, **ids)
    common["torch_dtype"] = dtype[cfg.param_dtype]
    if cfg.family == "gpt":
        model_type, prefix = "gpt2", "GPT2"
        out = dict(
            n_positions=cfg.max_len,
            n_embd=cfg.d_model,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.hidden_dim,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        model_type = "qwen2" if cfg.has_qkv_bias else "llama"
        prefix = "Qwen2" if cfg.has_qkv_bias else "Llama"
        rope = None
        if cfg.rope_scaling == "linear":
            rope = dict(rope_type="linear", factor=cfg.rope_factor)
        elif cfg.rope_scaling == "llama3":
            rope = dict(
                rope_type="llama3",
                factor=cfg.rope_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
            )
        out = dict(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_size,
            hidden_act="silu",
            max_position_embeddings=cfg.max_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            rope_scaling=rope,
            attention_bias=False,
            mlp_bias=False,
            use_sliding_window=False,
        )
    suffix = "ForSequenceClassification" if head == "scalar" else "ForCausalLM"
    if model_type == "gpt2" and head == "lm":
        suffix = "LMHeadModel"
    out.update(common, model_type=model_type, architectures=[prefix + suffix])
    if head == "scalar":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        out[SCORE_BIAS] = score_bias
    return out


def export_hf(
    params: dict[str, Any],
    cfg: ModelConfig,
    directory: str,
    head: str = "lm",
    tokenizer_dir: str | None = None,
    **ids,
) -> str:
    """Write ``params`` (scanned or unrolled) as a Hugging Face directory: config.json,
    model.safetensors, and tokenizer files copied from ``tokenizer_dir``. Tensors are fetched
    from the devices one at a time. ``ids``: bos_token_id / eos_token_id / pad_token_id."""
    if head == "scalar" and cfg.reward_readout != "last":
        raise ValueError(
            f"model.reward_readout={cfg.reward_readout!r}: a Hugging Face sequence-classification "
            "model reads its score at the last token only; export a reward model trained with "
            "model.reward_readout='last'"
        )
    os.makedirs(directory, exist_ok=True)
    params = nn.unbox(params)  # fresh Flax params may still carry their logical-axis boxes
    flat = traverse_util.flatten_dict(params)
    scanned = any(path[0] == "layers" for path in flat)
    score_bias = 0.0
    if head == "scalar":
        score_bias = float(np.asarray(jax.device_get(params["scalar_head"]["bias"])).reshape(-1)[0])
    table = sources(cfg, head)
    writers: dict[
        str, tuple[tuple[int, ...], list]
    ] = {}  # tensor -> (shape, [(path, layer, inverse)])
    for key, source in table.items():
        if not source.names:
            continue  # the score bias goes to config.json
        (name,), (shape,) = source.names, source.shapes
        for i in range(cfg.num_layers) if key[0] == "layers" else [None]:
            path = key if i is None or scanned else (f"layers_{i}", *key[1:])
            layer = i if scanned and key[0] == "layers" else None
            entry = writers.setdefault(name.format(i=i), (shape, []))
            entry[1].append((path, layer, source.inverse))

    def make(shape, parts):
        tensor = np.zeros(shape, np.float32)
        for path, layer, inverse in parts:
            ours = flat[path] if layer is None else flat[path][layer]
            tensor = inverse(np.asarray(jax.device_get(ours), np.float32), tensor)
        return tensor

    dtype = np.dtype(cfg.weight_dtype)
    tensors = [
        (name, shape, dtype, lambda shape=shape, parts=parts: make(shape, parts))
        for name, (shape, parts) in writers.items()
    ]
    save_file(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(cfg, head, score_bias, **ids), f, indent=2)
    if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(directory):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
    return directory
