"""Evaluation the way the paper does it (section 4; figures 3 and 4; table 14), on the world.

Every model answers the same held-out prompts: texts never seen in SFT, RM or PPO training,
drawn with the world's family mix (``World.sample_prompts(exclude=...)``):

  base          the pretrained model, prompt as is (GPT-3 zero-shot)
  base_fewshot  the pretrained model behind solved examples of the same task family
                (the paper's "GPT-3 prompted"); its answer is cut at the "###" separator
  sft, ppo, ppo_ptx

and is judged by the *held-out* labelers (figure 3's held-out workers), one labeler per prompt:
  win_rate_vs_sft  the labeler's preference against the SFT answer to the same prompt (ties
                   count one half), with a 95% normal-approximation interval over prompts
  likert           mean 1-7 rating
  attribute rates  the labelers' metadata flags of figure 4 (follows_instruction,
                   satisfies_constraints, hallucination (closed-domain prompts only),
                   truthful, toxic, appropriate_for_customer_assistant)
and measured against ground truth: gold_score (the world's rubric; by_family splits it and the
win rate by task family), rm_score (the normalized
reward model), kl_to_sft (sum over response tokens of log pi - log pi_SFT on the model's own
answers), and the alignment tax (table 14): pretrain_loss on held-out pretraining documents
and few-shot scores on the held-out "public NLP" families no stage ever trains on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import ml_collections
import numpy as np

from instructrl import chat, fs, report, scoring
from instructrl.config_lib import ConfigError
from instructrl.data.errors import DataError
from instructrl.judging import ATTRIBUTES, interval, judge  # noqa: F401  (evaluate.interval)
from instructrl.metrics import Timers
from instructrl.policy_io import Toolkit, stage_config
from instructrl.train import is_done, is_main_process, write_run_info
from instructrl.world import World, heldout
from instructrl.world.datasets import read_jsonl, write_jsonl
from instructrl.world.world import FEWSHOT_STOP

log = logging.getLogger(__name__)


def heldout_scores(tk: Toolkit, params, world, items: list[dict], shots: int, seed: int) -> dict:
    """Few-shot score per held-out family (the alignment-tax benchmarks) and their mean."""
    prompts = [heldout.fewshot_prompt(world, item, shots, seed=seed) for item in items]
    scores = np.zeros(len(items))
    choice_idx = [i for i, it in enumerate(items) if it["choices"]]
    free_idx = [i for i, it in enumerate(items) if not it["choices"]]
    if choice_idx:
        ll = tk.choice_loglik(
            params,
            [prompts[i] for i in choice_idx],
            [[" " + c for c in items[i]["choices"]] for i in choice_idx],
        )
        for row, i in enumerate(choice_idx):
            scores[i] = heldout.score_prediction(items[i], int(np.argmax(ll[row])))
    if free_idx:
        batch = tk.sample(
            params, [prompts[i] for i in free_idx], max_new_tokens=24, temperature=0.0
        )
        for text, i in zip(batch.texts, free_idx, strict=True):
            scores[i] = heldout.score_prediction(items[i], text)
    by_family = {}
    families = np.asarray([it["family"] for it in items])
    for family in dict.fromkeys(families):
        by_family[str(family)] = float(scores[families == family].mean())
    return {"mean": float(np.mean(list(by_family.values()))), **by_family}


def _fingerprint(stage_dir: str) -> str:
    """Which run of a stage a model comes from: its path and a hash of its run_info.json (a
    stage trained again writes another: its timings)."""
    info = os.path.join(stage_dir, "run_info.json")
    text = fs.read_text(info) if fs.exists(info) else ""
    return f"{fs.absolute(stage_dir)}#{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _reusable(reuse, context: dict) -> dict[str, tuple[str, str, dict]]:
    """{model key: (evaluation workdir, model name there, results)} from earlier evaluations
    made in the same ``context``: settings, world, SFT and reward model, so that every number
    of a model evaluated there is the number evaluating it here would give."""
    found = {}
    for old in reuse:
        path = os.path.join(old, "evaluation.json")
        if not fs.exists(path):
            continue
        done = json.loads(fs.read_text(path))
        provenance = done.get("provenance") or {}
        if provenance.get("context") != context:
            continue
        for m, key in provenance["models"].items():
            found.setdefault(key, (old, m, done["models"][m]))
    return found


def run(config, workdir: str, models: dict[str, str] | None = None, reuse=()) -> dict:
    """Evaluate models on the world's held-out prompts; writes workdir/evaluation.json and
    workdir/samples_<model>.jsonl; returns the evaluation dict.

    ``reuse``: workdirs of earlier evaluations; a model (the same run of the same stage,
    prompted the same way) that one of them evaluated in the same context (settings, world,
    SFT and reward model) takes its results and answers from there instead of being
    evaluated again (the experiments' sweeps: SFT and the pipeline's own policies).

    config: the stage's section (configs/pipeline.py ``evaluate``): sampling settings, the
    ``world`` {seed, overrides} and ``world_dir``, ``models`` {name: stage workdir} (those
    not DONE are skipped), ``reward_model`` (a workdir or ""), ``lm_seq_len`` (the
    pretraining rows of the held-out loss). ``models`` overrides the section's. "sft" is
    required (the win-rate baseline); a name starting with "base_fewshot" is prompted few-shot.
    Every model is built from its own workdir's config, so models of different shapes (a larger
    base, experiment (e)) compare on the same prompts; they must share the SFT tokenizer.
    """
    e = config
    fs.makedirs(workdir)
    timers = Timers()
    world = World.from_config(e.world)
    models = dict(models if models is not None else e.models)
    models = {m: d for m, d in models.items() if is_done(d)}
    if "sft" not in models:
        raise FileNotFoundError(f"evaluate: no finished sft stage among {sorted(models)}")
    toolkits: dict = {}
    tk_of = {m: Toolkit.from_workdir(d, int(e.batch_size), toolkits) for m, d in models.items()}
    tk = tk_of["sft"]
    template = tk.template
    records = read_jsonl(os.path.join(e.world_dir, "prompts_eval.jsonl"))
    prompts = [r["prompt"] for r in records]
    rm_dir = e.get("reward_model") or ""
    rm_dir = rm_dir if rm_dir and is_done(rm_dir) else ""
    settings = {k: v for k, v in e.to_dict().items() if k not in ("world", "models")}
    world_config = e.world.to_dict() if hasattr(e.world, "to_dict") else dict(e.world)
    context = json.loads(json.dumps({  # as JSON reads it back: lists, not tuples
        "settings": settings,
        "world": world_config,
        "sft": _fingerprint(models["sft"]),
        "reward_model": _fingerprint(rm_dir) if rm_dir else None,
    }))  # fmt: skip
    # A model's key: its stage's run and how it is prompted (base and base_fewshot share one).
    keys = {m: f"{_fingerprint(d)}|{m.startswith('base_fewshot')}" for m, d in models.items()}
    earlier = _reusable(reuse, context)
    reused = {m: earlier[keys[m]] for m in models if keys[m] in earlier}
    texts_of = {  # the reused models' answers, as their evaluation wrote them
        m: [r["response"] for r in read_jsonl(os.path.join(old, f"samples_{name}.jsonl"))]
        for m, (old, name, _) in reused.items()
    }
    if reused:
        log.info("evaluate: %s as evaluated before (reuse)", ", ".join(sorted(reused)))
    with timers.time("restore"):
        params = {m: tk_of[m].params(d) for m, d in models.items()
                  if m == "sft" or m not in reused}  # fmt: skip
        # The RM scores with its own config (its reward_readout), which an SFT stage reused
        # from an earlier run may not share.
        rm_tk = Toolkit.from_workdir(rm_dir, int(e.batch_size), toolkits) if rm_dir else None
        rm_params = rm_tk.params(rm_dir, head="scalar") if rm_dir else None
    docs = world.pretraining_corpus(int(e.pretrain_docs), seed=int(e.seed) + 7919)
    items = read_jsonl(os.path.join(e.world_dir, "heldout_tasks.jsonl"))
    sampling = scoring.Sampling(
        float(e.temperature), int(e.get("top_k", 0)), float(e.get("top_p", 1.0))
    )
    sample_kwargs = dict(
        max_new_tokens=int(e.max_new_tokens),
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=int(e.seed),
    )

    batches = {}
    for m in models:
        if m not in reused:
            with timers.time("sampling"):
                if m.startswith("base_fewshot"):
                    shots = [world.fewshot_prompt(r, int(e.fewshot_shots)) for r in records]
                    stop = tk_of[m].stop_ids(FEWSHOT_STOP)  # the answer ends at the separator
                    b = tk_of[m].sample(params[m], shots, template=template, stop=stop,
                                        **sample_kwargs)  # fmt: skip
                    # The answer ends at the separator; it is judged as a response to the prompt.
                    texts = [t.split(FEWSHOT_STOP)[0].rstrip() for t in b.texts]
                    b = tk.batch_from_texts(prompts, texts, int(e.max_new_tokens), template)
                else:
                    b = tk_of[m].sample(params[m], prompts, template=template, **sample_kwargs)
            batches[m], texts_of[m] = b, b.texts
        if not is_main_process():  # every process computes the same evaluation; one writes
            continue
        rows = [json.dumps({"id": r["id"], "prompt": r["prompt"], "response": text}) + "\n"
                for r, text in zip(records, texts_of[m], strict=True)]  # fmt: skip
        fs.write_atomic(os.path.join(workdir, f"samples_{m}.jsonl"), "".join(rows))

    results, lm_losses = {}, {}
    sft_texts = texts_of["sft"]
    for m in models:
        if m in reused:
            results[m] = reused[m][2]
            continue
        b = batches[m]
        with timers.time("judging"):
            res = judge(world, records, b.texts, sft_texts)
        with timers.time("scoring"):
            if m.startswith("base_fewshot"):
                res["kl_to_sft"] = None  # its answers were sampled under another prompt
            else:
                logprobs = tk_of[m].logprobs(params[m], b, sampling)
                ref = tk.logprobs(params["sft"], b, sampling.reference())
                res["kl_to_sft"] = float(scoring.sequence_kl(logprobs, ref, b.mask).mean())
            res["rm_score"] = float(rm_tk.rm_scores(rm_params, b).mean()) if rm_dir else None
            if models[m] not in lm_losses:  # base and base_fewshot are the same weights
                lm_losses[models[m]] = tk_of[m].lm_loss(params[m], docs, int(e.lm_seq_len))
            res["pretrain_loss"] = lm_losses[models[m]]
        twin = m.replace("base_fewshot", "base")  # the same weights, prompted zero-shot
        with timers.time("heldout_tasks"):
            if m.startswith("base_fewshot") and twin in results:
                res["fewshot_heldout"] = results[twin]["fewshot_heldout"]
            else:
                res["fewshot_heldout"] = heldout_scores(
                    tk_of[m], params[m], world, items, int(e.heldout_shots), int(e.seed)
                )
        results[m] = res
        log.info(
            "evaluate %s: %s",
            m,
            json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}),
        )
    out = {
        "models": results,
        "num_prompts": len(records),
        "attributes": list(ATTRIBUTES),
        "settings": settings,
        "provenance": {"context": context, "models": keys},
    }
    if is_main_process():
        fs.write_atomic(os.path.join(workdir, "evaluation.json"), json.dumps(out, indent=1))
    write_run_info(workdir, config, timers, stage="evaluate", models=models)
    return out


def compare(policy_dir: str, reference_dir: str, prompts: str, workdir: str, *,
            reward_model: str = "", world_dir: str = "", max_new_tokens: int = 64,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
            batch_size: int = 32, limit: int = 0) -> dict:  # fmt: skip
    """One policy against a reference on a prompts file (``instructrl evaluate``).

    Both answer every prompt with the same sampling settings. The win rate of the policy's
    answer over the reference's (ties count one half, a 95% interval over prompts) is judged
    by the world's held-out labelers when the prompts come from a world (``world_dir``, or
    the prompt file's own directory when it holds world.json; the records carry their task
    family), with the gold rubric, Likert ratings and attribute rates beside it; otherwise by
    the reward model (``reward_model``, a reward-model stage's workdir), which also gives its
    mean score to both. KL to the reference: the sum over the policy's answer tokens of
    log pi - log pi_ref (None when the two tokenizers differ). Writes workdir/evaluation.json,
    workdir/report.md and samples_{policy,reference}.jsonl; returns the evaluation dict.
    """
    records = chat.read_prompts(prompts)[: limit or None]
    if not world_dir and fs.isfile(os.path.join(os.path.dirname(prompts), "world.json")):
        world_dir = os.path.dirname(prompts)
    world = World.from_dir(world_dir) if world_dir else None
    if world is not None:
        missing = [i for i, r in enumerate(records) if "family" not in r or "prompt" not in r]
        if missing:
            raise DataError(
                f"{prompts}: record {missing[0] + 1} has no 'family' (a world prompt's task "
                "family); pass no --world to judge by an RM"
            )
    if world is None and not reward_model:
        raise ConfigError("evaluate: the prompts are not a world's; pass --reward_model DIR")
    fs.makedirs(workdir)
    timers = Timers()
    cache: dict = {}
    with timers.time("restore"):
        policy = chat.Policy(policy_dir, batch_size, cache=cache)
        reference = chat.Policy(reference_dir, batch_size, cache=cache)
        rm_tk = Toolkit.from_workdir(reward_model, batch_size, cache) if reward_model else None
        rm_params = rm_tk.params(reward_model, head="scalar") if rm_tk else None
    sampling = scoring.Sampling(float(temperature), int(top_k), float(top_p))
    settings = dict(max_new_tokens=int(max_new_tokens), temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, seed=int(seed))  # fmt: skip
    conversations = [chat.conversation(r) for r in records]
    batches = {}
    with timers.time("sampling"):
        for name, p in (("reference", reference), ("policy", policy)):
            batches[name] = p.sample(conversations, **settings)
    rm_scores = {}
    if rm_tk is not None:
        with timers.time("scoring"):
            fmt = chat.prompt_format(reward_model, stage_config(reward_model))
            rm_prompts = [chat.render(fmt, c) for c in conversations]
            for name, p in (("reference", reference), ("policy", policy)):
                b = batches[name]
                if p.toolkit.tokenizer_key != rm_tk.tokenizer_key or p.format != fmt:
                    b = rm_tk.batch_from_texts(rm_prompts, b.texts, int(max_new_tokens))
                rm_scores[name] = rm_tk.rm_scores(rm_params, b)
    same_tokenizer = policy.toolkit.tokenizer_key == reference.toolkit.tokenizer_key
    results = {}
    for name, p in (("reference", reference), ("policy", policy)):
        b, ref_texts = batches[name], batches["reference"].texts
        with timers.time("judging"):
            res = {} if world is None else judge(world, records, b.texts, ref_texts, "reference")
        res["response_words"] = float(np.mean([len(t.split()) for t in b.texts]))
        if rm_scores:
            s, s_ref = rm_scores[name], rm_scores["reference"]
            res["rm_score"] = float(s.mean())
            res["rm_win_rate_vs_reference"] = interval((s > s_ref) + 0.5 * (s == s_ref))
            res.setdefault("win_rate_vs_reference", res["rm_win_rate_vs_reference"])
        with timers.time("scoring"):
            res["kl_to_reference"] = None
            if same_tokenizer:
                logprobs = p.toolkit.logprobs(p.params, b, sampling)
                ref = reference.toolkit.logprobs(reference.params, b, sampling.reference())
                res["kl_to_reference"] = float(scoring.sequence_kl(logprobs, ref, b.mask).mean())
        results[name] = res
        rows = [{"id": r.get("id", i), "prompt": conversations[i][-1]["content"], "response": text}
                for i, (r, text) in enumerate(zip(records, b.texts, strict=True))]  # fmt: skip
        write_jsonl(os.path.join(workdir, f"samples_{name}.jsonl"), rows)
    out = {
        "models": results,
        "num_prompts": len(records),
        "judge": "world held-out labelers" if world is not None else "reward model",
        "attributes": list(ATTRIBUTES) if world is not None else [],
        "settings": {
            **settings,
            "policy": fs.absolute(policy_dir),
            "reference": fs.absolute(reference_dir),
            "prompts": fs.absolute(prompts),
            "reward_model": reward_model and fs.absolute(reward_model),
            "world": world_dir and fs.absolute(world_dir),
        },
    }
    fs.write_atomic(os.path.join(workdir, "evaluation.json"), json.dumps(out, indent=1))
    fs.write_atomic(os.path.join(workdir, "report.md"), report.comparison_markdown(out))
    write_run_info(workdir, ml_collections.ConfigDict(out["settings"]), timers, stage="compare")
    return out
