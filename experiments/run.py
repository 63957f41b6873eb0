"""Run one of the paper's ablations in miniature (see experiments/<name>/README.md).

  python experiments/run.py NAME --workdir DIR [--tiny] [--seed N]
  python experiments/run.py seeds --seeds 0,1,2 --workdir DIR   # DIR/seed_<N>, one pipeline each
  python experiments/run.py methods --seeds 0,1,2 --workdir DIR # every method on each seed

NAME: ptx_vs_ppo (a), kl_sweep (b), ptx_sweep (c), rm_batching (d), size (e),
rm_generalization (f), overoptimization (g), signal (where the comparisons' signal is lost),
departures (PPO-ptx with each of the fidelity issue's known departures fixed), methods (PPO,
PPO-ptx, RLOO, GRPO, LoRA PPO, DPO pairwise / listwise and best-of-n from the same SFT,
rankings and RM).
All share DIR's world, base model, SFT policy, rankings and reward model, so running several
experiments in one DIR builds those once.
Writes DIR/results_<NAME>.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

POLICY_COLUMNS = [
    "variant",
    "win_rate_vs_sft",
    "gold_score",
    "rm_score",
    "kl_to_sft",
    "pretrain_loss",
    "fewshot_heldout",
]


def _policy_rows(models: dict, names: dict[str, dict]) -> list[dict]:
    rows = []
    for name, settings in names.items():
        m = models[name]
        rows.append(
            {
                "variant": name,
                **settings,
                **{k: m[k] for k in POLICY_COLUMNS[1:-1]},
                "fewshot_heldout": m["fewshot_heldout"]["mean"],
            }
        )
    return rows


def policy_sweep(config, workdir, experiment, variants: dict[str, dict], tiny: bool):
    """Train each PPO variant, evaluate all against SFT; returns (results, markdown)."""
    dirs = {
        name: common.ppo_variant(config, workdir, name, overrides)
        for name, overrides in variants.items()
    }
    models = common.evaluate_policies(config, workdir, experiment, dirs)
    keys = sorted({k for o in variants.values() for k in o})
    rows = [{"variant": "sft", **{k: "-" for k in keys}, **_policy_rows(models, {"sft": {}})[0]}]
    rows += _policy_rows(models, variants)
    md = common.table(rows, ["variant", *keys, *POLICY_COLUMNS[1:]])
    return {"rows": rows, "models": models}, md


def ptx_vs_ppo(config, workdir, tiny):
    coef = float(config.ptx_coef)
    variants = {"ppo": {"ptx.coef": 0.0}, "ppo_ptx": {"ptx.coef": coef}}
    return policy_sweep(config, workdir, "ptx_vs_ppo", variants, tiny)


def kl_sweep(config, workdir, tiny):
    own = float(config.rl.ppo.kl_coef)  # the pipeline's PPO: its policy is reused
    # --tiny: that policy alone (departures' tiny run trains a variant through the same sweep).
    coefs = (own,) if tiny else sorted({0.0, 0.005, 0.02, 0.05, own, 0.2, 1.0})
    variants = {f"kl_{k}": {"ppo.kl_coef": k, "ptx.coef": 0.0} for k in coefs}
    return policy_sweep(config, workdir, "kl_sweep", variants, tiny)


def ptx_sweep(config, workdir, tiny):
    # --tiny: the pipeline's two policies (both reused; departures' tiny run trains a variant).
    own = float(config.ptx_coef)
    coefs = (0.0, own) if tiny else (0.0, 0.03, 0.1, 0.3, 1.0, 27.8)
    variants = {f"ptx_{g}": {"ptx.coef": g} for g in coefs}
    return policy_sweep(config, workdir, "ptx_sweep", variants, tiny)


def departures(config, workdir, tiny):
    """The fidelity issue's known departures of the default PPO-ptx, each undone alone: the
    value optimizer warmed up like the policy (the paper's 10 iterations for both; the default
    inherits ppo.py's 10 x 4 minibatches, 2/3 of the run's updates), responses as long as the
    rankings' (the RM learned from 64 new tokens, PPO samples 48), a fixed score for a response
    cut without EOS (the RM never saw one; it is scored where it stops), and the paper's 8
    pretraining rows per episode for ptx (the default 2)."""
    rl, coef = config.rl, float(config.ptx_coef)
    fixes = {
        "value_warmup": {"value_optimizer.warmup_steps": int(rl.optimizer.warmup_steps)},
        "max_new_64": {"ppo.max_new_tokens": int(config.rankings.max_new_tokens)},
        "no_eos_penalty": {"ppo.no_eos_penalty": -1.0},
        "ptx_multiplier_8": {"ptx.multiplier": 8},
    }
    if tiny:  # one of them, on the suite's run
        fixes = {"no_eos_penalty": fixes["no_eos_penalty"]}
    variants = {"ppo_ptx": {"ptx.coef": coef}}
    variants.update({name: {"ptx.coef": coef, **o} for name, o in fixes.items()})
    return policy_sweep(config, workdir, "departures", variants, tiny)


def overoptimization(config, workdir, tiny):
    """No KL penalty, twice the pipeline's iterations, frequent held-out evaluation from the SFT
    policy on (step 0): RM score and gold score against KL to SFT."""
    iters = 4 if tiny else 60
    overrides = {
        "ppo.kl_coef": 0.0,
        "ptx.coef": 0.0,
        "ppo.iterations": iters,
        "evals.policy.every_steps": max(iters // 15, 1),
        "evals.policy.use_ema": False,
        "train.eval_at_start": True,
    }
    stage = common.ppo_variant(config, workdir, "overopt", overrides)
    rows = common.ppo_curves(stage)
    md = common.table(rows, ["step", "kl_to_sft", "rm_score", "gold_score"])
    return {"curve": rows, "overrides": overrides}, md


def _rm_metrics(stage_dir):
    rows = [json.loads(x) for x in open(os.path.join(stage_dir, "metrics.jsonl"))]
    train = [r for r in rows if "rm/loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    last = evals[-1]
    info = json.load(open(os.path.join(stage_dir, "run_info.json")))
    timing = os.path.join(stage_dir, "timing.json")
    return {
        "elements": info.get("train_elements"),
        # Completions scored over the whole run (train_sequences is per epoch).
        "forward_passes": round(info["train_sequences"] * float(info["config"]["train"]["epochs"]))
        if "train_sequences" in info
        else None,
        "wall_s": json.load(open(timing))["seconds"] if os.path.exists(timing) else None,
        "train_loss_last": train[-1]["rm/loss"],
        "train_accuracy_last": train[-1].get("rm/accuracy"),
        "steps": train[-1]["step"],
        "valid_accuracy": last["eval/accuracy"],
        "valid_log_loss": last["eval/log_loss"],
        "valid_accuracy_train_labelers": last.get("eval/accuracy_train_labelers"),
        "valid_accuracy_heldout_labelers": last.get("eval/accuracy_heldout_labelers"),
    }


RM_BATCHING_RANKINGS = 500


def rm_batching(config, workdir, tiny):
    """All C(K,2) pairs of a prompt in one batch element vs shuffled independent pairs, one
    epoch each over the same rankings (paper section 3.5), plus all-in-one for as many epochs
    as match shuffled's forward passes. Shuffled pairs cost K-1 forward passes per completion,
    about 6x the compute on our K = 4..9, so the full run uses the first
    ``RM_BATCHING_RANKINGS`` rankings for every variant (the pipeline's RM row is all of them;
    the test suite's tiny run, 48)."""
    n = 48 if tiny else RM_BATCHING_RANKINGS
    source = os.path.join(workdir, "rankings", "rankings_train.jsonl")
    subset = os.path.join(workdir, "variants", f"rm_batching_rankings_{n}.jsonl")
    if not os.path.exists(subset):
        os.makedirs(os.path.dirname(subset), exist_ok=True)
        with open(source) as f:
            lines = f.readlines()
        with open(subset + ".tmp", "w") as f:
            f.writelines(lines[:n])
        os.replace(subset + ".tmp", subset)
    rows = []
    for pairs in ("all_in_one", "shuffled"):
        # One epoch, the paper's comparison, whatever the pipeline's RM trains (3 epochs since
        # 3570a9d, which these rows once took, leaving the matched row at a third of
        # shuffled's compute).
        overrides = {"rm.pairs": pairs, "data.path": subset, "train.epochs": 1.0}
        stage = common.rm_variant(config, workdir, f"rm_{pairs}_{n}_x1", overrides)
        rows.append({"pairs": pairs, "rankings": n, **_rm_metrics(stage)})
    # The same compute as shuffled pairs: all-in-one for as many epochs as it takes to score
    # as many completions (the paper's point is efficiency; one epoch is few updates here).
    epochs = max(1, round(rows[1]["forward_passes"] / rows[0]["forward_passes"]))
    overrides = {"rm.pairs": "all_in_one", "data.path": subset, "train.epochs": float(epochs)}
    stage = common.rm_variant(config, workdir, f"rm_all_in_one_{n}_x{epochs}", overrides)
    rows.append({"pairs": f"all_in_one, {epochs} epochs", "rankings": n,
                 **_rm_metrics(stage)})  # fmt: skip
    rows.append({"pairs": "all_in_one (pipeline RM)", "rankings": "all",
                 **_rm_metrics(os.path.join(workdir, "rm"))})  # fmt: skip
    cols = ["pairs", "rankings", "elements", "forward_passes", "steps", "wall_s",
            "train_loss_last", "valid_log_loss", "valid_accuracy"]  # fmt: skip
    return {"rows": rows}, common.table(rows, cols)


def rm_generalization(config, workdir, tiny):
    """RM accuracy on training vs held-out labelers' validation rankings, beside the two
    groups' agreement with each other (paper: 72.4% vs 69.6%; agreement 72.6% / 77.3%)."""
    from instructrl import report

    m = _rm_metrics(os.path.join(workdir, "rm"))
    agreement = report.labeler_agreement(workdir) or {}
    row = {**m, "labeler_agreement_train_vs_heldout": agreement.get("train_vs_heldout")}
    cols = [
        "valid_accuracy_train_labelers",
        "valid_accuracy_heldout_labelers",
        "labeler_agreement_train_vs_heldout",
    ]
    return {"row": row}, common.table([row], cols)


SIGNAL_COLUMNS = [
    "prompts",
    "gold_std",
    "gold_range",
    "train_vs_gold",
    "heldout_vs_gold",
    "inter_train",
    "inter_heldout",
    "inter_train_vs_heldout",
    "rm_vs_labels",
    "rm_vs_train",
    "rm_vs_heldout",
    "rm_vs_gold",
]


def signal(config, workdir, tiny):
    """Where the comparison data's signal is lost: in the data (gold spread), the labelers
    (agreement with gold and with each other) or the RM (its accuracy against each), overall,
    per task family and per pair of response sources (instructrl.world.signal)."""
    from instructrl.policy_io import Toolkit
    from instructrl.world import World
    from instructrl.world import signal as signal_lib
    from instructrl.world.datasets import read_jsonl

    world = World.from_dir(os.path.join(workdir, "world"))
    records = read_jsonl(os.path.join(workdir, "world", "prompts_rm_valid.jsonl"))
    rows = read_jsonl(os.path.join(workdir, "rankings", "rankings_valid_train_labelers.jsonl"))
    rm_dir = os.path.join(workdir, "rm")
    tk = Toolkit.from_workdir(rm_dir, batch_size=64)
    texts = [t for r in rows for t in r["responses"]]
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    # Every response whole and with its EOS, as the RM stage scored it: a sampled response
    # can re-tokenize longer than the max_new_tokens it was drawn with (15 of 34 in the
    # suite's tiny world), and a cut one scores differently, most of all read as a mean.
    max_new = max(len(tk.tokenizer.encode(t)) for t in texts) + 1
    flat = tk.rm_scores(
        tk.params(rm_dir, head="scalar"), tk.batch_from_texts(prompts, texts, max_new, tk.template)
    )
    ends = np.cumsum([len(r["responses"]) for r in rows])
    scores = [
        flat[end - len(r["responses"]) : end].tolist() for end, r in zip(ends, rows, strict=True)
    ]
    measured = signal_lib.measure(world, {r["id"]: r for r in records}, rows, scores)
    table_rows = [{"slice": "overall", **measured["overall"]}]
    table_rows += [{"slice": f"family {k}", **v} for k, v in measured["by_family"].items()]
    table_rows += [{"slice": f"sources {k}", **v} for k, v in measured["by_source_pair"].items()]
    table_rows += [  # the attributes gold separates a pair by; rare combinations left out
        {"slice": f"differ in {k}", **v}
        for k, v in measured["by_attribute"].items()
        if (v.get("rm_vs_gold_pairs") or 0) >= 40
    ]
    md = common.table(table_rows, ["slice", *SIGNAL_COLUMNS])
    return measured, md


def size(config, workdir, tiny):
    """(e) The small RLHF policies against a larger base model, pretrained on the same text for
    the same steps, prompted zero-shot and few-shot; all judged against the small SFT policy
    (paper: 1.3B InstructGPT preferred over 175B GPT-3, prompted or not)."""
    from instructrl import sft

    large = "medium"
    c = common.stage_config(config, workdir, "pretrain")
    c.model.preset = large
    stage = os.path.join(workdir, "variants", f"pretrain_{large}")
    common._once(stage, lambda: sft.run(c, stage))
    policies = {
        "ppo": common.ppo_variant(config, workdir, "ppo", {"ptx.coef": 0.0}),
        "ppo_ptx": common.ppo_variant(config, workdir, "ppo_ptx", {"ptx.coef": config.ptx_coef}),
        "base_small": os.path.join(workdir, "pretrain"),
        "base_fewshot_small": os.path.join(workdir, "pretrain"),
        f"base_{large}": stage,
        f"base_fewshot_{large}": stage,
    }
    models = common.evaluate_policies(config, workdir, "size", policies)
    small = common.stage_config(config, workdir, "sft")  # wired: the world's tokenizer
    params = {"small": _param_count(small), large: _param_count(c)}
    rows = []
    for name in ("sft", *policies):
        size_name = large if name.endswith(large) else "small"
        m = models[name]
        rows.append(
            {
                "model": name,
                "params": params[size_name],
                **{k: m[k] for k in POLICY_COLUMNS[1:-1]},
                "fewshot_heldout": m["fewshot_heldout"]["mean"],
            }
        )
    md = common.table(rows, ["model", "params", *POLICY_COLUMNS[1:]])
    return {"rows": rows, "models": models, "params": params}, md


SEED_MODELS = ("sft", "ppo", "ppo_ptx", "base", "base_fewshot")


def pooled_interval(parts: list[dict], z: float = 1.96) -> dict:
    """The mean and normal 95% interval over the union of several samples, each given as
    {mean, low, high, n} (evaluate.interval): exactly as if the outcomes were pooled."""
    n = np.array([p["n"] for p in parts], np.float64)
    m = np.array([p["mean"] for p in parts], np.float64)
    sd = np.array([(p["high"] - p["mean"]) * np.sqrt(p["n"]) / z for p in parts])
    total = n.sum()
    mean = float((n * m).sum() / total)
    var = (((n - 1) * sd**2).sum() + (n * (m - mean) ** 2).sum()) / (total - 1)
    half = z * float(np.sqrt(var / total))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(total)}


def seeds(config, workdir, tiny, seed_list=(0, 1, 2)):
    """The default pipeline on each world seed (DIR/seed_<N>), one row per seed and model:
    labeler agreement, RM accuracy by labeler group, win rate vs SFT with its interval, gold,
    Likert, KL and pretraining loss; and each model's win rate pooled over the seeds."""
    from instructrl import pipeline

    rows, reports = [], {}
    for seed in seed_list:
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        pipeline.run(common.base_config(tiny, seed=seed), seed_dir)
        with open(os.path.join(seed_dir, "report.json")) as f:
            report = json.load(f)
        reports[seed] = report
        rm = report["reward_model"]
        agreement = rm.get("labeler_agreement") or {}
        models = report["models"]
        for name in SEED_MODELS:
            m = models[name]
            rows.append(
                {
                    "seed": seed,
                    "model": name,
                    "win_rate_vs_sft": m["win_rate_vs_sft"],
                    "gold_score": m["gold_score"],
                    "likert": m["likert"],
                    "kl_to_sft": m["kl_to_sft"],
                    "pretrain_loss": m["pretrain_loss"],
                    "inter_train": agreement.get("inter_train"),
                    "inter_heldout": agreement.get("inter_heldout"),
                    "rm_acc_train": rm.get("accuracy_train_labelers"),
                    "rm_acc_heldout": rm.get("accuracy_heldout_labelers"),
                }
            )
    pooled = {
        name: pooled_interval([reports[s]["models"][name]["win_rate_vs_sft"] for s in reports])
        for name in SEED_MODELS
        if name != "sft"
    }
    for name, interval in pooled.items():
        rows.append({"seed": "pooled", "model": name, "win_rate_vs_sft": interval})
    columns = ["seed", "model", "win_rate_vs_sft", "gold_score", "likert", "kl_to_sft",
               "pretrain_loss", "inter_train", "inter_heldout", "rm_acc_train",
               "rm_acc_heldout"]  # fmt: skip
    return {"rows": rows, "pooled": pooled, "seeds": list(seed_list)}, common.table(rows, columns)


def _param_count(stage_config) -> int:
    from instructrl.model import count_params
    from instructrl.presets import model_config
    from instructrl.tokenizer import make_tokenizer

    return count_params(model_config(stage_config, make_tokenizer(stage_config.tokenizer)))


def _matmul_params(stage_config) -> int:
    from instructrl.model import matmul_params
    from instructrl.presets import model_config
    from instructrl.tokenizer import make_tokenizer

    return matmul_params(model_config(stage_config, make_tokenizer(stage_config.tokenizer)))


def training_flops(stage_dir: str) -> float:
    """Model FLOPs a DPO or PPO-family stage spent training, from its run_info and metrics:
    per token 2N forward, 6N trained (4N with LoRA's ``lora.compute=adapters``: forward and
    input gradients, the frozen base gets no weight gradient; "merged" forms it), N the
    parameters in matrix products (Kaplan et al. 2020; attention scores left out), over the
    real tokens it processed (no padding).

    PPO, per iteration of B answers to prompts of mean length p with responses of mean
    length r (its metrics): sampling (B (p + r) forward), scoring (policy, reference, reward
    and, with GAE, value model: 3 or 4 forwards), the update (epochs x B (p + r) trained
    tokens of the policy and the value model) and ptx (epochs x its rows x seq_len trained
    tokens of the policy). DPO: per epoch every training ranking's prompt once and each of
    its responses (one packed sequence), trained, plus the reference's forward."""
    import ml_collections

    from instructrl.data import lm as lm_data
    from instructrl.data import sources
    from instructrl.data.comparisons import load_arrays
    from instructrl.tokenizer import make_tokenizer

    with open(os.path.join(stage_dir, "run_info.json")) as f:
        info = json.load(f)
    c = ml_collections.ConfigDict(info["config"])
    n = _matmul_params(c)
    forward = 2.0 * n
    section = c.get("lora") or {}
    adapters = int(section.get("rank", 0)) and section.get("compute", "merged") == "adapters"
    train = (4.0 if adapters else 6.0) * n  # lora.compute "merged" forms W's gradient
    tokenizer = make_tokenizer(c.tokenizer)
    if c.stage == "dpo":
        loaded = load_arrays(c, tokenizer, int(c.dpo.max_responses))
        a = loaded.train
        responses = np.where(a["mask"], a["last"] + 1 - a["prompt"], 0).sum()
        tokens = float(responses + a["prompt"][:, 0].sum())  # one prompt per ranking
        epochs = info["total_steps"] * int(c.train.batch_size) / info["train_elements"]
        return epochs * tokens * (train + forward)
    records = sources.read_prompt_records(c.data.path)[int(c.data.eval_prompts) :]
    template = c.data.get("template", "{prompt}\n\n")
    _, mask = lm_data.encode_prompts(tokenizer, records, template, int(c.data.max_prompt_len))
    prompt = float(np.asarray(mask).sum(1).mean())
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        lengths = [
            r["ppo/response_length"] for r in map(json.loads, f) if "ppo/response_length" in r
        ]
    critic = c.ppo.get("estimator", "gae") == "gae"
    batch, epochs = int(c.ppo.batch_size), int(c.ppo.epochs)
    ptx = int(c.ppo.batch_size) * int(c.ptx.multiplier) * int(c.ptx.seq_len) if float(
        c.ptx.coef) > 0 else 0  # fmt: skip
    total = 0.0
    for r in lengths:
        tokens = batch * (prompt + r)
        total += tokens * forward * (1 + 3 + critic)  # sampling, scoring
        total += epochs * (tokens * train * (1 + critic) + ptx * train)
    return total


METHOD_COLUMNS = [
    "method", "win_rate_vs_sft", "gold_score", "likert", "rm_score", "kl_to_sft",
    "pretrain_loss", "samples_per_answer", "train_tflops", "train_seconds",
]  # fmt: skip
BEST_OF_N_COLUMNS = ["n", "win_rate_vs_sft", "gold_score", "likert", "rm_score", "kl_to_sft"]


# LoRA PPO: rank 8 (alpha 16) on every projection of the policy and the value model, each
# optimizer at 10x its full-weight learning rate (adapters start at zero: B = 0).
LORA = {"lora.rank": 8, "optimizer.lr": 1e-3, "value_optimizer.lr": 3e-3}


def methods(config, workdir, tiny):
    """Each post-SFT method from the same SFT policy, rankings and reward model of DIR,
    judged on the same held-out prompts by the same held-out labelers and the gold rubric:
    PPO, PPO-ptx, RLOO and GRPO (the pipeline's ``rl`` section; RLOO and GRPO with 4 answers
    per prompt, the same answers per iteration), LoRA PPO (``LORA``: rank-8 adapters on every
    projection of the policy and the value model), DPO pairwise and DPO listwise (its ``dpo``
    section) and best-of-n of SFT with the RM (its ``best_of_n.n``; the table shows n = 16,
    or the largest, and a second table every n). Cost: each stage's training FLOPs
    (``training_flops``, sampling and scoring included) and wall time on this machine,
    trained alone (run_info), and the policy samples one answer costs. KL to SFT is a sample
    estimate on each model's answers, for best-of-n its closed form."""
    coef = float(config.ptx_coef)
    group = {"ppo.group_size": 4, "ptx.coef": 0.0}  # 4 answers per prompt, as many in all
    variants = {
        "ppo": {"ptx.coef": 0.0},
        "ppo_ptx": {"ptx.coef": coef},
        "rloo": {"ppo.estimator": "rloo", **group},
        "grpo": {"ppo.estimator": "grpo", **group},
        "lora_ppo": {"ptx.coef": 0.0, **LORA},
    }
    dpo = {"dpo_pairwise": "pairwise", "dpo_listwise": "listwise"}
    if tiny:  # one method of each kind: the others' learning is tested on the toy task
        # (tests/test_ppo.py, tests/test_methods.py), and their rows take the same path here.
        del variants["grpo"], variants["lora_ppo"], dpo["dpo_listwise"]
    policies = {  # each trained alone, one after another: comparable wall times (not --tiny)
        name: common.ppo_variant(config, workdir, name, overrides, reuse=tiny)
        for name, overrides in variants.items()
    }
    policies |= {
        name: common.stage_variant(config, workdir, "dpo", name, {"dpo.loss": loss})
        for name, loss in dpo.items()
    }
    models = common.evaluate_policies(config, workdir, "methods", policies)
    bon_dir = common.stage_variant(config, workdir, "best_of_n", "best_of_n", {})
    with open(os.path.join(bon_dir, "evaluation.json")) as f:
        bon = json.load(f)
    shown = 16 if 16 in bon["n"] else max(bon["n"])
    rows = []
    for name in ("sft", *policies):
        m = models[name]
        seconds = flops = None
        if name in policies:
            with open(os.path.join(policies[name], "run_info.json")) as f:
                seconds = json.load(f)["seconds"]["total"]
            flops = training_flops(policies[name]) / 1e12
        rows.append({"method": name, **{k: m[k] for k in METHOD_COLUMNS[1:-3]},
                     "samples_per_answer": 1, "train_tflops": flops,
                     "train_seconds": seconds})  # fmt: skip
    m = bon["models"][f"best_of_{shown}"]
    rows.append({"method": f"best_of_{shown}", **{k: m[k] for k in METHOD_COLUMNS[1:-4]},
                 "pretrain_loss": models["sft"]["pretrain_loss"], "samples_per_answer": shown,
                 "train_tflops": 0.0, "train_seconds": 0.0})  # fmt: skip
    curve = [{"n": n, **{k: bon["models"][f"best_of_{n}"][k] for k in BEST_OF_N_COLUMNS[1:]}}
             for n in bon["n"]]  # fmt: skip
    md = common.table(rows, METHOD_COLUMNS) + "\n\nBest-of-n:\n\n"
    md += common.table(curve, BEST_OF_N_COLUMNS)
    return {"rows": rows, "best_of_n": curve, "models": models, "dirs": policies}, md


def methods_seeds(config, workdir, tiny, seed_list):
    """``methods`` on each world seed (DIR/seed_<N>, its pipeline's stages up to the RM built
    when missing), each seed's table in its DIR, and every method's win rate pooled over the
    seeds with its interval, its gold score and KL averaged."""
    per_seed, rows = {}, []
    for seed in seed_list:
        seed_config = common.base_config(tiny, seed=seed)
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        common.shared_stages(seed_config, seed_dir)
        results, md = methods(seed_config, seed_dir, tiny)
        common.write_results(seed_dir, "methods", results, md)
        per_seed[seed] = {r["method"]: r for r in results["rows"]}
        rows += [{"seed": seed, **r} for r in results["rows"]]
    names = list(per_seed[seed_list[0]])
    for name in names:
        if name == "sft":
            continue
        runs = [per_seed[s][name] for s in seed_list]
        rows.append(
            {
                "seed": "pooled",
                "method": name,
                "win_rate_vs_sft": pooled_interval([r["win_rate_vs_sft"] for r in runs]),
                **{k: float(np.mean([r[k] for r in runs]))
                   for k in ("gold_score", "likert", "rm_score", "kl_to_sft", "pretrain_loss")},
                "samples_per_answer": runs[0]["samples_per_answer"],
                "train_tflops": float(np.mean([r["train_tflops"] for r in runs])),
                "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
            }
        )  # fmt: skip
    return {"rows": rows, "seeds": list(seed_list)}, common.table(rows, ["seed", *METHOD_COLUMNS])


EXPERIMENTS = {
    "ptx_vs_ppo": ptx_vs_ppo,
    "kl_sweep": kl_sweep,
    "ptx_sweep": ptx_sweep,
    "rm_batching": rm_batching,
    "rm_generalization": rm_generalization,
    "overoptimization": overoptimization,
    "departures": departures,
    "size": size,
    "signal": signal,
    "seeds": seeds,
    "methods": methods,
}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="experiments/run.py")
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tiny", action="store_true", help="runlocal sizes (seconds)")
    parser.add_argument(
        "--seeds",
        default=None,
        help="seeds (default 0,1,2), methods: the world seeds, DIR/seed_<N> each",
    )
    parser.add_argument("--seed", type=int, default=0, help="the world seed of DIR's pipeline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    config = common.base_config(args.tiny, seed=args.seed)
    if args.experiment == "seeds":  # every seed is a whole pipeline of its own
        seed_list = tuple(int(x) for x in (args.seeds or "0,1,2").split(","))
        results, md = seeds(config, args.workdir, args.tiny, seed_list)
    elif args.experiment == "methods" and args.seeds:
        seed_list = tuple(int(x) for x in args.seeds.split(","))
        results, md = methods_seeds(config, args.workdir, args.tiny, seed_list)
    else:
        common.shared_stages(config, args.workdir)
        results, md = EXPERIMENTS[args.experiment](config, args.workdir, args.tiny)
    path = common.write_results(args.workdir, args.experiment, results, md)
    print(md)
    print(f"written: {path}")
    return path


if __name__ == "__main__":
    main()
