"""Command line: ``instructrl [train|pipeline] --config FILE[:ARG] --workdir DIR [--config.x=y]``.

  python -m instructrl.main --config configs/sft.py:runlocal --workdir /tmp/sft
  instructrl pipeline --workdir runs/main            # the built-in default pipeline
Configs are Python files exposing ``get_config(arg)``; any field can be overridden on the
command line with ``--config.<path>=<value>`` (ml_collections config flags).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

COMMANDS = ("train", "pipeline")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sft.py:runlocal")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
    flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (multi-host).")
    return flags.FLAGS


def run_stage(config, workdir: str):
    """Dispatch one training stage by ``config.stage``."""
    if config.stage in ("pretrain", "sft"):
        from instructrl import sft

        return sft.run(config, workdir)
    if config.stage == "rm":
        from instructrl import rm

        return rm.run(config, workdir)
    if config.stage == "ppo":
        from instructrl import ppo

        return ppo.run(config, workdir)
    raise ValueError(f"config.stage={config.stage!r} is not a known stage (pretrain, sft, rm, ppo)")


def _main(command: str, flags, argv):
    del argv
    import jax

    if flags.jax_distributed:
        jax.distributed.initialize()
    jax.config.update("jax_threefry_partitionable", True)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not flags.workdir:
        raise SystemExit("--workdir is required")
    if command == "pipeline":
        from instructrl import pipeline

        config = flags.config or pipeline.default_config()
        pipeline.run(config, flags.workdir)
        report_path = os.path.join(flags.workdir, "report.json")
        if os.path.exists(report_path):
            from instructrl import report

            with open(report_path) as f:
                print("\n" + report.headline(json.load(f)) + "\n")
            print(f"full report: {os.path.join(flags.workdir, 'report.md')}")
    else:
        if flags.config is None:
            raise SystemExit("--config is required, e.g. --config configs/sft.py:runlocal")
        run_stage(flags.config, flags.workdir)


def cli(argv: list[str] | None = None):
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    command = "train"
    if len(argv) > 1 and argv[1] in COMMANDS:
        command = argv.pop(1)
    flags = _define_flags()
    app.run(functools.partial(_main, command, flags), argv=argv)


if __name__ == "__main__":
    cli()
