"""Shared machinery of the ablation sweeps: one pipeline's stages up to the reward model are
built once under DIR, then each variant trains its own PPO policy (or RM) and every policy is
evaluated on the same held-out prompts by the same held-out labelers.

  python experiments/run.py kl_sweep --workdir runs/exp            # full sweep
  python experiments/run.py kl_sweep --workdir /tmp/exp --tiny     # seconds-scale smoke run
"""

from __future__ import annotations

import glob
import json
import os
import time

from instructrl import config_lib, evaluate, pipeline, ppo, rm
from instructrl.stages import BY_NAME
from instructrl.train import is_done, mark_done

SHARED = ("world", "pretrain", "sft", "rankings", "rm")


def base_config(tiny: bool, seed: int = 0):
    """The pipeline's config (configs/pipeline.py), at ``runlocal`` sizes with ``tiny``."""
    return config_lib.load_config(f"pipeline:seed={seed}" + (",runlocal" if tiny else ""))


def shared_stages(config, workdir: str) -> None:
    """world -> pretrain -> sft -> rankings -> rm, each skipped when already done."""
    c = config.copy_and_resolve_references()
    c.stages = list(SHARED)
    pipeline.run(c, workdir)


def stage_config(config, workdir: str, stage: str):
    """One stage's config as the pipeline resolves it in ``workdir`` (paths wired)."""
    return pipeline.resolve(config, workdir)[stage]


def _set(cfg, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        cfg = cfg[part]
    cfg[last] = value


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _once(stage_dir: str, fn) -> str:
    if not is_done(stage_dir):
        os.makedirs(stage_dir, exist_ok=True)
        fn()
        mark_done(stage_dir)
    return stage_dir


def ppo_variant(config, workdir: str, name: str, overrides: dict, reuse: bool = True) -> str:
    """Train the PPO policy of the pipeline's ``ppo`` stage with ``overrides`` (dotted keys
    of that stage's config, e.g. {"ppo.kl_coef": 0.05, "ptx.coef": 27.8}).

    Variants are keyed by their effective settings, so experiments that ask for the same
    policy (the pipeline's own PPO and PPO-ptx included, unless ``reuse`` is off: the
    pipeline ran those two side by side, so their wall times are not one stage's alone)
    share one training run.
    """
    resolved = pipeline.resolve(config, workdir)
    c = resolved["ppo"].copy_and_resolve_references()  # the pipeline's own stays as it was
    for key, value in overrides.items():
        _set(c, key, value)
    settings = {"ppo.kl_coef": float(c.ppo.kl_coef), "ptx.coef": float(c.ptx.coef)}
    settings.update({k: v for k, v in overrides.items() if k not in settings})
    for stage in ("ppo", "ppo_ptx"):
        own = {"ppo.kl_coef": float(resolved[stage].ppo.kl_coef),
               "ptx.coef": float(resolved[stage].ptx.coef)}  # fmt: skip
        if reuse and settings == own and is_done(os.path.join(workdir, stage)):
            return os.path.join(workdir, stage)
    key = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
    stage_dir = os.path.join(workdir, "variants", key)
    return _once(stage_dir, lambda: ppo.run(c, stage_dir))


def stage_variant(config, workdir: str, stage: str, name: str, overrides: dict) -> str:
    """Train a stage the pipeline lists only when asked (``stages.OPTIONAL``, e.g. DPO) from
    DIR's shared stages, its config section with ``overrides`` (dotted keys), in
    DIR/variants/<name>."""
    c = config.copy_and_resolve_references()
    c.stages = [*SHARED, stage]
    section = pipeline.resolve(c, workdir)[stage]
    own = os.path.join(workdir, stage)  # the pipeline's own run of the stage, if it has one
    if is_done(own) and all(_get(section, k) == v for k, v in overrides.items()):
        return own
    for key, value in overrides.items():
        _set(section, key, value)
    stage_dir = os.path.join(workdir, "variants", name)
    return _once(stage_dir, lambda: BY_NAME[stage].run(section, stage_dir))


def rm_variant(config, workdir: str, name: str, overrides: dict) -> str:
    c = stage_config(config, workdir, "rm")
    for key, value in overrides.items():
        _set(c, key, value)
    stage_dir = os.path.join(workdir, "variants", name)

    def train():
        start = time.time()
        rm.run(c, stage_dir)
        with open(os.path.join(stage_dir, "timing.json"), "w") as f:
            json.dump({"seconds": round(time.time() - start, 1)}, f)

    return _once(stage_dir, train)


def evaluate_policies(config, workdir: str, experiment: str, policies: dict[str, str]) -> dict:
    """The pipeline's evaluation of ``policies`` ({name: stage dir}) against SFT; each model
    is built from its own workdir's config (a larger base model included). A model the
    pipeline's evaluation or an earlier experiment's already evaluated at these settings (SFT,
    the pipeline's PPO and PPO-ptx, the base model) is taken from there (``evaluate.run``'s
    ``reuse``), not sampled and judged again."""
    out_dir = os.path.join(workdir, "eval_" + experiment)
    models = {"sft": os.path.join(workdir, "sft"), **policies}
    section = stage_config(config, workdir, "evaluate")
    earlier = [os.path.join(workdir, "evaluate")]
    earlier += sorted(glob.glob(os.path.join(workdir, "eval_*")))
    return evaluate.run(section, out_dir, models=models, reuse=earlier)["models"]


def ppo_curves(stage_dir: str) -> list[dict]:
    """Held-out policy evaluations logged during PPO: step, RM score, gold score, KL."""
    rows = []
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval/gold_score" in r:
                rows.append(
                    {
                        "step": r["step"],
                        "rm_score": r["eval/score"],
                        "gold_score": r["eval/gold_score"],
                        "kl_to_sft": r["eval/kl_to_ref"],
                    }
                )
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, dict) and "mean" in v and "low" in v:
            return f"{v['mean']:.3f} [{v['low']:.2f}, {v['high']:.2f}]"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(workdir: str, experiment: str, results: dict, markdown: str) -> str:
    path = os.path.join(workdir, f"results_{experiment}")
    with open(path + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(markdown + "\n")
    return path + ".md"
