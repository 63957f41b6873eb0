"""Model size presets: every row of GPT-3's Table 2.1 (Brown et al. 2020) plus tiny CPU sizes.

GPT-3 rows keep the table's n_layers, d_model, n_heads and d_head, a 2048-token context and the
GPT-2 BPE vocabulary (50,257 tokens, padded to a multiple of 128 so the vocab axis shards evenly
and the matmuls tile well). Two rows of the table do not add up and are resolved so that the
parameter count matches the row's name:
  * 1.3B lists 24 heads of 128 dims (3,072 != d_model 2,048); that would give 1.5B parameters,
    so we use 16 heads of 128 (as GPT-Neo 1.3B does);
  * 13B lists d_model 5,140 with 40 heads of 128 (5,120); we keep d_model 5,140 and project
    attention to 40 x 128, as the table states.
"""

from __future__ import annotations

from instructrl import runtime
from instructrl.model import ModelConfig

GPT2_VOCAB = 50257


def pad_vocab(size: int, multiple: int = 128) -> int:
    return -(-size // multiple) * multiple


# name: (n_params as stated in the table, n_layers, d_model, n_heads, d_head)
GPT3_TABLE = {
    "gpt3-125m": (125e6, 12, 768, 12, 64),
    "gpt3-350m": (350e6, 24, 1024, 16, 64),
    "gpt3-760m": (760e6, 24, 1536, 16, 96),
    "gpt3-1.3b": (1.3e9, 24, 2048, 16, 128),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128),
    "gpt3-13b": (13.0e9, 40, 5140, 40, 128),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128),
}

TINY = {
    # Sizes that train in seconds to minutes on a 2-core CPU. Their layers are unrolled: on the
    # CPU the backward pass of a layer scan costs 1.9x the unrolled one (scripts/bench_train.py,
    # small preset: 778 vs 417 ms a step); deep models keep ``nn.scan`` for fast compiles.
    "tiny": dict(family="gpt", num_layers=2, d_model=64, num_heads=4, max_len=256),
    "small": dict(family="gpt", num_layers=4, d_model=128, num_heads=4, max_len=256),
    # 3.4x small's non-embedding parameters: the "larger base model" of experiment (e).
    "medium": dict(family="gpt", num_layers=6, d_model=192, num_heads=6, max_len=256),
    "llama-tiny": dict(
        family="llama", num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, max_len=256
    ),
    "llama-small": dict(
        family="llama", num_layers=4, d_model=128, num_heads=8, num_kv_heads=2, max_len=256
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig by preset name; keyword overrides win (e.g. vocab_size, dtype, dropout)."""
    if name in GPT3_TABLE:
        _, layers, d_model, heads, d_head = GPT3_TABLE[name]
        fields = dict(
            family="gpt",
            num_layers=layers,
            d_model=d_model,
            num_heads=heads,
            head_dim=d_head,
            max_len=2048,
            vocab_size=pad_vocab(GPT2_VOCAB),
        )
    elif name == "gpt2-small":
        fields = dict(
            family="gpt",
            num_layers=12,
            d_model=768,
            num_heads=12,
            max_len=1024,
            vocab_size=pad_vocab(GPT2_VOCAB),
        )
    elif name in TINY:
        fields = dict(TINY[name], scan_layers=False)
    else:
        known = sorted([*GPT3_TABLE, *TINY, "gpt2-small"])
        raise KeyError(f"unknown model preset {name!r}; known presets: {known}")
    fields.update(overrides)
    return ModelConfig(**fields)


def model_config(config, tokenizer) -> ModelConfig:
    """The ModelConfig of a stage config's ``model`` section (a preset name plus overrides);
    the vocabulary defaults to the tokenizer's, padded to a multiple of 128; ``matmul_dtype``
    "auto" is bfloat16 on a backend that multiplies it faster (``runtime``), else ""."""
    fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    if fields.get("matmul_dtype") == "auto":  # bfloat16 products where they are faster
        fields["matmul_dtype"] = "bfloat16" if runtime.fast_bfloat16_products() else ""
    fields.setdefault("vocab_size", pad_vocab(tokenizer.vocab_size))
    if fields["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={fields['vocab_size']} < tokenizer vocabulary {tokenizer.vocab_size}"
        )
    return preset(config.model.preset, **fields)
