"""PPO end to end on a toy task with a known preference: more 'a' than 'b' is better.

The SFT policy writes random a/b strings; the reward model learns the rankings (by the
fraction of 'a'); PPO must raise the RM score, and the fraction of 'a' itself (the gold
score here), with a bounded KL; with a huge kl_coef the policy must stay at SFT.
"""

import json
import os
import sys

import numpy as np
import pytest

from instructrl import ppo, rm, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

PROMPTS = ["write:", "go:", "letters:", "ab:"]


def _string(rng, frac_a, n=12):
    return "".join("a" if rng.random() < frac_a else "b" for _ in range(n))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import ppo as ppo_config
    import rm as rm_config
    import sft as sft_config

    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    demos = [{"prompt": PROMPTS[i % 4], "response": _string(rng, 0.5)} for i in range(400)]
    (root / "demos.jsonl").write_text("\n".join(json.dumps(d) for d in demos))
    prompts = [{"prompt": p} for p in PROMPTS * 20]
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts))
    ptx_text = root / "text.txt"
    ptx_text.write_text(" ".join(_string(rng, 0.5) for _ in range(400)))

    c = sft_config.get_config(f"runlocal,data={root}/demos.jsonl").unlock()
    c.train.steps, c.train.progress, c.data.seq_len = 60, False, 32
    c.optimizer.lr = 3e-3
    del c.evals["samples"]
    sft.run(c, str(root / "sft"))

    rankings = []
    for i in range(480):
        fracs = rng.uniform(0, 1, size=4)
        responses = [_string(rng, f) for f in fracs]
        counts = [r.count("a") for r in responses]
        ranks = [sorted(counts, reverse=True).index(c) for c in counts]
        rankings.append({"prompt": PROMPTS[i % 4], "responses": responses, "ranks": ranks})
    c = rm_config.get_config("runlocal").unlock()
    c.init_from, c.train.progress, c.data.seq_len = str(root / "sft"), False, 32
    c.train.epochs, c.optimizer.lr = 2.0, 2e-3
    c.rm.normalize_with = str(root / "demos.jsonl")
    rm.run(c, str(root / "rm"), rankings=rankings[:416], eval_rankings=rankings[416:])
    acc = [json.loads(x) for x in open(root / "rm" / "metrics.jsonl")]
    assert [r["eval/accuracy"] for r in acc if "eval/accuracy" in r][-1] > 0.8

    def config(**ppo_overrides):
        c = ppo_config.get_config("runlocal").unlock()
        c.init_from, c.ppo.reward_model = str(root / "sft"), str(root / "rm")
        c.data.path, c.data.max_prompt_len, c.data.eval_prompts = str(root / "prompts.jsonl"), 12, 8
        c.train.progress = False
        c.ppo.iterations, c.ppo.max_new_tokens, c.ppo.batch_size = 12, 16, 16
        c.optimizer.lr, c.optimizer.warmup_steps = 3e-4, 0
        c.ptx.text_files, c.ptx.seq_len = [str(ptx_text)], 32
        c.evals.policy.every_steps = 6
        c.evals.policy.use_ema = False  # 24 updates barely move an EMA of 0.992
        for k, v in ppo_overrides.items():
            c.ppo[k] = v
        return c

    return root, config


def _rows(workdir):
    return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _frac_a(workdir):
    """Fraction of 'a' among a/b letters of the eval samples, by step."""
    out = {}
    for row in map(json.loads, open(os.path.join(workdir, "samples.jsonl"))):
        text = row["response"]
        out.setdefault(row["step"], []).append(text.count("a") / max(len(text), 1))
    return {step: float(np.mean(v)) for step, v in out.items()}


def test_ppo_raises_reward_with_bounded_kl(toy):
    root, config = toy
    workdir = str(root / "ppo")
    ppo.run(config(), workdir)
    rows = [r for r in _rows(workdir) if "ppo/score" in r]
    first, last = np.mean([r["ppo/score"] for r in rows[:2]]), np.mean(
        [r["ppo/score"] for r in rows[-2:]]
    )
    assert last > first + 0.3, (first, last)
    assert 0 < rows[-1]["ppo/kl_to_ref"] < 10.0
    for key in ("ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/value_loss",
                "ppo/explained_variance", "ppo/eos_rate", "ppo/time/generate_s"):
        assert key in rows[-1]
    assert os.path.isdir(os.path.join(workdir, "export"))
    # The gold criterion itself improved (SFT writes about half 'a').
    frac = _frac_a(workdir)
    assert frac[max(frac)] > 0.6, frac
    print("scores", [round(r["ppo/score"], 3) for r in rows], "frac_a", frac)


def test_huge_kl_coef_keeps_policy_at_sft(toy):
    root, config = toy
    workdir = str(root / "ppo_kl")
    ppo.run(config(kl_coef=50.0), workdir)
    rows = [r for r in _rows(workdir) if "ppo/kl_to_ref" in r]
    assert abs(rows[-1]["ppo/kl_to_ref"]) < 0.5
    scores = [r["ppo/score"] for r in rows]
    assert abs(np.mean(scores[-2:]) - np.mean(scores[:2])) < 0.3
