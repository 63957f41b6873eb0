"""The whole InstructGPT pipeline in one command (``instructrl pipeline``).

  world -> pretrain -> sft -> rankings -> rm -> ppo, ppo_ptx -> evaluate -> report

  world     the synthetic instruction world's datasets (``instructrl.world``): pretraining text,
            demonstrations, prompt splits, held-out task families, a BPE tokenizer.
  pretrain  a base model on the world's plain text (no pretrained weights can be downloaded).
  sft       step 1: supervised fine-tuning on labeler demonstrations (init_from pretrain).
  rankings  K = 4..9 samples of the SFT policy per RM prompt, ranked by training labelers (and,
            for validation, by training and by held-out labelers): the paper's comparison data.
  rm        step 2: the reward model on those rankings (eq. 1), normalized on demonstrations.
  ppo       step 3: PPO against the RM with a per-token KL penalty to SFT (eq. 2, gamma = 0).
  ppo_ptx   the same with pretraining gradients mixed in (PPO-ptx, gamma = ptx_coef).
  evaluate  every model judged on held-out prompts by held-out labelers (``evaluate``).
  report    DIR/report.json, DIR/report.md and PNG plots (``report``).

Each stage writes under DIR/<stage> and then DIR/<stage>/DONE; a rerun skips finished stages
and resumes an interrupted one from its own checkpoints. Stage configs are ordinary stage
configs (configs/pretrain.py, sft.py, rm.py, ppo.py): paths between stages are filled in by
``wire`` at run time, so any field stays overridable (``--config.ppo.ppo.kl_coef=0.05``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time

import ml_collections
import numpy as np

from instructrl import config_lib

log = logging.getLogger(__name__)

STAGES = ("world", "pretrain", "sft", "rankings", "rm", "ppo", "ppo_ptx", "evaluate", "report")
TRAINING_STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")


def _stage_config(name: str, arg: str) -> ml_collections.ConfigDict:
    configs_dir = os.path.join(os.path.dirname(config_lib.PACKAGE_DIR), "configs")
    path = os.path.join(configs_dir, name + ".py")
    spec = importlib.util.spec_from_file_location(f"instructrl_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg).unlock()


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The small built-in default (``make run``): about 14 minutes on 2 CPU cores.

    Args (``configs/pipeline.py:key=value,...``): ``model`` (a preset, default ``small``),
    ``runlocal`` (every stage for a few steps: the test suite's smoke run), ``seed``.
    """
    args = config_lib.parse_arg(arg)
    model = str(args.get("model", "small"))
    seed = int(args.get("seed", 0))
    c = ml_collections.ConfigDict()
    c.stages = list(STAGES)
    c.seed = seed
    c.world = dict(
        seed=seed,
        overrides=dict(
            scale=0.03,  # SFT 382, PPO 934 prompts (paper 13k / 31k)
            # RM 1500 prompts (paper 33k), 1.5x the scale's 996. More rankings lifted one
            # world's RM from 0.544 to 0.581 validation accuracy (1930 rankings), but full runs
            # with 1500 and 1992 gave 0.537 and 0.546: between worlds the RM varies by more
            # than the data helps (experiments/ptx_vs_ppo).
            num_rm_prompts=1500,
            num_pretrain_docs=12000,
            num_eval_prompts=400,  # a 95% interval of about +-0.05 on a win rate
            num_heldout_per_family=64,
            vocab_size=1024,
        ),
    )
    c.model = dict(preset=model, max_len=384)
    # gamma of PPO-ptx. The paper's 27.8 does not transfer: our policy loss is a per-token mean
    # with whitened advantages and the ptx loss a per-token mean NLL, and our SFT policy drifts
    # far from the pretraining distribution (held-out LM loss 1.0 -> 1.9), so at 27.8 the ptx
    # gradient swamps the RL one (KL to SFT ~26 nats, RM score below SFT) and at 1.0 it still
    # does. 0.1 recovers most of the tax and keeps the preference (experiments/ptx_sweep).
    c.ptx_coef = 0.1

    c.pretrain = _stage_config("pretrain", f"model={model}")
    c.pretrain.train.steps = 600
    c.pretrain.train.batch_size = 32
    c.pretrain.data.seq_len = 128
    c.pretrain.optimizer.lr = 3e-3
    c.pretrain.evals.heldout.every_steps = 300
    c.pretrain.checkpoint.every_steps = 200

    c.sft = _stage_config("sft", f"model={model}")
    c.sft.train.epochs = 6.0
    c.sft.train.batch_size = 32
    c.sft.data.seq_len = 160
    c.sft.optimizer.lr = 1e-3
    c.sft.model.dropout = 0.1
    c.sft.evals.heldout.every_steps = 40
    c.sft.checkpoint.every_steps = 40

    c.rankings = dict(
        temperature=1.0,
        max_new_tokens=64,
        min_responses=4,
        max_responses=9,
        valid_prompts=100,
        seed=seed,
    )

    c.rm = _stage_config("rm", f"model={model}")
    c.rm.train.epochs = 1.0
    c.rm.rm.bucket_by_k = True
    c.rm.train.batch_size = 16
    c.rm.data.seq_len = 160
    c.rm.optimizer.lr = 3e-4
    c.rm.checkpoint.every_steps = 40

    ppo = _stage_config("ppo", f"model={model},world")
    ppo.ppo.iterations = 30
    ppo.ppo.batch_size = 32
    ppo.ppo.num_minibatches = 2
    ppo.ppo.max_new_tokens = 48
    # Five times the paper's 0.02: our reward model (54% validation accuracy against the
    # paper's 72%) is over-optimized sooner. experiments/kl_sweep puts the best beta at
    # 0.05-0.2 on the evaluation prompts; a second draw of held-out prompts confirmed 0.1 for
    # PPO-ptx (0.546 [0.51, 0.58]; at 0.02 it was not preferred; experiments/ptx_vs_ppo).
    ppo.ppo.kl_coef = 0.1
    # Tuned on a reward model of 1930 rankings (experiments/ptx_vs_ppo): at 2e-4 plain PPO
    # over-optimizes the RM (gold below lr 1e-4's).
    ppo.optimizer.lr = 1e-4
    ppo.optimizer.warmup_steps = 10 * 2
    ppo.value_optimizer.lr = 3e-4
    ppo.data.max_prompt_len = 96
    ppo.data.eval_prompts = 32  # split off the PPO prompts: RM vs gold score as KL grows
    ppo.ptx.seq_len = 128
    ppo.ptx.multiplier = 2
    ppo.evals.policy.every_steps = 10
    ppo.checkpoint.every_steps = 10
    c.ppo = ppo
    c.ppo_ptx = ppo.copy_and_resolve_references()
    c.ppo.ptx.coef = 0.0

    c.evaluate = dict(
        max_new_tokens=64,
        # Sampled at T = 1, the distribution the rankings were collected from and PPO optimized
        # (greedy answers are a different distribution to the RM; experiments/ptx_vs_ppo).
        temperature=1.0,
        fewshot_shots=2,
        heldout_shots=3,
        pretrain_docs=300,
        seed=seed,
        batch_size=64,
    )
    if args.get("runlocal"):
        c.world.overrides.update(
            scale=0.004,
            num_rm_prompts=0,
            num_pretrain_docs=800,
            num_eval_prompts=16,
            num_heldout_per_family=4,
        )
        c.model.max_len = 256
        c.pretrain.train.steps = 30
        c.sft.train.epochs, c.sft.train.steps = 0.0, 12
        c.sft.train.batch_size, c.sft.data.eval_examples = 8, 8
        c.pretrain.train.batch_size = 8
        c.rankings.update(valid_prompts=8, max_new_tokens=16, max_responses=5)
        c.rm.train.batch_size = 8
        for name in ("ppo", "ppo_ptx"):
            c[name].ppo.iterations = 2
            c[name].ppo.batch_size = 8
            c[name].ppo.max_new_tokens = 16
            c[name].optimizer.warmup_steps = 0
            c[name].data.eval_prompts = 8
        c.evaluate.update(max_new_tokens=16, pretrain_docs=16, fewshot_shots=1, heldout_shots=1)
    for name in TRAINING_STAGES:
        c[name].model.update(c.model)
        c[name].seed = seed
        c[name].train.progress = False
    c.ppo_ptx.ptx.coef = c.ptx_coef
    return c.lock()


def wire(config, workdir: str) -> ml_collections.ConfigDict:
    """Fill in the paths that connect the stages under ``workdir`` (a copy of ``config``)."""
    c = config.copy_and_resolve_references()
    d = lambda *p: os.path.join(os.path.abspath(workdir), *p)  # noqa: E731
    world = lambda name: d("world", name)  # noqa: E731
    with c.unlocked():
        for name in TRAINING_STAGES:
            c[name].tokenizer = dict(
                kind="hf", path=world("tokenizer.json"), eos_token="", pad_token=""
            )
        c.pretrain.data.text_files = [world("pretrain.txt")]
        c.sft.data.path = world("sft_train.jsonl")
        c.sft.init_from = c.sft.init_from or d("pretrain")
        c.rm.data.path = d("rankings", "rankings_train.jsonl")
        c.rm.data.eval_paths = [
            d("rankings", "rankings_valid_train_labelers.jsonl"),
            d("rankings", "rankings_valid_heldout_labelers.jsonl"),
        ]
        c.rm.data.heldout_labelers = _heldout_labeler_ids(config)
        c.rm.rm.normalize_with = world("sft_train.jsonl")
        c.rm.init_from = c.rm.init_from or d("sft")
        for name in ("ppo", "ppo_ptx"):
            c[name].data.path = world("prompts_ppo.jsonl")
            c[name].init_from = c[name].init_from or d("sft")
            c[name].ppo.reward_model = c[name].ppo.reward_model or d("rm")
            c[name].world = ml_collections.ConfigDict(
                {"seed": int(config.world.seed), "overrides": dict(config.world.overrides)}
            )
            c[name].ptx.text_files = [world("pretrain.txt")]
    return c


def build_world(config, **extra):
    from instructrl.world import World

    return World.build(int(config.world.seed), **{**dict(config.world.overrides), **extra})


def _heldout_labeler_ids(config) -> list[str]:
    return [lab.labeler_id for lab in build_world(config).labelers.heldout]


# ---- stages that are not training runs -----------------------------------------------------


def stage_world(config, workdir: str, stage_dir: str) -> None:
    from instructrl.world.datasets import build_all

    manifest = build_all(build_world(config), stage_dir)
    log.info("world: %s", json.dumps(manifest["counts"]))


def stage_rankings(config, workdir: str, stage_dir: str) -> None:
    """K-way rankings of SFT samples (paper section 3.5: labelers rank K = 4..9 outputs)."""
    from instructrl.policy_io import Toolkit
    from instructrl.world.datasets import build_rankings, read_jsonl, write_jsonl

    r = config.rankings
    world = build_world(
        config, min_responses=int(r.min_responses), max_responses=int(r.max_responses)
    )
    tk = Toolkit(config.sft, batch_size=64)
    params = tk.params(os.path.join(workdir, "sft"))
    template = config.sft.data.get("template", "{prompt}\n\n")
    calls = [0]

    def sample_fn(records, num_responses):
        """K policy samples per record: one sampler pass over every (record, k) pair."""
        calls[0] += 1
        prompts = [rec["prompt"] for rec, k in zip(records, num_responses, strict=True)
                   for _ in range(k)]  # fmt: skip
        batch = tk.sample(
            params,
            prompts,
            max_new_tokens=int(r.max_new_tokens),
            temperature=float(r.temperature),
            seed=int(r.seed) * 1000 + calls[0],
            template=template,
        )
        ends = np.cumsum(num_responses)
        return [batch.texts[end - k : end] for end, k in zip(ends, num_responses, strict=True)]

    prompts = {
        split: read_jsonl(os.path.join(workdir, "world", f"prompts_{split}.jsonl"))
        for split in ("rm", "rm_valid")
    }
    valid = prompts["rm_valid"][: int(r.valid_prompts)]
    pool = world.labelers
    out = {}
    for name, records in (("train", prompts["rm"]), ("valid_train_labelers", valid)):
        out[name] = build_rankings(
            world, records, pool.train, sample_fn, seed=int(r.seed) + len(name)
        )
    # The held-out labelers rank the very same validation responses, so that RM accuracy on
    # the two groups, and the groups' agreement with each other, compare like with like.
    by_id = {rec["id"]: rec for rec in valid}
    rng = np.random.default_rng(int(r.seed) + 1)
    out["valid_heldout_labelers"] = []
    for row in out["valid_train_labelers"]:
        labeler = pool.heldout[int(rng.integers(len(pool.heldout)))]
        ranks = labeler.rank(by_id[row["id"]], row["responses"])
        out["valid_heldout_labelers"].append(
            {**row, "ranks": ranks, "labeler_id": labeler.labeler_id}
        )
    for name, rankings in out.items():
        write_jsonl(os.path.join(stage_dir, f"rankings_{name}.jsonl"), rankings)
        log.info("rankings: %d prompts -> rankings_%s.jsonl", len(rankings), name)


def stage_evaluate(config, workdir: str, stage_dir: str) -> None:
    from instructrl import evaluate

    evaluate.run(config, workdir, stage_dir)


def stage_report(config, workdir: str, stage_dir: str) -> None:
    from instructrl import report

    report.write(workdir)


STAGE_FNS = {
    "world": stage_world,
    "rankings": stage_rankings,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def run(config, workdir: str) -> dict:
    """Run every stage of ``config.stages`` not yet done; returns {stage: seconds or 'done'}."""
    from instructrl import main

    os.makedirs(workdir, exist_ok=True)
    wired = wire(config, workdir)
    timings_path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    for stage in config.stages:
        if stage not in STAGES:
            raise ValueError(f"config.stages: unknown stage {stage!r}; known: {STAGES}")
        stage_dir = os.path.join(workdir, stage)
        done_file = os.path.join(stage_dir, "DONE")
        if os.path.exists(done_file):
            log.info("stage %s already done (%s)", stage, done_file)
            continue
        log.info("stage %s -> %s", stage, stage_dir)
        os.makedirs(stage_dir, exist_ok=True)
        start = time.time()
        if stage in TRAINING_STAGES:
            main.run_stage(wired[stage], stage_dir)
        else:
            STAGE_FNS[stage](wired, workdir, stage_dir)
        timings[stage] = round(time.time() - start, 1)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
        with open(done_file, "w") as f:
            f.write("done\n")
    return timings
