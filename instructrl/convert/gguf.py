"""GGUF (llama.cpp) files -> instructrl params and a Hugging Face tokenizer.json.

GGUF keeps the Llama layout under other names (``blk.{i}.attn_q.weight`` ...), with tensor
dims listed innermost first (ggml's ne0 is the contiguous axis), so reversed they are torch's
(out, in). We present the file through the Hugging Face names of ``convert.hf`` and reuse its
mapping; the ``gguf`` package dequantizes Q4_0/Q4_1/Q8_0/K-quants/F16/F32 to float32.

llama.cpp's converter permutes the rows of q_proj and k_proj so that its rotary kernel can rotate
adjacent pairs (2j, 2j+1) instead of the rotate-half pairs (j, j + H/2): per head, rows
(2, H/2) are stored as (H/2, 2). ``unpermute_rows`` undoes that, after which the weights fit
our rotate-half ``rotary``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from instructrl.convert import hf
from instructrl.convert.loading import check_sources, used_tensors

# Our (Hugging Face) names <- GGUF names.
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)$")
# llama.cpp pre-tokenizers whose regex splits digits one by one before GPT-2's byte-level regex.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
PLAIN_PRE = ("default", "gpt-2", "gpt2")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that are special tokens
ARRAY_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, (H/2, 2) row order -> (2, H/2).

    w: (heads * H, D). The converter wrote w.reshape(heads, 2, H/2, D).swapaxes(1, 2).
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """Tensors of a GGUF file under Hugging Face Llama names, dequantized on read."""

    def __init__(self, path: str):
        import gguf  # optional: the gguf package reads and dequantizes the file

        self.path = path
        self._gguf = gguf
        self._reader = gguf.GGUFReader(path)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.meta = {}
        for key, field in self._reader.fields.items():
            self.meta[key] = field.contents()
        self._ours = {}
        for name in self._tensors:
            self._ours[_hf_name(name)] = name
        self.heads: dict[str, int] = {}  # set by config(): q/k rows to unpermute

    def config(self) -> dict[str, Any]:
        """A Hugging Face config.json dict built from the GGUF metadata."""
        meta = self.meta
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: unsupported GGUF architecture {arch!r} (only llama)")
        if "rope_freqs.weight" in self._tensors:
            raise ValueError(f"{self.path}: per-frequency RoPE factors are not supported")

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        d, heads = int(get("embedding_length")), int(get("attention.head_count"))
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(get("attention.key_length", d // heads))
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise ValueError(f"{self.path}: partial rotary embeddings are not supported")
        config = dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            vocab_size=int(get("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
            hidden_size=d,
            num_hidden_layers=int(get("block_count")),
            intermediate_size=int(get("feed_forward_length")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
        )
        scaling = get("rope.scaling.type")
        if scaling == "linear":
            config["rope_scaling"] = dict(rope_type="linear", factor=get("rope.scaling.factor"))
        elif scaling not in (None, "none"):
            raise ValueError(f"{self.path}: rope scaling {scaling!r} is not supported")
        self.heads = {"attn_q.weight": heads, "attn_k.weight": kv_heads}
        return config

    def names(self) -> list[str]:
        return list(self._ours)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[self._ours[name]].shape))

    def read(self, name: str) -> np.ndarray:
        return self._read(self._ours[name])

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one reader per load, a few tensors)
    def _read(self, gguf_name: str) -> np.ndarray:
        tensor = self._tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        w = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        w = np.asarray(w, np.float32).reshape(shape)
        kind = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name
        if kind in self.heads:
            w = unpermute_rows(w, self.heads[kind])
        return w

    def unused(self, used: set[str]) -> list[str]:
        return sorted(self._ours[n] for n in set(self._ours) - used)


def _hf_name(gguf_name: str) -> str:
    for ours, theirs in GLOBAL_NAMES.items():
        if gguf_name == theirs:
            return ours
    match = GGUF_LAYER.match(gguf_name)
    if match:
        for ours, theirs in LAYER_NAMES.items():
            if match.group(2) == theirs:
                return f"model.layers.{match.group(1)}.{ours}"
    return gguf_name  # unknown: reported as unused


def open_checkpoint(path: str):
    """(ModelConfig, head, sources, reader) of a GGUF file; every tensor checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    reader = GGUFFile(path)
    cfg, head = hf.config_from_hf(reader.config())
    table = hf.sources(cfg, head)
    check_sources(table, reader, cfg.num_layers)
    unused = reader.unused(used_tensors(table, cfg.num_layers))
    if unused:
        raise ValueError(f"{path}: GGUF tensors with no place in the model: {unused[:8]}")
    return cfg, head, table, reader


def tokenizer_json(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF tokenizer metadata (BPE, byte level)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in PLAIN_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    special = [tokens[i] for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def write_tokenizer(path: str, directory: str) -> str:
    """tokenizer.json + tokenizer_config.json (eos, pad, bos, chat template) of a GGUF file."""
    import gguf  # optional: the gguf package reads the file's metadata

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    os.makedirs(directory, exist_ok=True)
    tokenizer_json(meta).save(os.path.join(directory, "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    config = {}
    for field in ("eos", "pad", "bos", "unknown"):
        token_id = meta.get(f"tokenizer.ggml.{field}_token_id")
        if token_id is not None:
            config["unk_token" if field == "unknown" else f"{field}_token"] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory
