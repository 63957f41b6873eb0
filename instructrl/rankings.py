"""Comparison data (paper section 3.5): K = 4..9 responses per RM prompt, ranked by labelers.

The paper's labelers rank outputs of several models, so a prompt's responses differ in
quality. Here each response comes from one of ``sources``, drawn per response by weight:

  sources: {name: {model: "sft" | "pretrain", temperature, weight[, fewshot_shots]}}

"sft" samples the SFT policy under its template; "pretrain" prompts the base model few-shot
(``World.fewshot_prompt``, its answer cut at the "###" separator, as evaluation does). Each
record names its responses' sources (``sources``), so accuracy can be broken down by source
pair (instructrl.world.signal). Without ``sources``: the SFT policy at ``temperature``.

Writes three JSONL files of {prompt, responses[K], ranks[K], sources[K], labeler_id, id}, and
``signal.json`` (instructrl.world.signal on the validation rankings):

  rankings_train.jsonl                  the RM prompts, ranked by training labelers
  rankings_valid_train_labelers.jsonl   validation prompts, ranked by training labelers
  rankings_valid_heldout_labelers.jsonl the *same* validation responses, ranked by held-out
                                        labelers (like-with-like RM accuracy and agreement)

config (configs/pipeline.py ``rankings``): sources (or temperature), max_new_tokens,
min_responses, max_responses, valid_prompts, seed, batch_size; wired: ``policy`` (the SFT
workdir), ``base`` (the pretrained workdir), ``world`` {seed, overrides} and ``world_dir``.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from instructrl import fs
from instructrl.metrics import Timers
from instructrl.policy_io import Toolkit
from instructrl.train import is_main_process, write_run_info
from instructrl.world import World, signal
from instructrl.world.datasets import build_rankings, read_jsonl, write_jsonl
from instructrl.world.world import FEWSHOT_STOP

log = logging.getLogger(__name__)


def _sources(r) -> dict[str, dict]:
    """The config's response sources, or the SFT policy at ``temperature`` alone."""
    if not r.get("sources"):
        return {"sft": {"model": "sft", "temperature": float(r.temperature), "weight": 1.0}}
    out = {}
    for name, src in r.sources.items():
        src = dict(src)
        if src.get("model") not in ("sft", "pretrain"):
            raise ValueError(f"rankings.sources.{name}.model must be 'sft' or 'pretrain'")
        if float(src.get("weight", 0.0)) < 0:
            raise ValueError(f"rankings.sources.{name}.weight must be >= 0")
        out[name] = {"temperature": 1.0, "weight": 1.0, **src}
    out = {n: s for n, s in out.items() if float(s["weight"]) > 0}
    if not out:
        raise ValueError("rankings.sources: every weight is 0")
    return out


def run(config, workdir: str) -> dict[str, list[dict]]:
    """Sample, rank and write the three rankings files; returns them by name."""
    r = config
    fs.makedirs(workdir)
    timers = Timers()
    world = World.from_config(
        r.world, min_responses=int(r.min_responses), max_responses=int(r.max_responses)
    )
    sources = _sources(r)
    workdirs = {"sft": r.policy, "pretrain": r.get("base", "")}
    cache = {}
    tks = {}
    for name, src in sources.items():
        if not workdirs.get(src["model"]):
            raise ValueError(f"rankings.sources.{name}.model: no workdir for {src['model']!r}")
        if src["model"] not in tks:
            path = workdirs[src["model"]]
            tk = Toolkit.from_workdir(path, batch_size=int(r.get("batch_size", 64)), cache=cache)
            tks[src["model"]] = (tk, tk.params(path))
    # Every source under the SFT template, as evaluation prompts the base model.
    sft_tk = Toolkit.from_workdir(r.policy, batch_size=int(r.get("batch_size", 64)), cache=cache)
    names = list(sources)
    weights = np.array([float(sources[n]["weight"]) for n in names])
    calls = [0]

    def sample_fn(records, num_responses):
        """K responses per record, each from a source drawn by weight: one sampler pass per
        source over all its (record, k) slots. Returns (texts, sources) per record."""
        calls[0] += 1
        rng = np.random.default_rng([int(r.seed), calls[0], 17])
        slots = [(i, rec) for i, (rec, k) in enumerate(zip(records, num_responses, strict=True))
                 for _ in range(k)]  # fmt: skip
        drawn = rng.choice(len(names), size=len(slots), p=weights / weights.sum())
        texts = [None] * len(slots)
        for s, name in enumerate(names):
            idx = np.flatnonzero(drawn == s)
            if len(idx) == 0:
                continue
            src = sources[name]
            tk, params = tks[src["model"]]
            recs = [slots[i][1] for i in idx]
            shots = int(src.get("fewshot_shots", 0))
            prompts = [world.fewshot_prompt(rec, shots) if shots else rec["prompt"] for rec in recs]
            with timers.time("sampling"):
                batch = tk.sample(
                    params,
                    prompts,
                    max_new_tokens=int(r.max_new_tokens),
                    temperature=float(src["temperature"]),
                    seed=int(r.seed) * 1000 + calls[0] * 16 + s,
                    template=sft_tk.template,
                    stop=tk.stop_ids(FEWSHOT_STOP) if shots else (),  # the answer ends there
                )
            for i, text in zip(idx, batch.texts, strict=True):
                texts[i] = text.split(FEWSHOT_STOP)[0].rstrip() if shots else text
        ends = np.cumsum(num_responses)
        return [
            (texts[end - k : end], [names[d] for d in drawn[end - k : end]])
            for end, k in zip(ends, num_responses, strict=True)
        ]

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
    # Every process sampled (its share of each batch) and ranked the same rows; one writes.
    main = is_main_process()
    for name, rankings in out.items():
        if main:
            write_jsonl(os.path.join(workdir, f"rankings_{name}.jsonl"), rankings)
        log.info("rankings: %d prompts -> rankings_%s.jsonl", len(rankings), name)
    # How much signal the validation comparisons carry (gold spread, labelers vs gold,
    # inter-labeler agreement, by family and source pair): the report shows it.
    with timers.time("labeling"):
        measured = signal.measure(world, by_id, out["valid_train_labelers"])
    if main:
        fs.write_atomic(os.path.join(workdir, "signal.json"), json.dumps(measured, indent=1))
    o = measured["overall"]
    log.info(
        "rankings: inter-labeler agreement %.3f training, %.3f held-out (paper 0.726 / 0.773); "
        "labelers vs gold %.3f / %.3f",
        o.get("inter_train") or 0.0, o.get("inter_heldout") or 0.0,
        o.get("train_vs_gold") or 0.0, o.get("heldout_vs_gold") or 0.0,
    )  # fmt: skip
    seconds = timers.seconds  # building the rankings is sampling, then labeling
    build = seconds.pop("sampling_and_labeling")
    seconds["labeling"] = seconds.get("labeling", 0.0) + build - seconds["sampling"]
    write_run_info(
        workdir, config, timers, stage="rankings", counts={k: len(v) for k, v in out.items()}
    )
    return out
