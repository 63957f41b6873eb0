"""Rankings for N more RM prompts of a pipeline run's world, by the run's own rankings config.

  python experiments/signal/more_rankings.py RUN OUT N

Draws N new prompts from RUN's world (a stream of its own, so they are new draws; texts may
repeat training prompts, as prompts repeat across customers in the paper), collects and ranks
their responses exactly as RUN's rankings stage did, and writes OUT/rankings/. Concatenated
with RUN's rankings_train.jsonl this is the "more comparison data" variant of rm_variant.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import ml_collections

from instructrl import rankings, runtime
from instructrl.world import World
from instructrl.world.datasets import prompt_record, write_jsonl


def main(argv=None):
    run, out, num = (argv or sys.argv[1:])[:3]
    runtime.configure()
    runtime.setup_logging()
    world_dir = os.path.join(out, "world")
    if not os.path.isdir(world_dir):
        shutil.copytree(os.path.join(run, "world"), world_dir)
        records = World.from_dir(world_dir).sample_prompts(int(num), prefix="rm_more")
        write_jsonl(os.path.join(world_dir, "prompts_rm.jsonl"), map(prompt_record, records))
    with open(os.path.join(run, "rankings", "run_info.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f)["config"])
    cfg.world_dir = world_dir
    rankings.run(cfg, os.path.join(out, "rankings"))


if __name__ == "__main__":
    main()
