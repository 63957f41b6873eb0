"""How the evaluation judges a model's answers: held-out labelers against a baseline's answers
to the same prompts, and the world's gold rubric (``judge``); a win rate's interval.
"""

from __future__ import annotations

import numpy as np

from instructrl.world.labelers import LIKERT_FLAGS as ATTRIBUTES


def interval(outcomes, z: float = 1.96) -> dict:
    """Mean with a normal-approximation 95% interval: {mean, low, high, n}."""
    x = np.asarray(outcomes, np.float64)
    mean = float(x.mean())
    half = z * float(x.std(ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else 0.0
    return {"mean": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half), "n": len(x)}


def judge(world, records: list[dict], responses: list[str], sft_responses: list[str],
          baseline: str = "sft") -> dict:  # fmt: skip
    """Held-out labelers' verdicts and gold scores of one model's responses; the win rate
    over the baseline's responses (``sft_responses``) is ``win_rate_vs_<baseline>``."""
    heldout = world.labelers.heldout
    wins, likerts, gold = [], [], []
    flags = {k: [] for k in ATTRIBUTES}
    gold_attr = {k: [] for k in ATTRIBUTES}
    for i, (record, response, sft_response) in enumerate(
        zip(records, responses, sft_responses, strict=True)
    ):
        labeler = heldout[i % len(heldout)]
        wins.append(labeler.compare(record, response, sft_response))
        likerts.append(labeler.likert(record, response))
        judged, truth = labeler.flags(record, response), world.score(record, response)
        gold.append(truth["score"])
        closed = world.family(record).closed_domain
        for k in ATTRIBUTES:
            if k == "hallucination" and not closed:
                continue  # the paper measures hallucination on closed-domain tasks only
            flags[k].append(float(judged[k]))
            gold_attr[k].append(float(truth[k]))
    out = {
        f"win_rate_vs_{baseline}": interval(wins),
        "likert": float(np.mean(likerts)),
        "gold_score": float(np.mean(gold)),
    }
    out.update({k: float(np.mean(v)) if v else None for k, v in flags.items()})
    out["gold_attributes"] = {k: float(np.mean(v)) if v else None for k, v in gold_attr.items()}
    out["response_words"] = float(np.mean([len(r.split()) for r in responses]))
    families = np.asarray([r["family"] for r in records])
    wins, gold = np.asarray(wins, np.float64), np.asarray(gold, np.float64)
    out["by_family"] = {
        str(f): {
            "n": int((families == f).sum()),
            f"win_rate_vs_{baseline}": float(wins[families == f].mean()),
            "gold_score": float(gold[families == f].mean()),
        }
        for f in sorted(set(families))
    }
    return out
