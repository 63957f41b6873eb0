"""Train one reward-model variant on the rankings of a pipeline run and print its accuracy.

  python experiments/signal/rm_variant.py RUN OUT [--rankings FILE] [--first N] [KEY=VALUE ...]

RUN is a pipeline workdir with its rm stage done: the variant starts from that stage's config
(run_info.json), trains on the first N rankings of FILE (default RUN/rankings/
rankings_train.jsonl) with the dotted overrides applied (``train.epochs=3.0``,
``model.dropout=0.1``, ``init_from=RUN/pretrain``), and is validated on RUN's validation
rankings of both labeler groups. Prints one JSON line: N, overrides, seconds, accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ml_collections

from instructrl import rm, runtime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--rankings", default="")
    p.add_argument("--first", type=int, default=0, help="0: every ranking")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    runtime.configure()
    runtime.setup_logging()
    with open(os.path.join(a.run, "rm", "run_info.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f)["config"])
    source = a.rankings or os.path.join(a.run, "rankings", "rankings_train.jsonl")
    with open(source) as f:
        rows = f.readlines()
    rows = rows[: a.first] if a.first else rows
    os.makedirs(a.out, exist_ok=True)
    cfg.data.path = os.path.join(a.out, "rankings_train.jsonl")
    with open(cfg.data.path, "w") as f:
        f.writelines(rows)
    cfg.data.eval_paths = [
        os.path.join(a.run, "rankings", f"rankings_valid_{g}_labelers.jsonl")
        for g in ("train", "heldout")
    ]
    for item in a.overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        old = node.get(last, "")  # a field the run's config predates is a string
        node[last] = (value == "True") if isinstance(old, bool) else type(old)(value)
    cfg.train.progress = False
    start = time.time()
    rm.run(cfg, os.path.join(a.out, "rm"))
    with open(os.path.join(a.out, "rm", "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "eval/accuracy" in r][-1]
    accuracy = {k: round(v, 4) for k, v in last.items() if "accuracy" in k}
    out = {"rankings": len(rows), "overrides": a.overrides, "seconds": round(time.time() - start)}
    print(json.dumps({**out, **accuracy}))


if __name__ == "__main__":
    main()
