"""Run a recipe end to end: import the base model, write the data files, SFT -> RM -> PPO.

  python scripts/run_recipe.py --root runs/smollm2                 # configs/recipes/smollm2.py
  python scripts/run_recipe.py --root /tmp/smollm2 --arg runlocal  # a few steps of each stage
  python scripts/run_recipe.py --root runs/x --base path/to/hf_dir_or.gguf --stages sft,rm

The data step reads the real files of ../shared/data through ``instructrl.data.sources`` and
writes what the stages read: the reward model's training rankings (HH-RLHF pairs, minus a
held-out set, plus OpenAssistant K-way rankings) and the held-out HH pairs as one rankings
JSONL each, and the PPO prompts (AlpacaFarm + Self-Instruct user-oriented) as {prompt} JSONL.
Prompts become SmolLM2 ChatML turns (``chat_prompt``) inside the recipe's user-turn template.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPE = os.path.join(REPO, "configs", "recipes", "smollm2.py")


def load_recipe(path: str = DEFAULT_RECIPE):
    spec = importlib.util.spec_from_file_location("instructrl_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_prompt(record: dict) -> str:
    """A multi-turn prompt as the inside of the template's user turn: earlier turns are closed
    and reopened in ChatML, so template.format(prompt=...) is the whole conversation."""
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    parts = []
    for i, m in enumerate(messages):
        if i:
            parts.append(f"<|im_end|>\n<|im_start|>{m['role']}\n")
        parts.append(m["content"])
    return "".join(parts)


def _write_jsonl(path: str, rows) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare_data(paths: dict, data_dir: str, heldout_pairs: int, limit: int = 0, seed: int = 0):
    """Write the rankings (train, held-out HH) and prompt files the recipe's stages read."""
    from instructrl.data import sources

    pref = os.path.join(data_dir, "preferences")
    hh, _ = sources.read_rankings(
        os.path.join(pref, "hh-rlhf-harmless-base-test.jsonl.gz"), format="hh_rlhf"
    )
    oasst, _ = sources.read_rankings(os.path.join(pref, "oasst-en-100-trees.jsonl"), format="oasst")
    random.Random(seed).shuffle(hh)
    heldout, train = hh[:heldout_pairs], hh[heldout_pairs:] + oasst
    random.Random(seed + 1).shuffle(train)
    if limit:
        train = train[:limit]

    def ranking(r):
        return {"prompt": chat_prompt(r), "responses": r["responses"], "ranks": r["ranks"]}

    counts = {
        "rankings": _write_jsonl(paths["rankings"], map(ranking, train)),
        "heldout_hh": _write_jsonl(paths["heldout_hh"], map(ranking, heldout)),
    }
    prompts = []
    for name in ("alpacafarm-eval-805.json", "self-instruct-user-oriented.jsonl"):
        records, _ = sources.read_prompts(os.path.join(data_dir, "prompts", name))
        prompts += records
    random.Random(seed + 2).shuffle(prompts)
    if limit:
        prompts = prompts[: max(limit, 64)]
    counts["prompts"] = _write_jsonl(paths["prompts"], ({"prompt": p} for p in prompts))
    return counts


def summarize(paths: dict) -> dict:
    """Last value and curve of the headline metrics of each stage's metrics.jsonl."""
    out = {}
    for stage in ("sft", "rm", "ppo"):
        path = os.path.join(paths[stage], "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            for key, value in row.items():
                if any(w in key for w in ("loss", "accuracy", "score", "kl")):
                    out.setdefault(key, []).append((row["step"], value))
    return out


def run(
    root: str,
    arg: str = "",
    base: str | None = None,
    stages=("sft", "rm", "ppo"),
    recipe_path: str = DEFAULT_RECIPE,
    data_dir: str | None = None,
    heldout_pairs: int | None = None,
) -> dict:
    from instructrl.convert.workdir import import_to_workdir
    from instructrl.stages import TRAINERS

    recipe = load_recipe(recipe_path)
    paths = recipe.paths(root)
    runlocal = "runlocal" in arg.split(",")
    if not os.path.isdir(os.path.join(paths["base"], "export")):
        import_to_workdir(base or recipe.smollm2_gguf(), paths["base"])
    counts = prepare_data(
        paths,
        data_dir or recipe.SHARED_DATA,
        heldout_pairs=heldout_pairs or (16 if runlocal else 200),
        limit=64 if runlocal else 0,
    )
    logging.info("recipe data: %s", counts)
    for stage in stages:
        config = recipe.get_config(
            ",".join(x for x in (f"stage={stage}", f"root={root}", arg) if x)
        )
        TRAINERS[config.stage](config, paths[stage])
    return summarize(paths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--arg", default="", help="recipe args, e.g. runlocal")
    parser.add_argument("--base", default=None, help=".gguf file or HF dir (default: SmolLM2)")
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--heldout_pairs", type=int, default=None, help="held-out HH pairs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    stages = tuple(args.stages.split(","))
    summary = run(
        args.root, args.arg, args.base, stages, args.recipe, heldout_pairs=args.heldout_pairs
    )
    for key, curve in sorted(summary.items()):
        points = ", ".join(f"{s}:{v:.4g}" for s, v in curve[-12:])
        print(f"{key}: {points}")


if __name__ == "__main__":
    main()
