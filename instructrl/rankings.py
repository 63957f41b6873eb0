"""Comparison data (paper section 3.5): K = 4..9 SFT samples per RM prompt, ranked by labelers.

Writes three JSONL files of {prompt, responses[K], ranks[K], labeler_id, id} records:

  rankings_train.jsonl                  the RM prompts, ranked by training labelers
  rankings_valid_train_labelers.jsonl   validation prompts, ranked by training labelers
  rankings_valid_heldout_labelers.jsonl the *same* validation responses, ranked by held-out
                                        labelers (like-with-like RM accuracy and agreement)

config (configs/pipeline.py ``rankings``): temperature, max_new_tokens, min_responses,
max_responses, valid_prompts, seed, batch_size; wired: ``policy`` (the SFT workdir),
``world`` {seed, overrides} and ``world_dir``.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from instructrl.metrics import Timers
from instructrl.policy_io import Toolkit
from instructrl.train import write_run_info
from instructrl.world import World
from instructrl.world.datasets import build_rankings, read_jsonl, write_jsonl

log = logging.getLogger(__name__)


def run(config, workdir: str) -> dict[str, list[dict]]:
    """Sample, rank and write the three rankings files; returns them by name."""
    r = config
    os.makedirs(workdir, exist_ok=True)
    timers = Timers()
    world = World.from_config(
        r.world, min_responses=int(r.min_responses), max_responses=int(r.max_responses)
    )
    tk = Toolkit.from_workdir(r.policy, batch_size=int(r.get("batch_size", 64)))
    params = tk.params(r.policy)
    calls = [0]

    def sample_fn(records, num_responses):
        """K policy samples per record: one sampler pass over every (record, k) pair."""
        calls[0] += 1
        prompts = [rec["prompt"] for rec, k in zip(records, num_responses, strict=True)
                   for _ in range(k)]  # fmt: skip
        with timers.time("sampling"):
            batch = tk.sample(
                params,
                prompts,
                max_new_tokens=int(r.max_new_tokens),
                temperature=float(r.temperature),
                seed=int(r.seed) * 1000 + calls[0],
                template=tk.template,
            )
        ends = np.cumsum(num_responses)
        return [batch.texts[end - k : end] for end, k in zip(ends, num_responses, strict=True)]

    prompts = {
        split: read_jsonl(os.path.join(r.world_dir, f"prompts_{split}.jsonl"))
        for split in ("rm", "rm_valid")
    }
    valid = prompts["rm_valid"][: int(r.valid_prompts)]
    pool = world.labelers
    out = {}
    for name, records in (("train", prompts["rm"]), ("valid_train_labelers", valid)):
        with timers.time("sampling_and_labeling"):
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
        with timers.time("labeling"):
            ranks = labeler.rank(by_id[row["id"]], row["responses"])
        out["valid_heldout_labelers"].append(
            {**row, "ranks": ranks, "labeler_id": labeler.labeler_id}
        )
    for name, rankings in out.items():
        write_jsonl(os.path.join(workdir, f"rankings_{name}.jsonl"), rankings)
        log.info("rankings: %d prompts -> rankings_%s.jsonl", len(rankings), name)
    seconds = timers.seconds  # building the rankings is sampling, then labeling
    build = seconds.pop("sampling_and_labeling")
    seconds["labeling"] = seconds.get("labeling", 0.0) + build - seconds["sampling"]
    write_run_info(
        workdir, config, timers, stage="rankings", counts={k: len(v) for k, v in out.items()}
    )
    return out
