"""Does a model know the world's facts? For every fact of the knowledge base, in each of two
phrasings, the summed log-likelihood of the true sentence against the same sentence with a
wrong value (drawn from the relation's other values): the share where the true one wins.

  python experiments/signal/fact_probe.py RUN pretrain sft ppo_ptx

0.5 is no knowledge. A reward model can only resolve pairs that differ in truthfulness as far
as the model it starts from knows the facts (experiments/signal/README.md).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from instructrl import runtime
from instructrl.policy_io import Toolkit
from instructrl.world import World
from instructrl.world.knowledge import RELATIONS, Fact


def fact_pairs(kb, seed: int = 0) -> list[tuple[str, str]]:
    """(true sentence, false sentence) for every fact and both of its phrasings."""
    rng = np.random.default_rng(seed)
    groups = {"person": kb.people, "place": kb.places}
    pairs = []
    for subject, relations in kb.table.items():
        for relation, value in relations.items():
            values = value if isinstance(value, tuple) else (value,)
            pool = RELATIONS[relation][1]
            pool = groups[pool] if isinstance(pool, str) else pool
            wrong = [v for v in pool if v != subject and v not in values]
            for variant in (0, 1):
                false = str(rng.choice(wrong))
                pairs.append(
                    (
                        kb.sentence(Fact(subject, relation, values[0]), variant),
                        kb.sentence(Fact(subject, relation, false), variant),
                    )
                )
    return pairs


def main(argv=None):
    run, *stages = argv or sys.argv[1:]
    runtime.configure()
    pairs = fact_pairs(World.from_dir(os.path.join(run, "world")).kb)
    for stage in stages:
        workdir = os.path.join(run, stage)
        tk = Toolkit.from_workdir(workdir, batch_size=64)
        loglik = tk.choice_loglik(tk.params(workdir), [""] * len(pairs), [list(p) for p in pairs])
        print(
            f"{stage}: true sentence more likely on {np.mean(loglik[:, 0] > loglik[:, 1]):.3f}"
            f" of {len(pairs)} facts"
        )


if __name__ == "__main__":
    main()
