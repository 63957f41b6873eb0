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
and resumes an interrupted one from its own checkpoints. A finished stage whose settings differ
from the config's is kept, with a warning that names each differing setting.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time

import jax
import ml_collections
from flax.traverse_util import flatten_dict

from instructrl import config_lib, fs, preemption, runtime
from instructrl.stages import BY_NAME, OPTIONAL, STAGES, world_section
from instructrl.train import is_done, is_main_process, mark_done, sync_processes

log = logging.getLogger(__name__)

STAGE_NAMES = tuple(s.name for s in STAGES)  # the default pipeline, in order
OPTIONAL_NAMES = tuple(s.name for s in OPTIONAL)
SHARED_MODEL_FIELDS = ("preset", "max_len", "matmul_dtype", "reward_readout")


def resolve(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """{stage: its config} for every stage of ``config.stages``, in order (see the module
    docstring). Raises ConfigError for an unknown stage or an RL section that sets ptx.coef."""
    c = config.copy_and_resolve_references()
    unknown = [s for s in c.stages if s not in BY_NAME]
    if unknown:
        name = unknown[0]
        known = STAGE_NAMES + OPTIONAL_NAMES
        raise config_lib.ConfigError(
            f"config.stages: unknown stage {name!r}{config_lib.nearest(name, known)}; "
            f"stages: {', '.join(STAGE_NAMES)}; optional: {', '.join(OPTIONAL_NAMES)}"
        )
    if "coef" in c.rl.get("ptx", {}):
        raise config_lib.ConfigError(
            "config.rl.ptx.coef: the RL stages take gamma from config.ptx_coef "
            "(ppo: 0, ppo_ptx: ptx_coef); remove rl.ptx.coef"
        )
    root = fs.absolute(workdir)
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


def groups(names: list[str], parallel: bool) -> list[list[str]]:
    """The stages in order, a stage joining the group before it when it may run concurrently
    with that group's last stage (``Stage.concurrent_with``) and ``parallel`` allows it."""
    out: list[list[str]] = []
    for name in names:
        if parallel and out and BY_NAME[name].concurrent_with == out[-1][-1]:
            out[-1].append(name)
        else:
            out.append([name])
    return out


def _is_wiring(value) -> bool:
    """A path (a stage's input, wired by ``resolve``): a run moved or linked elsewhere keeps
    its stages, so paths are not settings."""
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, str) and os.sep in v for v in values)


def changed_settings(stage_dir: str, section) -> list[str]:
    """The settings a finished stage ran with (its run_info.json) that ``section`` now sets
    otherwise, as "key: then -> now"; paths and keys only one side has are left out (a field
    added to the code since). [] for a stage without a run_info.json (world, report)."""
    path = os.path.join(stage_dir, "run_info.json")
    if not fs.exists(path):
        return []
    then = flatten_dict(json.loads(fs.read_text(path)).get("config") or {}, sep=".")
    now = flatten_dict(json.loads(section.to_json_best_effort()), sep=".")
    keys = sorted(k for k in then.keys() & now.keys() if then[k] != now[k])
    return [f"{k}: {then[k]!r} -> {now[k]!r}" for k in keys
            if not (_is_wiring(then[k]) and _is_wiring(now[k]))]  # fmt: skip


def run(config, workdir: str) -> dict:
    """Run every stage of ``config.stages`` not yet done; returns {stage: seconds}.

    Stages that may run at once (PPO and PPO-ptx) run in two processes when
    ``config.parallel`` is set: a small model's step leaves a core idle in its
    single-threaded parts, which the other stage fills (jax.distributed runs keep one
    process per host and run stages one after the other)."""
    fs.makedirs(workdir)
    resolved = resolve(config, workdir)
    timings_path = os.path.join(workdir, "timings.json")
    timings = json.loads(fs.read_text(timings_path)) if fs.exists(timings_path) else {}
    index = {name: i for i, name in enumerate(resolved, start=1)}
    parallel = bool(config.get("parallel", False)) and jax.process_count() == 1
    for name, section in resolved.items():  # a finished stage is kept as it was run
        where = os.path.join(workdir, name)
        changed = changed_settings(where, section) if is_done(where) else []
        if changed:
            log.warning("stage %s is done with other settings than this config's, and is kept "
                        "as it was (remove %s to run it again): %s", name, where,
                        "; ".join(changed))  # fmt: skip
    for group in groups(list(resolved), parallel):
        todo = [n for n in group if not is_done(os.path.join(workdir, n))]
        for name in group:
            where = os.path.join(workdir, name)
            state = "already done" if name not in todo else f"-> {where}"
            log.info("stage %d/%d %s %s", index[name], len(resolved), name, state)
            fs.makedirs(where)
        start = time.time()
        if len(todo) > 1:
            seconds = _run_concurrently(todo, resolved, workdir)
        else:
            seconds = {}
            for name in todo:
                if BY_NAME[name].every_process or is_main_process():
                    BY_NAME[name].run(resolved[name], os.path.join(workdir, name))
                seconds[name] = time.time() - start
        for name in todo:
            timings[name] = round(seconds[name], 1)
            if is_main_process():
                fs.write_atomic(timings_path, json.dumps(timings, indent=1))
            mark_done(os.path.join(workdir, name))
        # Many hosts: the next stage reads what process 0 has just written.
        sync_processes("pipeline:" + "+".join(group))
    return timings


def _run_concurrently(names: list[str], resolved: dict, workdir: str) -> dict[str, float]:
    """Each stage in its own process (spawned: a fresh JAX); a child dies with the pipeline.
    Every child keeps XLA's thread pools over all the cores rather than a share of them: the
    stage that finishes last then has the whole machine (measured on 2 cores, PPO beside
    PPO-ptx: 91 s with the cores shared, 101 s with one each, 104 s one after the other).
    Returns each stage's seconds; a failed stage raises. A SIGTERM is passed on to the
    children, which save a checkpoint and exit; then this raises ``Preempted`` too."""
    context = multiprocessing.get_context("spawn")
    cache = jax.config.jax_compilation_cache_dir
    procs = {}
    start = time.time()
    for name in names:
        section = resolved[name].to_json_best_effort()
        args = (name, section, os.path.join(workdir, name), cache)
        procs[name] = context.Process(target=_child, args=args, name=f"stage-{name}")
        procs[name].start()
    seconds, failed, preempted = {}, [], []
    with preemption.forward_to(list(procs.values())):  # SIGTERM: each child saves and exits
        while procs:
            for name, proc in list(procs.items()):
                proc.join(timeout=0.2)
                if proc.exitcode is not None:
                    seconds[name] = time.time() - start
                    if proc.exitcode == preemption.EXIT_CODE:
                        preempted.append(name)
                    elif proc.exitcode != 0:
                        failed.append(f"{name} (exit code {proc.exitcode})")
                    del procs[name]
    if preempted and not failed:
        raise preemption.Preempted()
    if failed:
        raise RuntimeError(f"stages failed: {', '.join(failed)}; their errors are above")
    return seconds


def _child(name: str, section_json: str, stage_dir: str, cache: str | None):
    """One stage of ``_run_concurrently`` in its own process."""
    runtime.die_with_parent()
    runtime.configure(compile_cache=cache)
    runtime.setup_logging()
    section = ml_collections.ConfigDict(json.loads(section_json))
    BY_NAME[name].run(section, stage_dir)
