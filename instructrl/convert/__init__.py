"""Pretrained weights in and out: Hugging Face directories (safetensors) and GGUF files.

  cfg, head, params = convert.load_pretrained("path/to/hf_dir", mesh, rules)
  cfg, head, params = convert.load_pretrained("model.gguf")
  convert.export_hf(params, cfg, "out_dir", head="lm", tokenizer_dir=...)

``load_params(source, abstract)`` fills any abstract param tree that carries shardings (what
``checkpoint.latest_params`` restores into), so ``init_from="hf:DIR"`` / ``"gguf:FILE"`` work
like a stage's workdir. ``python -m instructrl.convert --source SRC --workdir DIR`` writes an
instructrl workdir (exported params, model.json, tokenizer/) that stages ``init_from``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructrl import checkpoint, sharding
from instructrl.convert import hf
from instructrl.convert.hf import export_hf, hf_config
from instructrl.convert.loading import load_into
from instructrl.model import ModelConfig, Transformer

PREFIXES = ("hf:", "gguf:")

__all__ = [
    "PREFIXES",
    "export_hf",
    "hf_config",
    "load_params",
    "load_pretrained",
    "open_source",
    "read_model_config",
]


def _strip(source: str) -> str:
    for prefix in PREFIXES:
        if source.startswith(prefix):
            return source[len(prefix) :]
    return source


def is_gguf(source: str) -> bool:
    return source.startswith("gguf:") or source.endswith(".gguf")


def open_source(source: str):
    """(ModelConfig, head, sources, reader) of a HF directory or a GGUF file, checked."""
    path = os.path.expanduser(_strip(source))
    if is_gguf(source):
        from instructrl.convert import gguf  # the optional gguf package

        return gguf.open_checkpoint(path)
    return hf.open_checkpoint(path)


def read_model_config(source: str) -> tuple[ModelConfig, str]:
    """The ModelConfig and head a pretrained file describes (reads metadata only)."""
    cfg, head, _, _ = open_source(source)
    return cfg, head


def load_params(source: str, abstract: Any) -> Any:
    """Params of ``source`` in the tree, dtypes and shardings of ``abstract`` (a tree of
    ShapeDtypeStructs with shardings, scanned or unrolled layers, possibly a sub-tree).

    source: a stage's workdir (``checkpoint.latest_params``: export/, best/, checkpoints/),
    ``hf:DIR`` or ``gguf:FILE`` (read straight into those shardings)."""
    if not source.startswith(PREFIXES):
        return checkpoint.latest_params(source, abstract)
    _, _, table, reader = open_source(source)
    return load_into(abstract, table, reader)


def load_pretrained(
    source: str,
    mesh=None,
    rules=None,
    head: str | None = None,
    **overrides,
) -> tuple[ModelConfig, str, Any]:
    """(ModelConfig, head, params) of a pretrained model, each param built into its sharding.

    ``overrides`` change numerics or layout only (scan_layers, param_dtype, dtype, remat...).
    ``head`` defaults to the file's own (a causal LM, or a one-label classifier: "scalar").
    """
    cfg, file_head, table, reader = open_source(source)
    cfg = dataclasses.replace(cfg, **overrides)
    head = head or file_head
    mesh = mesh or sharding.make_mesh({"data": -1})
    rules = rules or sharding.LOGICAL_RULES
    model = Transformer(cfg, head=head)

    def init():
        with nn.logical_axis_rules(rules):
            tokens = jnp.zeros((1, 8), jnp.int32)
            return model.init(jax.random.key(0), tokens)["params"]

    boxed = jax.eval_shape(init)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = sharding.abstract_with_shardings(nn.unbox(boxed), shardings)
    return cfg, head, load_into(abstract, table, reader)
