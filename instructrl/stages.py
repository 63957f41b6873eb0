"""The pipeline's stages in order, and where each one's inputs come from.

  world -> pretrain -> sft -> rankings -> rm -> ppo, ppo_ptx -> evaluate -> report

Each stage is a ``train.Stage``: a ``run(config, workdir)`` of its own module, the stages it
reads, and a ``wire`` function that fills its config section's inputs (data files, the
``init_from`` of the stage it starts from, the tokenizer) from those stages' directories.
This file is the one place the arrows between stages are drawn; stage modules never import
each other. To add a stage: write its module (its batch, loss, pure step, ``run``), add a
config section to configs/pipeline.py and a ``Stage`` here.
"""

from __future__ import annotations

import os

from instructrl import best_of_n, dpo, evaluate, ppo, rankings, report, rm, sft
from instructrl.train import Stage
from instructrl.world import World
from instructrl.world.datasets import build_all

# A stage config's ``stage`` field -> the module that trains it (``instructrl train``).
TRAINERS = {"pretrain": sft.run, "sft": sft.run, "rm": rm.run, "ppo": ppo.run, "dpo": dpo.run}


def world_section(config) -> dict:
    """The world every stage of one pipeline shares: the pipeline's seed and overrides."""
    return {"seed": int(config.seed), "overrides": dict(config.world)}


def build_world(config, **extra) -> World:
    return World.from_config(world_section(config), **extra)


def _world(config, workdir: str) -> None:
    build_all(World.from_config(config), workdir)


def _tokenizer(c, dirs) -> None:
    path = os.path.join(dirs["world"], "tokenizer.json")
    c.tokenizer = dict(kind="hf", path=path, eos_token="", pad_token="")


def wire_pretrain(c, dirs, config) -> None:
    _tokenizer(c, dirs)
    c.data.text_files = [os.path.join(dirs["world"], "pretrain.txt")]


def wire_sft(c, dirs, config) -> None:
    _tokenizer(c, dirs)
    c.data.path = os.path.join(dirs["world"], "sft_train.jsonl")
    c.init_from = c.init_from or dirs["pretrain"]


def wire_rankings(c, dirs, config) -> None:
    c.policy, c.base, c.world_dir = dirs["sft"], dirs["pretrain"], dirs["world"]
    c.world = world_section(config)


def _rankings(c, dirs, config) -> None:
    """The comparison data a stage learns from (RM, DPO), validated by labeler group."""
    _tokenizer(c, dirs)
    c.data.path = os.path.join(dirs["rankings"], "rankings_train.jsonl")
    c.data.eval_paths = [
        os.path.join(dirs["rankings"], "rankings_valid_train_labelers.jsonl"),
        os.path.join(dirs["rankings"], "rankings_valid_heldout_labelers.jsonl"),
    ]
    c.data.heldout_labelers = [lab.labeler_id for lab in build_world(config).labelers.heldout]
    c.init_from = c.init_from or dirs["sft"]


def wire_rm(c, dirs, config) -> None:
    _rankings(c, dirs, config)
    c.rm.normalize_with = os.path.join(dirs["world"], "sft_train.jsonl")


def wire_rl(c, dirs, config) -> None:
    _tokenizer(c, dirs)
    c.data.path = os.path.join(dirs["world"], "prompts_ppo.jsonl")
    c.init_from = c.init_from or dirs["sft"]
    c.ppo.reward_model = c.ppo.reward_model or dirs["rm"]
    c.world = world_section(config)
    c.ptx.text_files = [os.path.join(dirs["world"], "pretrain.txt")]


# The models the evaluation compares: {name: the stage whose params it uses}, when that stage
# is in the pipeline's list.
EVALUATED = {"base": "pretrain", "base_fewshot": "pretrain", "sft": "sft", "ppo": "ppo",
             "ppo_ptx": "ppo_ptx", "dpo": "dpo"}  # fmt: skip


def wire_evaluate(c, dirs, config) -> None:
    c.world, c.world_dir = world_section(config), dirs["world"]
    c.models = {m: dirs[s] for m, s in EVALUATED.items() if s in dirs}
    c.reward_model = dirs.get("rm", "")
    c.lm_seq_len = int(config.pretrain.data.seq_len)


def wire_best_of_n(c, dirs, config) -> None:
    """SFT's answers reranked by the RM, drawn with the evaluation's sampling settings."""
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "batch_size"):
        c[key] = config.evaluate[key]
    c.world, c.world_dir = world_section(config), dirs["world"]
    c.policy, c.reward_model = dirs["sft"], dirs["rm"]


def wire_report(c, dirs, config) -> None:
    c.pipeline_dir = os.path.dirname(dirs["report"])


STAGES: tuple[Stage, ...] = (
    Stage("world", _world, (), trains=False, every_process=False),
    Stage("pretrain", sft.run, ("world",), wire_pretrain),
    Stage("sft", sft.run, ("world", "pretrain"), wire_sft),
    Stage("rankings", rankings.run, ("world", "pretrain", "sft"), wire_rankings, trains=False),
    Stage("rm", rm.run, ("world", "sft", "rankings"), wire_rm),
    Stage("ppo", ppo.run, ("world", "sft", "rm"), wire_rl, section="rl"),
    Stage("ppo_ptx", ppo.run, ("world", "sft", "rm"), wire_rl, section="rl", concurrent_with="ppo"),
    Stage(
        "evaluate", evaluate.run, ("world", "pretrain", "sft", "rm"), wire_evaluate, trains=False
    ),  # fmt: skip
    Stage(
        "report",
        report.run,
        ("rankings", "rm", "evaluate"),
        wire_report,
        trains=False,
        every_process=False,
    ),  # fmt: skip
)
# Stages a pipeline runs only when its ``stages`` list names them (before ``evaluate``, which
# then compares their policies too): the methods beyond the paper.
OPTIONAL: tuple[Stage, ...] = (
    Stage("dpo", dpo.run, ("world", "sft", "rankings"), _rankings),
    Stage("best_of_n", best_of_n.run, ("world", "sft", "rm"), wire_best_of_n, trains=False),
)
BY_NAME = {s.name: s for s in STAGES + OPTIONAL}
