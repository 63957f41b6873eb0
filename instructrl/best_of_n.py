"""Best-of-n with the reward model: sample n answers from the SFT policy, keep the RM's best.

No training: the policy is SFT reweighted by the RM at inference time (Nakano et al. 2021's
WebGPT rejection sampling; Stiennon et al. 2020), at n times SFT's sampling cost. Its KL to
SFT has a closed form, log n - (n - 1) / n (Stiennon et al. 2020, appendix; Gao et al. 2022,
who plot the gold reward against it to show the RM being over-optimized as n grows).

For each held-out prompt of the evaluation (``world_dir/prompts_eval.jsonl``) the SFT policy
draws ``max(n)`` answers with the evaluation's sampling settings; best-of-n takes the first n
of them and keeps the one the RM scores highest. Each n's answers are judged as the
evaluation judges a model (``judging.judge``): against the SFT policy's own answers to the
same prompts, drawn as the evaluation draws them (same seed and batching: the same texts as
its ``samples_sft.jsonl``), by the held-out labelers and the gold rubric.

Writes workdir/evaluation.json ({"models": {"best_of_<n>": results}, "n": [...]}) and
workdir/samples_best_of_<n>.jsonl.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from instructrl import fs
from instructrl.judging import judge
from instructrl.metrics import Timers
from instructrl.policy_io import Toolkit
from instructrl.train import is_main_process, write_run_info
from instructrl.world import World
from instructrl.world.datasets import read_jsonl

log = logging.getLogger(__name__)


def analytic_kl(n: int) -> float:
    """KL(best-of-n || pi) = log n - (n - 1) / n nats for a policy pi whose answers are all
    distinct (an upper bound otherwise)."""
    return float(np.log(n) - (n - 1) / n)


def pick(scores: np.ndarray, n: int) -> np.ndarray:
    """Index (P,) of the highest-scored of the first ``n`` draws of each prompt; scores (D, P),
    draw-major. Ties go to the earlier draw."""
    return np.argmax(scores[:n], axis=0)


def draw_and_rank(
    tk: Toolkit,
    params,
    rm_params,
    prompts: list[str],
    ns: list[int],
    *,
    seed: int,
    timers: Timers | None = None,
    rm_tk: Toolkit | None = None,
    **sample,
) -> dict[int, dict]:
    """{n: {"texts": best-of-n answer per prompt, "rm_scores": (P,) their RM scores}}: max(ns)
    draws per prompt from ``params`` (``Toolkit.sample`` with ``sample``'s settings and
    ``seed``), ranked by the RM ``rm_params`` as ``rm_tk`` scores (default ``tk``: the RM
    shares the policy's config)."""
    timers = timers or Timers()
    with timers.time("sampling"):
        draws = tk.sample(params, prompts * max(ns), seed=seed, **sample)  # draw-major
    with timers.time("scoring"):
        scores = (rm_tk or tk).rm_scores(rm_params, draws).reshape(max(ns), len(prompts))
    out = {}
    for n in ns:
        best = pick(scores, n)
        rows = best * len(prompts) + np.arange(len(prompts))
        out[n] = {"texts": [draws.texts[r] for r in rows],
                  "rm_scores": scores[best, np.arange(len(prompts))]}  # fmt: skip
    return out


def run(config, workdir: str) -> dict:
    """Best-of-n of the SFT policy ``config.policy`` with the RM ``config.reward_model`` for
    every n of ``config.n`` (see the module docstring); returns the evaluation dict.

    config: ``n`` (list of ints), ``world`` {seed, overrides}, ``world_dir``, ``policy``,
    ``reward_model``, ``seed`` and the evaluation's sampling settings (``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``batch_size``).
    """
    ns = sorted({int(n) for n in config.n})
    if not ns or ns[0] < 1:
        raise ValueError(f"config.n: best-of-n needs n >= 1, got {list(config.n)}")
    fs.makedirs(workdir)
    timers = Timers()
    world = World.from_config(config.world)
    toolkits = {}  # the policy and the RM share one Toolkit where their configs agree
    tk = Toolkit.from_workdir(config.policy, int(config.batch_size), toolkits)
    # The RM scores with its own config (its reward_readout), which the SFT stage may not
    # share (an SFT reused from an earlier run), as the evaluation's does.
    rm_tk = Toolkit.from_workdir(config.reward_model, int(config.batch_size), toolkits)
    records = read_jsonl(os.path.join(config.world_dir, "prompts_eval.jsonl"))
    prompts = [r["prompt"] for r in records]
    with timers.time("restore"):
        params = tk.params(config.policy)
        rm_params = rm_tk.params(config.reward_model, head="scalar")
    sample = dict(
        max_new_tokens=int(config.max_new_tokens),
        temperature=float(config.temperature),
        top_k=int(config.get("top_k", 0)),
        top_p=float(config.get("top_p", 1.0)),
        template=tk.template,
    )
    seed = int(config.seed)
    with timers.time("sampling"):
        baseline = tk.sample(params, prompts, seed=seed, **sample)  # the evaluation's SFT
    ranked = draw_and_rank(tk, params, rm_params, prompts, ns, seed=seed + 1, timers=timers,
                           rm_tk=rm_tk, **sample)  # fmt: skip
    results = {}
    for n in ns:
        texts = ranked[n]["texts"]
        with timers.time("judging"):
            res = judge(world, records, texts, baseline.texts)
        res["rm_score"] = float(ranked[n]["rm_scores"].mean())
        res["kl_to_sft"] = analytic_kl(n)
        res["samples_per_prompt"] = n
        results[f"best_of_{n}"] = res
        log.info("best-of-%d: win rate %.3f, gold %.3f, RM %.3f", n,
                 res["win_rate_vs_sft"]["mean"], res["gold_score"], res["rm_score"])  # fmt: skip
        if is_main_process():
            lines = [json.dumps({"id": r["id"], "prompt": r["prompt"], "response": t}) + "\n"
                     for r, t in zip(records, texts, strict=True)]  # fmt: skip
            fs.write_atomic(os.path.join(workdir, f"samples_best_of_{n}.jsonl"), "".join(lines))
    out = {"models": results, "n": ns, "num_prompts": len(records)}
    if is_main_process():
        fs.write_atomic(os.path.join(workdir, "evaluation.json"), json.dumps(out, indent=1))
    write_run_info(workdir, config, timers, stage="best_of_n", n=ns)
    return out
