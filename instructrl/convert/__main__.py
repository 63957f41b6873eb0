"""Import a pretrained model into an instructrl workdir that stages can ``init_from``.

  python -m instructrl.convert --source path/to/SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/base
  python -m instructrl.convert --source path/to/hf_model_dir --workdir runs/base

Writes ``workdir/export`` (params, as a stage's export), ``workdir/model.json`` (the
ModelConfig fields the file describes: give them to ``config.model``) and
``workdir/tokenizer/`` (tokenizer.json + tokenizer_config.json: ``tokenizer.path``).
"""

from __future__ import annotations

import argparse
import logging

from instructrl.convert.workdir import import_to_workdir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="HF model directory or .gguf file")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--param_dtype", default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    import_to_workdir(args.source, args.workdir, param_dtype=args.param_dtype)
    print(f"imported {args.source} -> {args.workdir}")


if __name__ == "__main__":
    main()
