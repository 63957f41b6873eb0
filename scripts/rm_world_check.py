"""The reward model on the synthetic world: accuracy vs labeler agreement, and the RM batching
ablation (paper section 3.5 / appendix C.2, ablation (d) of PAPER.md).

Builds a world, ranks K = 4..9 responses per prompt (the world's reference answers and
corruptions, ``World.candidate_responses``) by training labelers, and trains a small RM from
scratch (or from ``--init_from``) for one epoch in each of these ways on the same rankings:

  all_in_one           eq. (1): one batch element per prompt with all its C(K,2) comparisons;
                       ``--batch`` prompts per step (the paper's choice).
  shuffled             every comparison its own element, shuffled; ``--batch`` pairs per step.
                       One epoch is then ~C(K,2) times more steps, and each response gets K-1
                       separate updates: the paper's mechanism for overfitting.
  shuffled_same_steps  shuffled pairs, but as many steps as all_in_one (a batch of about
                       ``--batch`` x mean pairs per prompt): the control that separates "more
                       steps over the same data" from "pairs split apart".

Reported: inter-labeler agreement (training / held-out labelers), the accuracy of the gold score
itself on the held-out rankings (the ceiling any RM can reach under labeler noise), and per
variant the RM's pairwise accuracy and log loss on its own training rankings and on unseen
prompts ranked by training and by held-out labelers; ``overfit_log_loss`` is held-out log loss
minus training log loss.

  python scripts/rm_world_check.py --out runs/rm_world_check
  python scripts/rm_world_check.py --out /tmp/rmw --num_train 200 --num_valid 48  # quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from instructrl import rm  # noqa: E402
from instructrl.world import World, agreement_rate  # noqa: E402
from instructrl.world.datasets import build_rankings, train_tokenizer  # noqa: E402

VARIANTS = ("all_in_one", "shuffled", "shuffled_same_steps")


def make_rankings(world: World, num_train: int, num_valid: int, seed: int) -> dict:
    """Training rankings (training labelers) and rankings of unseen prompts by training and by
    held-out labelers (the same candidate responses for both groups)."""
    train_records = world.sample_prompts(num_train, seed=seed, prefix="rm")
    valid_records = world.sample_prompts(
        num_valid,
        seed=seed + 1,
        prefix="rm_valid",
        exclude={r["prompt"] for r in train_records},
    )
    pool = world.labelers
    return {
        "train_records": train_records,
        "valid_records": valid_records,
        "train": build_rankings(world, train_records, pool.train, seed=seed),
        "valid_train_labelers": build_rankings(world, valid_records, pool.train, seed=seed + 1),
        "valid_heldout_labelers": build_rankings(world, valid_records, pool.heldout, seed=seed + 2),
    }


def gold_accuracy(world: World, records: list[dict], rankings: list[dict]) -> float:
    """Share of labeler-ordered pairs that the gold score orders the same way (ties in gold
    count half): what a perfect RM of the world's gold standard would score."""
    by_id = {r["id"]: r for r in records}
    hits = []
    for ranking in rankings:
        gold = [world.score(by_id[ranking["id"]], x)["score"] for x in ranking["responses"]]
        for i, j in itertools.combinations(range(len(gold)), 2):
            ri, rj = ranking["ranks"][i], ranking["ranks"][j]
            if ri == rj:
                continue
            winner, loser = (i, j) if ri < rj else (j, i)
            hits.append(1.0 if gold[winner] > gold[loser] else 0.5 * (gold[winner] == gold[loser]))
    return float(np.mean(hits))


def mean_pairs(rankings: list[dict]) -> float:
    """Mean number of strictly ordered pairs per ranking (ties give none)."""
    return float(
        np.mean([sum(a != b for a, b in itertools.combinations(r["ranks"], 2)) for r in rankings])
    )


def rm_config(args, variant: str, tokenizer_dir: str, pairs_per_prompt: float):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import rm as rm_configs  # configs/rm.py

    c = rm_configs.get_config(f"model={args.model}").unlock()
    c.seed = args.seed
    c.init_from = args.init_from
    c.tokenizer = dict(kind="hf", path=tokenizer_dir, eos_token="", pad_token="")
    c.data.seq_len = args.seq_len
    c.optimizer.lr = args.lr
    c.train.epochs = args.epochs
    c.train.progress = False
    c.train.log_every = 50
    c.checkpoint.every_steps = 10**9
    c.checkpoint.async_save = False
    c.evals.heldout.every_steps = 0  # at the end only
    c.rm.pairs = "all_in_one" if variant == "all_in_one" else "shuffled"
    batch = args.batch
    if variant == "shuffled_same_steps":
        batch = max(8, int(round(args.batch * pairs_per_prompt / 8)) * 8)
    c.train.batch_size = batch
    return c.lock()


def train_variant(args, variant, data, tokenizer_dir, pairs_per_prompt) -> dict:
    config = rm_config(args, variant, tokenizer_dir, pairs_per_prompt)
    workdir = os.path.join(args.out, variant)
    valid = data["valid_train_labelers"] + data["valid_heldout_labelers"]
    start = time.time()
    state = rm.run(config, workdir, rankings=data["train"], eval_rankings=valid)
    seconds = time.time() - start
    info = json.load(open(os.path.join(workdir, "run_info.json")))
    train = rm.evaluate_rankings(config, state.params, data["train"], prefix="train")
    valid_metrics = rm.evaluate_rankings(
        config, state.params, valid, info["heldout_labelers"], prefix="valid"
    )
    out = {
        "batch_size": int(config.train.batch_size),
        "batch_unit": "prompts" if variant == "all_in_one" else "pairs",
        "steps": info["total_steps"],
        "train_elements": info["train_elements"],
        "seconds": round(seconds, 1),
        "train_accuracy": train["train/accuracy"],
        "train_log_loss": train["train/log_loss"],
        "valid_accuracy_train_labelers": valid_metrics["valid/accuracy_train_labelers"],
        "valid_accuracy_heldout_labelers": valid_metrics["valid/accuracy_heldout_labelers"],
        "valid_log_loss_train_labelers": valid_metrics["valid/log_loss_train_labelers"],
        "valid_log_loss_heldout_labelers": valid_metrics["valid/log_loss_heldout_labelers"],
        "valid_log_loss": valid_metrics["valid/log_loss"],
        "valid_reward_std": valid_metrics["valid/reward_std"],
    }
    out["overfit_log_loss"] = out["valid_log_loss"] - out["train_log_loss"]
    out["overfit_accuracy"] = out["train_accuracy"] - out["valid_accuracy_train_labelers"]
    return out


def run_check(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    world = World.build(seed=args.seed)
    data = make_rankings(world, args.num_train, args.num_valid, args.seed)
    tokenizer_dir = os.path.join(args.out, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    train_tokenizer(
        world.pretraining_corpus(args.tokenizer_docs),
        args.vocab_size,
        os.path.join(tokenizer_dir, "tokenizer.json"),
    )
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)

    candidates = [r["responses"] for r in data["valid_train_labelers"]]
    pool = world.labelers
    results = {
        "args": vars(args),
        "num_train_prompts": len(data["train"]),
        "num_valid_prompts": len(data["valid_records"]),
        "pairs_per_prompt": mean_pairs(data["train"]),
        "agreement_train_labelers": agreement_rate(
            world, pool.train, data["valid_records"], candidates
        ),
        "agreement_heldout_labelers": agreement_rate(
            world, pool.heldout, data["valid_records"], candidates
        ),
        "gold_accuracy_train_labelers": gold_accuracy(
            world, data["valid_records"], data["valid_train_labelers"]
        ),
        "gold_accuracy_heldout_labelers": gold_accuracy(
            world, data["valid_records"], data["valid_heldout_labelers"]
        ),
        "variants": {},
    }
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        results["variants"][variant] = train_variant(
            args, variant, data, tokenizer_dir, results["pairs_per_prompt"]
        )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def format_results(results: dict) -> str:
    lines = [
        f"prompts: {results['num_train_prompts']} train, {results['num_valid_prompts']} unseen; "
        f"{results['pairs_per_prompt']:.1f} ordered pairs per prompt",
        f"labeler agreement: train {results['agreement_train_labelers']:.3f}, "
        f"held-out {results['agreement_heldout_labelers']:.3f}  (paper 0.726 / 0.773)",
        f"gold-score accuracy (ceiling): train labelers "
        f"{results['gold_accuracy_train_labelers']:.3f}, held-out "
        f"{results['gold_accuracy_heldout_labelers']:.3f}",
        "",
        f"{'variant':<20} {'batch':>10} {'steps':>6} {'sec':>6} {'train acc':>9} "
        f"{'train LL':>8} {'val acc tr':>10} {'val acc ho':>10} {'val LL':>7} {'LL gap':>7}",
    ]
    for name, v in results["variants"].items():
        lines.append(
            f"{name:<20} {v['batch_size']:>4} {v['batch_unit']:<5} {v['steps']:>6} "
            f"{v['seconds']:>6.0f} {v['train_accuracy']:>9.3f} {v['train_log_loss']:>8.3f} "
            f"{v['valid_accuracy_train_labelers']:>10.3f} "
            f"{v['valid_accuracy_heldout_labelers']:>10.3f} {v['valid_log_loss']:>7.3f} "
            f"{v['overfit_log_loss']:>7.3f}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rm_world_check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=int, default=1000, help="training prompts (rankings)")
    p.add_argument("--num_valid", type=int, default=200, help="unseen prompts")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="tiny", help="model preset (presets.py)")
    p.add_argument("--init_from", default="", help="a pretrained/SFT workdir (same tokenizer)")
    p.add_argument("--batch", type=int, default=16, help="prompts (all_in_one) or pairs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--tokenizer_docs", type=int, default=3000)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    results = run_check(parse_args(argv))
    print(format_results(results))
    return results


if __name__ == "__main__":
    main()
