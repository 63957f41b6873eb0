"""Command line: ``instructrl [train|pipeline] [--config FILE[:ARG]] --workdir DIR [--config.x=y]``.

  instructrl train --config configs/sft.py:runlocal --workdir /tmp/sft --config.train.steps=20
  instructrl pipeline --workdir runs/main            # configs/pipeline.py, the built-in default
  instructrl pipeline --workdir runs/x --config.ptx_coef=0.3 --print_config

Configs are Python files exposing ``get_config(arg)``; every field, sequences included, can be
overridden with ``--config.<path>=<value>`` (or ``--config.<path> <value>``), parsed as the
field's type; an unknown field or a value of the wrong type is an error naming it.
``--print_config`` prints the fully resolved config (every stage's, for ``pipeline``) and
exits. Errors in the user's config or data print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from instructrl import config_lib, pipeline, report, runtime
from instructrl.checkpoint import CheckpointError
from instructrl.data.errors import DataError
from instructrl.stages import TRAINERS

COMMANDS = ("train", "pipeline")
DEFAULT_CONFIG = {"pipeline": "pipeline"}  # configs/<name>.py when --config is not given


def parse(argv: list[str]) -> tuple[str, argparse.Namespace, list[tuple[str, str]]]:
    """(command, flags, [(dotted field, text)]) of a command line (without the program)."""
    command = "train"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise SystemExit(f"instructrl: error: {arg} needs a value")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    parser = argparse.ArgumentParser(
        prog=f"instructrl {command}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", help="FILE[:ARG], e.g. configs/sft.py:runlocal")
    parser.add_argument("--workdir", help="directory for checkpoints, metrics and outputs")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config")
    parser.add_argument("--jax_distributed", action="store_true",
                        help="call jax.distributed.initialize() (multi-host)")  # fmt: skip
    parser.add_argument("--compile_cache", default=runtime.DEFAULT_CACHE,
                        help="directory of cached XLA executables ('' = off)")  # fmt: skip
    flags = parser.parse_args(rest)
    return command, flags, overrides


def main(argv: list[str] | None = None) -> int:
    command, flags, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    spec = flags.config or DEFAULT_CONFIG.get(command)
    if spec is None:
        raise config_lib.ConfigError("--config is required, e.g. --config configs/sft.py:runlocal")
    config = config_lib.load_config(spec).unlock()
    config_lib.apply_overrides(config, overrides)
    config.lock()
    if command == "pipeline":
        workdir = flags.workdir or "runs/main"
        if flags.print_config:
            print(pipeline.print_config(pipeline.resolve(config, workdir)), end="")
            return 0
    else:
        if config.get("stage") not in TRAINERS:
            raise config_lib.ConfigError(
                f"config.stage={config.get('stage')!r} is not a training stage; "
                f"known: {', '.join(TRAINERS)}"
            )
        if flags.print_config:
            print(config.copy_and_resolve_references(), end="")
            return 0
        workdir = flags.workdir
    if not workdir:
        raise config_lib.ConfigError("--workdir is required")
    if flags.jax_distributed:
        jax.distributed.initialize()
    runtime.configure(compile_cache=flags.compile_cache)
    runtime.setup_logging()
    if command == "pipeline":
        pipeline.run(config, workdir)
        report_path = os.path.join(workdir, "report.json")
        if os.path.exists(report_path):
            with open(report_path) as f:
                print("\n" + report.headline(json.load(f)) + "\n")
            print(f"full report: {os.path.join(workdir, 'report.md')}")
    else:
        TRAINERS[config.stage](config, workdir)
    return 0


def cli(argv: list[str] | None = None) -> None:
    """The ``instructrl`` entry point: user errors (config, data, checkpoints) as one line."""
    try:
        code = main(argv)
    except (config_lib.ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"instructrl: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    cli()
