"""Command line: ``instructrl COMMAND ...``; ``instructrl COMMAND --help`` lists each one's flags.

  instructrl train --config configs/sft.py:runlocal --workdir /tmp/sft --config.train.steps=20
  instructrl pipeline --workdir runs/main            # configs/pipeline.py, the built-in default
  instructrl pipeline --workdir runs/x --config.ptx_coef=0.3 --print_config
  instructrl sample --workdir runs/main/ppo_ptx --prompt "Name a color." --temperature 0
  instructrl sample --workdir DIR --prompts prompts.jsonl --output answers.jsonl
  instructrl chat --workdir runs/main/sft
  instructrl evaluate --policy runs/main/ppo --reference runs/main/sft \\
      --prompts runs/main/world/prompts_eval.jsonl --workdir runs/eval_ppo
  instructrl compile --config configs/ppo.py:model=gpt3-1.3b --topology v5e:4x4  # no TPU needed

For ``train``, ``pipeline`` and ``compile``, configs are Python files exposing
``get_config(arg)``; every field, sequences included, can be overridden with
``--config.<path>=<value>`` (or ``--config.<path> <value>``), parsed as the field's type; an
unknown field or a value of the wrong type is an error naming it. ``--print_config`` prints
the fully resolved config (every stage's, for ``pipeline``) and exits. ``compile`` compiles a
stage's jitted steps for a TPU topology on this host and prints their memory and cost per chip
(``instructrl.aot``). ``sample``, ``chat`` and ``evaluate`` read a policy workdir (a stage's or
an imported model's: ``instructrl.chat``). Errors in the user's config or data print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from instructrl import chat, config_lib, evaluate, fs, pipeline, report, runtime
from instructrl.checkpoint import CheckpointError
from instructrl.data.errors import DataError
from instructrl.stages import TRAINERS

COMMANDS = ("train", "pipeline", "compile")
TALK = ("sample", "chat", "evaluate")  # commands on a policy workdir (``talk``)
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
                        help="call jax.distributed.initialize() (multi-host; on TPU VMs and "
                             "under SLURM / Open MPI it finds its peers itself)")  # fmt: skip
    parser.add_argument(
        "--coordinator_address",
        default=None,
        help="with --jax_distributed: HOST:PORT of process 0 (GPU clusters)",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=None,
        help="with --jax_distributed: how many processes (hosts) in all",
    )
    parser.add_argument("--process_id", type=int, default=None,
                        help="with --jax_distributed: this process's index")  # fmt: skip
    parser.add_argument("--compile_cache", default=runtime.DEFAULT_CACHE,
                        help="directory of cached XLA executables ('' = off)")  # fmt: skip
    if command == "compile":
        parser.add_argument("--topology", required=True,
                            help="a TPU slice: v5e:4x4, v5p:4x4x4, v4:2x2x2...")  # fmt: skip
        parser.add_argument("--json", default="", help="also write the report here")
        parser.add_argument("--require_fit", action="store_true",
                            help="exit 1 when the stage does not fit the chips' HBM")  # fmt: skip
    flags = parser.parse_args(rest)
    return command, flags, overrides


def _sampling_flags(parser: argparse.ArgumentParser, temperature: float, new_tokens: int):
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
    parser.add_argument("--max_new_tokens", type=int, default=new_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=32, help="rows per sampler call")
    parser.add_argument("--compile_cache", default=runtime.DEFAULT_CACHE,
                        help="directory of cached XLA executables ('' = off)")  # fmt: skip


def _sampling(flags) -> dict:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
    return {k: getattr(flags, k) for k in keys}


def talk(command: str, argv: list[str]) -> int:
    """``sample``, ``chat`` and ``evaluate``: a policy workdir's answers."""
    parser = argparse.ArgumentParser(prog=f"instructrl {command}")
    if command == "evaluate":
        parser.description = "A policy against a reference on a prompts file."
        parser.add_argument("--policy", required=True, help="the policy's workdir")
        parser.add_argument("--reference", required=True, help="the reference's workdir")
        parser.add_argument("--prompts", required=True, help="prompts file ({prompt} JSONL...)")
        parser.add_argument("--workdir", required=True, help="where the evaluation is written")
        parser.add_argument("--reward_model", default="", help="a reward-model stage's workdir")
        parser.add_argument("--world", default="", help="a world directory (default: the "
                            "prompts file's, when it holds world.json)")  # fmt: skip
        parser.add_argument("--limit", type=int, default=0, help="the first N prompts only")
        _sampling_flags(parser, temperature=1.0, new_tokens=64)
    else:
        parser.add_argument("--workdir", required=True,
                            help="a stage's workdir or an imported model's")  # fmt: skip
        parser.add_argument("--system", default="", help="a system prompt (chat formats)")
        if command == "sample":
            parser.description = "Answers of a policy to prompts."
            parser.add_argument("--prompt", action="append", default=[], help="(repeatable)")
            parser.add_argument("--prompts", help="a prompts file: {prompt} or {messages} rows")
            parser.add_argument("--output", help="write JSONL here instead of printing")
        else:
            parser.description = "Talk to a policy in the terminal."
        _sampling_flags(parser, temperature=1.0 if command == "sample" else 0.7,
                        new_tokens=64)  # fmt: skip
    flags = parser.parse_args(argv)
    runtime.configure(compile_cache=flags.compile_cache)
    if command == "evaluate":
        out = evaluate.compare(flags.policy, flags.reference, flags.prompts, flags.workdir,
                               reward_model=flags.reward_model, world_dir=flags.world,
                               batch_size=flags.batch_size, limit=flags.limit,
                               **_sampling(flags))  # fmt: skip
        print(report.comparison_markdown(out), end="")
        print(f"written: {os.path.join(flags.workdir, 'evaluation.json')}")
        return 0
    if command == "sample":
        records = [{"prompt": p} for p in flags.prompt]
        if flags.prompts:
            records += chat.read_prompts(flags.prompts)
        if not records:
            raise config_lib.ConfigError("sample: give --prompt TEXT or --prompts FILE")
        batch = min(flags.batch_size, len(records))
        policy = chat.Policy(flags.workdir, batch_size=batch, system=flags.system)
        chat.sample(policy, records, output=flags.output, **_sampling(flags))
        return 0
    policy = chat.Policy(flags.workdir, batch_size=1, system=flags.system)
    chat.chat(policy, **_sampling(flags))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TALK:
        return talk(argv[0], argv[1:])
    command, flags, overrides = parse(argv)
    spec = flags.config or DEFAULT_CONFIG.get(command)
    if spec is None:
        raise config_lib.ConfigError("--config is required, e.g. --config configs/sft.py:runlocal")
    config = config_lib.load_config(spec).unlock()
    config_lib.apply_overrides(config, overrides)
    config.lock()
    if command == "compile":
        if flags.print_config:
            print(config.copy_and_resolve_references(), end="")
            return 0
        from instructrl import aot  # loads libtpu's compiler only when asked

        return aot.main(config, flags.topology, flags.json, flags.require_fit)
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
        jax.distributed.initialize(
            coordinator_address=flags.coordinator_address,
            num_processes=flags.num_processes,
            process_id=flags.process_id,
        )
    elif flags.coordinator_address or flags.num_processes or flags.process_id is not None:
        raise config_lib.ConfigError(
            "--coordinator_address, --num_processes and --process_id need --jax_distributed"
        )
    runtime.configure(compile_cache=flags.compile_cache)
    runtime.setup_logging()
    if command == "pipeline":
        pipeline.run(config, workdir)
        report_path = os.path.join(workdir, "report.json")
        if fs.exists(report_path) and jax.process_index() == 0:
            print("\n" + report.headline(json.loads(fs.read_text(report_path))) + "\n")
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
