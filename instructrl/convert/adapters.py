"""A LoRA stage's adapters alone (``lora.export`` "separate", written by
``lora.write_adapters`` under workdir/adapter) as safetensors and back.

  python -m instructrl.convert --export runs/lora_ppo --out hf/lora_ppo_adapter --adapter

writes ``adapter_model.safetensors`` (each tensor named by its param path,
"layers.attn.query_lora_a"; scanned layers keep their leading layer axis) and
``adapter_config.json`` (rank, alpha, targets, the base stage); ``read_safetensors`` reads
them back, and ``lora.merge(lora.combine(base, adapters), alpha)`` folds them into the base.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from instructrl import fs
from instructrl.convert.safetensors import SafetensorsReader, save_file

ADAPTER_DIR = "adapter"


def read_spec(workdir: str) -> dict[str, Any]:
    """The ``adapter.json`` a stage wrote with its adapters."""
    return json.loads(fs.read_text(os.path.join(workdir, ADAPTER_DIR, "adapter.json")))


def stage_adapters(workdir: str) -> dict:
    """The adapters a stage wrote (``write_adapters``) as NumPy arrays, any process layout."""
    directory = os.path.join(fs.absolute(workdir), ADAPTER_DIR)
    if not fs.isdir(directory):
        raise FileNotFoundError(
            f"{directory}: no adapters (train with --config.lora.export=separate)"
        )
    mngr = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler())
    step = mngr.latest_step()
    meta = mngr.item_metadata(step)
    meta = meta.tree if hasattr(meta, "tree") else meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    out = mngr.restore(step, args=ocp.args.PyTreeRestore(restore_args=args))["params"]
    mngr.close()
    return out


def export_safetensors(workdir: str, out: str) -> str:
    """A stage's adapters as ``out/adapter_model.safetensors`` and ``out/adapter_config.json``
    (the module docstring)."""
    flat = traverse_util.flatten_dict(stage_adapters(workdir), sep=".")
    os.makedirs(out, exist_ok=True)
    tensors = [(name, x.shape, x.dtype, lambda x=x: np.asarray(x)) for name, x in flat.items()]
    save_file(os.path.join(out, "adapter_model.safetensors"), tensors)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(read_spec(workdir), f, indent=2)
    return out


def read_safetensors(directory: str) -> tuple[dict, dict[str, Any]]:
    """(adapters as a nested dict of NumPy arrays, adapter_config) of ``export_safetensors``."""
    reader = SafetensorsReader(directory)
    flat = {name: np.array(reader.read(name)) for name in reader.names()}
    with open(os.path.join(directory, "adapter_config.json")) as f:
        spec = json.load(f)
    return traverse_util.unflatten_dict(flat, sep="."), spec
