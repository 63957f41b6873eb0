"""Where the comparison data's signal is, and where it is lost (experiments/signal).

For one set of ranked responses (a rankings file's records) this measures, overall, per task
family, per pair of response sources and per attribute that separates a pair:

  gold spread        the standard deviation and range of the gold score among a prompt's K
                     responses, and the share of prompts whose K responses are all one text
  labeler vs gold    each labeler group's agreement with the gold order: over response pairs
                     whose gold scores differ and that the labeler orders strictly, the share
                     ordered as gold orders them
  inter-labeler      appendix B.3's agreement: every labeler of a group ranks the same
                     responses; the share of pairs two labelers both order strictly that they
                     order alike, over every pair of labelers (within training, within
                     held-out, and training vs held-out)
  reward model       (given its scores) its pairwise accuracy against the file's own labels,
                     against each group's labels and against the gold order
  by attribute       pairs whose gold scores differ, keyed by the figure-4 attributes that
                     differ between the two responses (``separating_attributes``; "quality"
                     when none does): which kind of difference the labelers and the RM resolve

Everything is a pure function of the world, the records and the scores: no sampling.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np

from instructrl.world.labelers import pair_agreement


def _pair(ranks_a, ranks_b, i: int, j: int) -> tuple[int, int]:
    """(agree, counted) for responses i and j: counted when both orderings order them."""
    a, b = np.sign(ranks_a[i] - ranks_a[j]), np.sign(ranks_b[i] - ranks_b[j])
    return (int(a == b), 1) if a != 0 and b != 0 else (0, 0)


ATTRIBUTES = (
    "follows_instruction",
    "satisfies_constraints",
    "truthful",
    "hallucination",
    "toxic",
    "stops",
)


def separating_attributes(gold_a: dict, gold_b: dict) -> str:
    """The attributes two gold verdicts differ on, joined by "+"; "quality" when they differ
    only in graded quality (or length), "" when their scores are equal."""
    if gold_a["score"] == gold_b["score"]:
        return ""
    differ = [k for k in ATTRIBUTES if gold_a[k] != gold_b[k]]
    return "+".join(differ) or "quality"


class _Tally:
    """agree / total counters keyed by (group key, measure)."""

    def __init__(self):
        self.counts = collections.defaultdict(lambda: [0, 0])

    def add(self, keys, measure, agree, total):
        for key in keys:
            c = self.counts[key, measure]
            c[0] += agree
            c[1] += total

    def rate(self, key, measure):
        agree, total = self.counts.get((key, measure), (0, 0))
        return (agree / total if total else None), total


def measure(
    world,
    records_by_id: dict[str, dict],
    rankings: list[dict],
    rm_scores: list[list[float]] | None = None,
) -> dict:
    """The signal report of ``rankings`` ({id, responses, ranks[, sources]} records);
    ``rm_scores``: per ranking, the reward model's score of each response.

    Returns {"overall": row, "by_family": {family: row}, "by_source_pair": {"a|b": row},
    "by_attribute": {"truthful": row, "follows_instruction+stops": row, ...}}; a
    row holds gold_std, gold_range, all_same_share, prompts, and per measure the agreement
    rate and its pair count (``<measure>`` and ``<measure>_pairs``).
    """
    pool = world.labelers
    groups = {"train": pool.train, "heldout": pool.heldout}
    tally = _Tally()
    spread = collections.defaultdict(list)  # key -> [(std, range, all_same)]
    for n, row in enumerate(rankings):
        record = records_by_id[row["id"]]
        responses = list(row["responses"])
        golds = [world.score(record, r) for r in responses]
        gold = np.array([g["score"] for g in golds])
        # Ranks as the labelers give them (0 = best); equal gold scores are a tie.
        gold_ranks = [int(np.sum(gold > g)) for g in gold]
        sources = row.get("sources") or ["policy"] * len(responses)
        family = record["family"]
        keys = ["overall", f"family:{family}"]
        spread["overall"].append((gold.std(), np.ptp(gold), len(set(responses)) == 1))
        spread[f"family:{family}"].append(spread["overall"][-1])

        pairs = list(itertools.combinations(range(len(responses)), 2))
        # The keys each pair counts under: overall, its family, its pair of sources.
        pair_keys = {
            (i, j): [*keys, f"source:{'|'.join(sorted((sources[i], sources[j])))}"]
            for i, j in pairs
        }
        for i, j in pairs:  # and, where gold separates them, the attributes that do
            if attribute := separating_attributes(golds[i], golds[j]):
                pair_keys[i, j].append(f"attribute:{attribute}")

        all_ranks = {
            name: [lab.rank(record, responses, golds) for lab in labelers]
            for name, labelers in groups.items()
        }
        for name, ranks in all_ranks.items():
            for r in ranks:  # each labeler of the group against gold
                for i, j in pairs:
                    tally.add(pair_keys[i, j], f"{name}_vs_gold", *_pair(r, gold_ranks, i, j))
            for ra, rb in itertools.combinations(ranks, 2):
                a, t = pair_agreement(ra, rb)
                tally.add(keys, f"inter_{name}", a, t)
        for ra in all_ranks["train"]:
            for rb in all_ranks["heldout"]:
                a, t = pair_agreement(ra, rb)
                tally.add(keys, "inter_train_vs_heldout", a, t)
        if rm_scores is not None:
            rm_ranks = [int(np.sum(np.asarray(rm_scores[n]) > s)) for s in rm_scores[n]]
            references = {"labels": [row["ranks"]], "gold": [gold_ranks], **all_ranks}
            for name, ranks in references.items():
                for r in ranks:
                    for i, j in pairs:
                        tally.add(pair_keys[i, j], f"rm_vs_{name}", *_pair(rm_ranks, r, i, j))
    measures = sorted({m for _, m in tally.counts})

    def row_for(key):
        out = {}
        if key in spread:
            s = np.array(spread[key], dtype=float)
            out.update(
                prompts=len(s),
                gold_std=float(s[:, 0].mean()),
                gold_range=float(s[:, 1].mean()),
                all_same_share=float(s[:, 2].mean()),
            )
        for m in measures:
            rate, pairs = tally.rate(key, m)
            out[m], out[f"{m}_pairs"] = rate, pairs
        return out

    keys = sorted({k for k, _ in tally.counts} | set(spread))
    return {
        "overall": row_for("overall"),
        "by_family": {k.split(":", 1)[1]: row_for(k) for k in keys if k.startswith("family:")},
        "by_source_pair": {k.split(":", 1)[1]: row_for(k) for k in keys if k.startswith("source:")},
        "by_attribute": {
            k.split(":", 1)[1]: row_for(k) for k in keys if k.startswith("attribute:")
        },
    }
