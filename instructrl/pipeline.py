"""The pipeline in one command: each stage in DIR/<stage>, finished stages are not recomputed.

Stages so far: pretrain a base model on plain text -> SFT on demonstrations (init_from the base
model). A stage that finished writes DIR/<stage>/DONE; an interrupted stage resumes from its
own checkpoints.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections

log = logging.getLogger(__name__)

STAGES = ("pretrain", "sft")


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The small built-in default: a tiny model pretrained and fine-tuned on packaged excerpts."""
    import importlib.util

    from instructrl import config_lib

    args = config_lib.parse_arg(arg)
    configs_dir = os.path.join(os.path.dirname(config_lib.PACKAGE_DIR), "configs")

    def load(name, sub_arg):
        spec = importlib.util.spec_from_file_location(name, os.path.join(configs_dir, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(sub_arg)

    model = args.get("model", "tiny")
    c = ml_collections.ConfigDict()
    c.stages = list(STAGES)
    c.pretrain = load("pretrain", f"model={model}").unlock()
    c.sft = load("sft", f"model={model}").unlock()
    c.pretrain.train.steps = 400
    c.pretrain.evals.heldout.every_steps = 200
    c.pretrain.checkpoint.every_steps = 100
    c.sft.train.epochs = 0.0
    c.sft.train.steps = 200
    c.sft.model.dropout = 0.1
    c.sft.optimizer.lr = 1e-3
    c.sft.evals.heldout.every_steps = 100
    c.sft.checkpoint.every_steps = 100
    if args.get("runlocal"):
        c.pretrain.train.steps = 40
        c.sft.train.steps = 20
    return c.lock()


def run(config, workdir: str) -> dict:
    """Run every stage not yet done; return {stage: its final metrics}."""
    from instructrl import main

    os.makedirs(workdir, exist_ok=True)
    summary = {}
    previous = None
    for stage in config.stages:
        stage_dir = os.path.join(workdir, stage)
        done_file = os.path.join(stage_dir, "DONE")
        stage_cfg = config[stage]
        if previous is not None and not stage_cfg.get("init_from"):
            with stage_cfg.unlocked():
                stage_cfg.init_from = previous
        if os.path.exists(done_file):
            log.info("stage %s already done (%s)", stage, done_file)
        else:
            log.info("stage %s -> %s", stage, stage_dir)
            main.run_stage(stage_cfg, stage_dir)
            with open(done_file, "w") as f:
                f.write("done\n")
        summary[stage] = _last_metrics(stage_dir)
        previous = stage_dir
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log.info("pipeline finished: %s", json.dumps(summary))
    return summary


def _last_metrics(stage_dir: str) -> dict:
    path = os.path.join(stage_dir, "metrics.jsonl")
    merged: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                merged.update(json.loads(line))
    return merged
