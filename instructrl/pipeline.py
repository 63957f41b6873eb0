"""The whole InstructGPT pipeline in one command (``instructrl pipeline``): resolve, then run.

  world -> pretrain -> sft -> rankings -> rm -> ppo, ppo_ptx -> evaluate -> report

The stages and their wiring are ``instructrl.stages``; the values are configs/pipeline.py.
``resolve`` turns the pipeline config, after the command line's overrides, into one config per
stage: the shared values are copied in (``seed`` into every stage and the world, ``model`` into
every training stage), both RL stages are built from the one ``rl`` section (PPO with
ptx.coef 0, PPO-ptx with ``ptx_coef``), and each stage's inputs are wired to the directories
of the stages it reads. Derived values are resolved only here, after every override, so
``--config.ptx_coef=0.3`` reaches PPO-ptx and ``--config.rl.ppo.kl_coef=0.05`` both RL stages.

Each stage writes under DIR/<stage> and then DIR/<stage>/DONE; a rerun skips finished stages
and resumes an interrupted one from its own checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from instructrl import config_lib
from instructrl.stages import BY_NAME, STAGES, world_section
from instructrl.train import is_done, mark_done

log = logging.getLogger(__name__)

STAGE_NAMES = tuple(s.name for s in STAGES)
SHARED_MODEL_FIELDS = ("preset", "max_len")


def resolve(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """{stage: its config} for every stage of ``config.stages``, in order (see the module
    docstring). Raises ConfigError for an unknown stage or an RL section that sets ptx.coef."""
    c = config.copy_and_resolve_references()
    unknown = [s for s in c.stages if s not in BY_NAME]
    if unknown:
        name = unknown[0]
        raise config_lib.ConfigError(
            f"config.stages: unknown stage {name!r}{config_lib.nearest(name, STAGE_NAMES)}; "
            f"stages: {', '.join(STAGE_NAMES)}"
        )
    if "coef" in c.rl.get("ptx", {}):
        raise config_lib.ConfigError(
            "config.rl.ptx.coef: the RL stages take gamma from config.ptx_coef "
            "(ppo: 0, ppo_ptx: ptx_coef); remove rl.ptx.coef"
        )
    root = os.path.abspath(workdir)
    dirs = {s: os.path.join(root, s) for s in c.stages}
    out = {}
    for index, name in enumerate(c.stages, start=1):
        stage = BY_NAME[name]
        if name == "world":
            out[name] = ml_collections.ConfigDict(world_section(c))
            continue
        section = c[stage.section or name].copy_and_resolve_references()
        with section.unlocked():
            section.seed = int(c.seed)
            if stage.trains:
                section.model.update({k: c.model[k] for k in SHARED_MODEL_FIELDS})
                section.train.progress_label = f"{index}/{len(c.stages)} {name}"
            if stage.section == "rl":
                section.ptx.coef = float(c.ptx_coef) if name == "ppo_ptx" else 0.0
            missing = [s for s in stage.reads if s not in dirs]
            if missing:
                raise config_lib.ConfigError(
                    f"config.stages: {name} reads {', '.join(missing)}, which is not in the list"
                )
            if stage.wire is not None:
                stage.wire(section, dirs, c)
        out[name] = section
    return out


def print_config(resolved: dict[str, ml_collections.ConfigDict]) -> str:
    """The fully resolved config of every stage, as ``--print_config`` shows it."""
    parts = []
    for name, cfg in resolved.items():
        parts.append(f"# ---- {name} " + "-" * max(60 - len(name), 4))
        parts.append(str(cfg).rstrip())
    return "\n".join(parts) + "\n"


def run(config, workdir: str) -> dict:
    """Run every stage of ``config.stages`` not yet done; returns {stage: seconds}."""
    os.makedirs(workdir, exist_ok=True)
    resolved = resolve(config, workdir)
    timings_path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    for index, (name, section) in enumerate(resolved.items(), start=1):
        stage_dir = os.path.join(workdir, name)
        if is_done(stage_dir):
            log.info("stage %d/%d %s: already done", index, len(resolved), name)
            continue
        log.info("stage %d/%d %s -> %s", index, len(resolved), name, stage_dir)
        os.makedirs(stage_dir, exist_ok=True)
        start = time.time()
        BY_NAME[name].run(section, stage_dir)
        timings[name] = round(time.time() - start, 1)
        with open(timings_path + ".tmp", "w") as f:
            json.dump(timings, f, indent=1)
        os.replace(timings_path + ".tmp", timings_path)
        mark_done(stage_dir)
    return timings
