"""The pipeline's report: DIR/report.json, DIR/report.md and PNG plots under DIR/plots/.

report.json:
  models.<name> (base, base_fewshot, sft, ppo, ppo_ptx): win_rate_vs_sft {mean, low, high, n},
      likert, gold_score, rm_score, kl_to_sft, pretrain_loss, one key per attribute rate
      (world.labelers.LIKERT_FLAGS), gold_attributes, fewshot_heldout {mean, <family>...},
      by_family.<family> {n, win_rate_vs_sft, gold_score}
  reward_model: accuracy and log loss on validation rankings by training and by held-out
      labelers, and the labelers' own agreement on the same comparisons
  curves.<ppo|ppo_ptx>: per-iteration RM score, KL to SFT, total reward, ptx loss
  alignment_tax: pretraining loss and held-out few-shot score change from SFT
  timings: seconds per stage
Plots (figure analogs): reward_kl_curves.png, win_rates.png (figure 3), attributes.png
(figure 4), alignment_tax.png (table 14).
"""

from __future__ import annotations

import json
import logging
import os

from instructrl import fs
from instructrl.world.labelers import LIKERT_FLAGS as ATTRIBUTES
from instructrl.world.labelers import pair_agreement

log = logging.getLogger(__name__)

MODELS = ("base", "base_fewshot", "sft", "ppo", "ppo_ptx", "dpo")  # the order of the tables

CURVE_KEYS = ("ppo/score", "ppo/kl_to_ref", "ppo/total_reward", "ppo/ptx_loss", "ppo/kl_coef")


def _jsonl(path: str) -> list[dict]:
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


def _json(path: str):
    if not fs.exists(path):
        return None
    return json.loads(fs.read_text(path))


def curves(stage_dir: str) -> dict[str, list]:
    rows = [r for r in _jsonl(os.path.join(stage_dir, "metrics.jsonl")) if "ppo/score" in r]
    out = {"step": [r["step"] for r in rows]}
    for key in CURVE_KEYS:
        if any(key in r for r in rows):
            out[key.split("/", 1)[1]] = [r.get(key) for r in rows]
    return out


def reward_model_summary(workdir: str) -> dict:
    rows = [r for r in _jsonl(os.path.join(workdir, "rm", "metrics.jsonl")) if "eval/accuracy" in r]
    out = {k.split("/", 1)[1]: v for k, v in (rows[-1] if rows else {}).items() if "/" in k}
    agreement = labeler_agreement(workdir)
    if agreement:
        out["labeler_agreement"] = agreement
    return out


def labeler_agreement(workdir: str) -> dict | None:
    """Pairwise agreement of the training vs held-out labeler of each validation prompt on its
    responses, and (rankings/signal.json) every group's inter-labeler agreement (paper: 72.6%
    training, 77.3% held-out) and agreement with the gold order."""
    a = _jsonl(os.path.join(workdir, "rankings", "rankings_valid_train_labelers.jsonl"))
    b = _jsonl(os.path.join(workdir, "rankings", "rankings_valid_heldout_labelers.jsonl"))
    agree = total = 0
    for x, y in zip(a, b, strict=False):
        if x["responses"] == y["responses"]:
            ag, tot = pair_agreement(x["ranks"], y["ranks"])
            agree, total = agree + ag, total + tot
    if not total:
        return None
    out = {"train_vs_heldout": agree / total, "pairs": total}
    measured = _json(os.path.join(workdir, "rankings", "signal.json"))
    if measured:  # every labeler of a group on the same responses (appendix B.3)
        o = measured["overall"]
        out.update(
            {
                k: o.get(k)
                for k in (
                    "inter_train",
                    "inter_heldout",
                    "train_vs_gold",
                    "heldout_vs_gold",
                    "gold_std",
                )
            }  # fmt: skip
        )
    return out


# The parts of a stage's seconds, in the order the table shows them (run_info.json "seconds").
TIME_PARTS = ("compile_and_first_step", "restore", "host_data", "device_step", "sampling",
              "scoring", "update", "labeling", "judging", "heldout_tasks", "evaluation",
              "checkpointing", "logging")  # fmt: skip


def time_breakdown(workdir: str) -> dict:
    """{stage: {part: seconds, total, minor_page_faults}} from each stage's run_info.json."""
    out = {}
    for name in fs.listdir(workdir) if fs.isdir(workdir) else []:
        info = _json(os.path.join(workdir, name, "run_info.json"))
        if info and isinstance(info.get("seconds"), dict):
            out[name] = info["seconds"]
    return out


def build(workdir: str) -> dict:
    evaluation = _json(os.path.join(workdir, "evaluate", "evaluation.json")) or {"models": {}}
    models = evaluation["models"]
    report = {
        "models": models,
        "num_eval_prompts": evaluation.get("num_prompts"),
        "reward_model": reward_model_summary(workdir),
        "curves": {s: curves(os.path.join(workdir, s)) for s in ("ppo", "ppo_ptx")},
        "timings": _json(os.path.join(workdir, "timings.json")) or {},
        "time_breakdown": time_breakdown(workdir),
    }
    if "sft" in models:
        sft = models["sft"]
        report["alignment_tax"] = {
            m: {
                "pretrain_loss_increase": models[m]["pretrain_loss"] - sft["pretrain_loss"],
                "fewshot_heldout_change": models[m]["fewshot_heldout"]["mean"]
                - sft["fewshot_heldout"]["mean"],
            }
            for m in models
            if m != "base_fewshot"
        }
    return report


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.{digits}f} [{v['low']:.2f}, {v['high']:.2f}]"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def headline(report: dict) -> str:
    """The markdown table `instructrl pipeline` prints at the end."""
    cols = ("win_rate_vs_sft", "likert", "gold_score", "rm_score", "kl_to_sft", "pretrain_loss")
    lines = [
        "| model | " + " | ".join(cols) + " | fewshot_heldout |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name in MODELS:
        m = report["models"].get(name)
        if m is None:
            continue
        few = (m.get("fewshot_heldout") or {}).get("mean")
        cells = [_fmt(m.get(c)) for c in cols] + [_fmt(few)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    out = ["# instructrl pipeline report", "", "## Headline (held-out prompts, held-out labelers)"]
    out += ["", headline(report), ""]
    out += ["## Attributes (figure 4 analog; labeler-judged rates)", ""]
    names = [n for n in MODELS if n in report["models"]]
    out.append("| attribute | " + " | ".join(names) + " |")
    out.append("|---" * (len(names) + 1) + "|")
    for a in ATTRIBUTES:
        out.append(f"| {a} | " + " | ".join(_fmt(report["models"][n].get(a)) for n in names) + " |")
    fams = sorted(report["models"]["sft"].get("by_family") or {})
    if fams:
        out += ["", "## By task family (win rate vs SFT / gold score)", ""]
        out.append("| family | n | " + " | ".join(names) + " |")
        out.append("|---" * (len(names) + 2) + "|")
        for f in fams:
            cells = []
            for n in names:
                row = (report["models"][n].get("by_family") or {}).get(f)
                cells.append(
                    f"{row['win_rate_vs_sft']:.2f} / {row['gold_score']:.2f}" if row else "-"
                )
            n_f = report["models"]["sft"]["by_family"][f]["n"]
            out.append(f"| {f} | {n_f} | " + " | ".join(cells) + " |")
    if "alignment_tax" in report:
        out += ["", "## Alignment tax (table 14 analog; the change from SFT is in report.json)", ""]
        fams = sorted(
            k for k in (report["models"]["sft"].get("fewshot_heldout") or {}) if k != "mean"
        )
        out.append("| model | pretrain_loss | " + " | ".join(fams) + " | fewshot mean |")
        out.append("|---" * (len(fams) + 3) + "|")
        for n in names:
            if n == "base_fewshot":
                continue
            few = report["models"][n]["fewshot_heldout"]
            cells = [_fmt(report["models"][n]["pretrain_loss"])] + [_fmt(few[f]) for f in fams]
            out.append(f"| {n} | " + " | ".join(cells + [_fmt(few["mean"])]) + " |")
    rm = report.get("reward_model") or {}
    if rm:
        out += ["", "## Reward model (validation rankings)", ""]
        agreement = rm.get("labeler_agreement") or {}
        if "inter_train" in agreement:
            out += [
                "| labels by | RM accuracy | inter-labeler agreement | labelers vs gold "
                "| paper RM / agreement |",
                "|---|---|---|---|---|",
                f"| training labelers | {_fmt(rm.get('accuracy_train_labelers'))} | "
                f"{_fmt(agreement['inter_train'])} | {_fmt(agreement.get('train_vs_gold'))} "
                "| 0.724 / 0.726 |",
                f"| held-out labelers | {_fmt(rm.get('accuracy_heldout_labelers'))} | "
                f"{_fmt(agreement['inter_heldout'])} | {_fmt(agreement.get('heldout_vs_gold'))} "
                "| 0.696 / 0.773 |",
                "",
            ]
        for k in sorted(rm):
            out.append(f"- {k}: {_fmt(rm[k]) if not isinstance(rm[k], dict) else rm[k]}")
    if report.get("timings"):
        out += ["", "## Seconds per stage", "", json.dumps(report["timings"])]
    breakdown = report.get("time_breakdown") or {}
    if breakdown:
        order = [s for s in report.get("timings") or {} if s in breakdown]
        order += [s for s in breakdown if s not in order]
        parts = [p for p in TIME_PARTS if any(p in breakdown[s] for s in order)]
        out += ["", "## Where the time goes (seconds; run_info.json of each stage)", ""]
        out.append("| stage | " + " | ".join([*parts, "total", "minor page faults"]) + " |")
        out.append("|---" * (len(parts) + 3) + "|")
        for s in order:
            b = breakdown[s]
            cells = [_fmt(b.get(p), 1) for p in parts] + [_fmt(b.get("total"), 1)]
            cells.append(f"{b.get('minor_page_faults', 0):,}")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Plots: plots/reward_kl_curves.png, plots/win_rates.png, plots/attributes.png,",
        "plots/alignment_tax.png",
    ]
    return "\n".join(out) + "\n"


def comparison_markdown(evaluation: dict) -> str:
    """report.md of ``instructrl evaluate``: the policy against its reference."""
    s = evaluation["settings"]
    cols = ("win_rate_vs_reference", "rm_win_rate_vs_reference", "likert", "gold_score",
            "rm_score", "kl_to_reference", "response_words")  # fmt: skip
    cols = [c for c in cols if any(c in m for m in evaluation["models"].values())]
    out = ["# instructrl evaluate", "",
           f"policy `{s['policy']}` against reference `{s['reference']}` on "
           f"{evaluation['num_prompts']} prompts of `{s['prompts']}`; win rates judged by the "
           f"{evaluation['judge']} (ties count one half; 95% intervals over prompts).", "",
           "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for name, m in evaluation["models"].items():
        out.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    if evaluation["attributes"]:
        out += ["", "| attribute | reference | policy |", "|---|---|---|"]
        for a in evaluation["attributes"]:
            cells = [_fmt(evaluation["models"][n].get(a)) for n in ("reference", "policy")]
            out.append(f"| {a} | " + " | ".join(cells) + " |")
    settings = {k: s[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
    out += ["", "Sampling: " + json.dumps(settings)]
    return "\n".join(out) + "\n"


def plots(report: dict, directory: str) -> list[str]:
    """PNG figures; returns their paths (none when matplotlib is missing)."""
    try:  # optional: the plots extra
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'instructrl[plots]')")
        return []
    fs.makedirs(directory)
    paths = []
    models = report["models"]
    names = [n for n in MODELS if n in models]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage, c in report["curves"].items():
        if c.get("step"):
            axes[0].plot(c["step"], c["score"], label=stage)
            axes[1].plot(c["step"], c["kl_to_ref"], label=stage)
    axes[0].set(title="RM score of rollouts", xlabel="PPO iteration")
    axes[1].set(title="KL to SFT (nats / response)", xlabel="PPO iteration")
    for ax in axes:
        ax.legend()
    paths.append(_save(fig, directory, "reward_kl_curves.png", plt))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = [models[n]["win_rate_vs_sft"] for n in names]
    err = [[x["mean"] - x["low"] for x in w], [x["high"] - x["mean"] for x in w]]
    ax.bar(names, [x["mean"] for x in w], yerr=err)
    ax.axhline(0.5, color="gray", ls="--")
    ax.set(title="Win rate against SFT (held-out labelers, 95% CI)", ylim=(0, 1))
    paths.append(_save(fig, directory, "win_rates.png", plt))

    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [models[n].get(a) or 0.0 for a in ATTRIBUTES]
        ax.bar([j + i * width for j in range(len(ATTRIBUTES))], vals, width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ATTRIBUTES))])
    ax.set_xticklabels([a.replace("_", "\n") for a in ATTRIBUTES], fontsize=7)
    ax.set(title="Attributes (labeler-judged rates)", ylim=(0, 1))
    ax.legend(fontsize=7)
    paths.append(_save(fig, directory, "attributes.png", plt))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    tax = [n for n in names if n != "base_fewshot"]
    axes[0].bar(tax, [models[n]["pretrain_loss"] for n in tax])
    axes[0].set(title="Held-out pretraining loss (lower is better)")
    axes[1].bar(tax, [models[n]["fewshot_heldout"]["mean"] for n in tax])
    axes[1].set(title="Held-out few-shot tasks (higher is better)")
    paths.append(_save(fig, directory, "alignment_tax.png", plt))
    return paths


def _save(fig, directory, name, plt):
    path = os.path.join(directory, name)
    fig.tight_layout()
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def run(config, workdir: str) -> dict:
    """The report stage: ``write`` the report of the pipeline directory ``config.pipeline_dir``."""
    return write(config.pipeline_dir)


def write(workdir: str) -> dict:
    report = build(workdir)
    fs.write_atomic(os.path.join(workdir, "report.json"), json.dumps(report, indent=1))
    fs.write_atomic(os.path.join(workdir, "report.md"), markdown(report))
    plots(report, os.path.join(workdir, "plots"))
    return report
