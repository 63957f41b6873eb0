"""A pretrained model as an instructrl workdir: what ``init_from`` and configs read."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

from instructrl import checkpoint, convert
from instructrl.model import ModelConfig

log = logging.getLogger(__name__)

# ModelConfig fields that describe the architecture (numerics and layout stay with the config).
ARCHITECTURE = (
    "family",
    "vocab_size",
    "max_len",
    "num_layers",
    "d_model",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
    "qkv_bias",
    "norm_eps",
    "tie_embeddings",
)


def architecture(cfg: ModelConfig) -> dict:
    """The architecture fields of ``cfg`` (None ones dropped): ``config.model`` overrides."""
    fields = {k: getattr(cfg, k) for k in ARCHITECTURE}
    return {k: v for k, v in fields.items() if v is not None}


def model_fields(source: str) -> dict:
    """Architecture fields of an import workdir (its model.json), a HF dir or a GGUF file."""
    path = os.path.join(source, "model.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    cfg, _ = convert.read_model_config(source)
    return architecture(cfg)


def import_to_workdir(source: str, workdir: str, param_dtype: str = "float32") -> ModelConfig:
    """Convert ``source`` into ``workdir``: export/ params, model.json, tokenizer/."""
    path = convert._strip(source)
    cfg, head, params = convert.load_pretrained(source, param_dtype=param_dtype)
    os.makedirs(workdir, exist_ok=True)
    checkpoint.export_params(workdir, params, {"source": os.path.abspath(path), "head": head})
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(architecture(cfg), f, indent=2)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if convert.is_gguf(source):
        from instructrl.convert import gguf  # the optional gguf package

        gguf.write_tokenizer(path, tokenizer_dir)
    elif os.path.isfile(os.path.join(path, "tokenizer.json")):
        os.makedirs(tokenizer_dir, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(path, name)):
                shutil.copy(os.path.join(path, name), tokenizer_dir)
    log.info("imported %s (%s head) into %s: %s", path, head, workdir, dataclasses.asdict(cfg))
    return cfg
