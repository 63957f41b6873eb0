"""The toy task with a known preference that the RL and DPO tests share: more 'a' than 'b' is
better. ``build(root)`` trains its SFT policy (random a/b strings) and its reward model (on
rankings by the fraction of 'a', ties where counts are equal) and writes the files the
stages read; the fraction of 'a' in a response is the gold score."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

PROMPTS = ["write:", "go:", "letters:", "ab:"]
PTX_DOC_LEN = len("ab:\n\n") + 12 + 1  # bytes and EOS
TRAIN_RANKINGS = 416  # of 480; the rest validate


def string(rng, frac_a, n=12):
    return "".join("a" if rng.random() < frac_a else "b" for _ in range(n))


def frac_a(texts) -> float:
    """The gold score: the mean fraction of 'a' among the responses' characters."""
    return float(np.mean([t.count("a") / max(len(t), 1) for t in texts]))


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))


def build(root):
    """SFT and RM of the toy task in ``root`` (pathlib.Path). Returns ``ppo_config(ptx_coef,
    **ppo_overrides)``, the PPO config from them."""
    import ppo as ppo_config
    import rm as rm_config
    import sft as sft_config

    from instructrl import rm, sft

    rng = np.random.default_rng(0)
    demos = [{"prompt": PROMPTS[i % 4], "response": string(rng, 0.5)} for i in range(400)]
    _write_jsonl(root / "demos.jsonl", demos)
    _write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 20])
    # Pretraining text: documents in the SFT format (one per file, so EOS-separated), each
    # PTX_DOC_LEN tokens long so that every pretraining row starts at a document, as SFT rows do.
    ptx_dir = root / "ptx"
    ptx_dir.mkdir()
    ptx_rng = np.random.default_rng(1)
    ptx_files = []
    for i in range(200):
        path = ptx_dir / f"{i:03d}.txt"
        path.write_text(f"ab:\n\n{string(ptx_rng, 0.5)}")
        ptx_files.append(str(path))

    c = sft_config.get_config(f"runlocal,data={root}/demos.jsonl").unlock()
    c.train.steps, c.train.progress, c.data.seq_len = 60, False, 32
    c.optimizer.lr = 3e-3
    del c.evals["samples"]
    sft.run(c, str(root / "sft"))

    rankings = []
    for i in range(480):
        fracs = rng.uniform(0, 1, size=4)
        responses = [string(rng, f) for f in fracs]
        counts = [r.count("a") for r in responses]
        ranks = [sorted(counts, reverse=True).index(c) for c in counts]
        rankings.append({"prompt": PROMPTS[i % 4], "responses": responses, "ranks": ranks})
    _write_jsonl(root / "rankings_train.jsonl", rankings[:TRAIN_RANKINGS])
    _write_jsonl(root / "rankings_valid.jsonl", rankings[TRAIN_RANKINGS:])
    c = rm_config.get_config("runlocal").unlock()
    c.init_from, c.train.progress, c.data.seq_len = str(root / "sft"), False, 32
    c.train.epochs, c.optimizer.lr = 2.0, 2e-3
    c.rm.normalize_with = str(root / "demos.jsonl")
    rm.run(c, str(root / "rm"), rankings=rankings[:TRAIN_RANKINGS],
           eval_rankings=rankings[TRAIN_RANKINGS:])  # fmt: skip
    acc = [json.loads(x) for x in open(root / "rm" / "metrics.jsonl")]
    assert [r["eval/accuracy"] for r in acc if "eval/accuracy" in r][-1] > 0.8

    def config(ptx_coef=0.0, **ppo_overrides):
        c = ppo_config.get_config("runlocal").unlock()
        c.init_from, c.ppo.reward_model = str(root / "sft"), str(root / "rm")
        c.data.path, c.data.max_prompt_len, c.data.eval_prompts = str(root / "prompts.jsonl"), 12, 8
        c.train.progress = False
        c.ppo.iterations, c.ppo.max_new_tokens, c.ppo.batch_size = 12, 16, 16
        c.optimizer.lr, c.optimizer.warmup_steps = 3e-4, 0
        c.ptx.text_files, c.ptx.seq_len, c.ptx.eval_rows = ptx_files, PTX_DOC_LEN, 32
        c.ptx.coef = ptx_coef
        c.evals.policy.every_steps = 6
        c.evals.policy.use_ema = False  # 24 updates barely move an EMA of 0.992
        c.evals.pretrain.every_steps = 12
        c.evals.pretrain.use_ema = False
        for k, v in ppo_overrides.items():
            c.ppo[k] = v
        return c

    return config
