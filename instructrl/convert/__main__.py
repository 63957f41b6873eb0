"""Pretrained weights in and out of instructrl workdirs.

Import a Hugging Face directory or a GGUF file into a workdir that stages ``init_from``:

  python -m instructrl.convert --source path/to/SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/base
  python -m instructrl.convert --source path/to/hf_model_dir --workdir runs/base

writes ``workdir/export`` (params, as a stage's export), ``workdir/model.json`` (the
ModelConfig fields the file describes: give them to ``config.model``) and
``workdir/tokenizer/`` (tokenizer.json + tokenizer_config.json: ``tokenizer.path``).

Export a trained stage (SFT, RM, PPO: what its ``workdir/export`` holds, e.g. PPO's EMA policy)
as a Hugging Face directory that ``transformers`` loads unchanged:

  python -m instructrl.convert --export runs/main/ppo_ptx --out hf/ppo_ptx
  python -m instructrl.convert --export runs/main/rm --out hf/rm   # *ForSequenceClassification

The stage's model and tokenizer come from its ``run_info.json``; an RM stage is exported with
its scalar head (``--head`` overrides). A LoRA stage's export is merged (plain weights); one
trained with ``--config.lora.export=separate`` also exports its adapters alone:

  python -m instructrl.convert --export runs/lora_ppo --out hf/lora_ppo_adapter --adapter
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import jax
import ml_collections

from instructrl.convert.adapters import export_safetensors
from instructrl.convert.hf import export_hf
from instructrl.convert.workdir import import_to_workdir
from instructrl.policy_io import Toolkit


def export_stage(workdir: str, out: str, head: str | None = None) -> str:
    """Write the params ``workdir`` exported as a Hugging Face directory ``out``."""
    info_path = os.path.join(workdir, "run_info.json")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{info_path}: not a stage workdir (no run_info.json)")
    with open(info_path) as f:
        config = ml_collections.ConfigDict(json.load(f)["config"])
    head = head or ("scalar" if config.get("stage") == "rm" else "lm")
    tk = Toolkit(config)
    params = tk.params(workdir, head=head)
    tok = config.tokenizer
    tokenizer_dir = None
    if tok.get("kind") == "hf":
        path = tok.path
        tokenizer_dir = path if os.path.isdir(path) else os.path.dirname(path)
    ids = {"eos_token_id": tk.tokenizer.eos_id, "pad_token_id": tk.tokenizer.pad_id}
    return export_hf(params, tk.cfg, out, head=head, tokenizer_dir=tokenizer_dir, **ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="import: HF model directory or .gguf file")
    parser.add_argument("--workdir", help="import: the workdir to write")
    parser.add_argument("--param_dtype", default="float32")
    parser.add_argument("--export", metavar="STAGE_WORKDIR", help="export: a trained stage")
    parser.add_argument("--out", help="export: the Hugging Face directory to write")
    parser.add_argument("--head", choices=("lm", "scalar"), default=None)
    parser.add_argument("--adapter", action="store_true",
                        help="export: the stage's LoRA adapters alone (safetensors)")  # fmt: skip
    args = parser.parse_args(argv)
    if bool(args.export) == bool(args.source):
        parser.error("give --source and --workdir (import) or --export and --out (export)")
    if (args.source and not args.workdir) or (args.export and not args.out):
        parser.error("--source needs --workdir; --export needs --out")
    logging.basicConfig(level=logging.INFO)
    jax.config.update("jax_threefry_partitionable", True)
    if args.export and args.adapter:
        out = export_safetensors(args.export, args.out)
        print(f"exported the adapters of {args.export} -> {out}")
        return out
    if args.export:
        out = export_stage(args.export, args.out, args.head)
        print(f"exported {args.export} -> {out}")
        return out
    import_to_workdir(args.source, args.workdir, param_dtype=args.param_dtype)
    print(f"imported {args.source} -> {args.workdir}")
    return args.workdir


if __name__ == "__main__":
    main()
