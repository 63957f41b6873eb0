"""The methods beyond the paper on the toy task (tests/toy_task.py: more 'a' than 'b' is
better), from its SFT policy, rankings and reward model. DPO: packed response log-probs
against each sequence alone; it learns, pairwise and listwise; a preempted run resumes to the
uninterrupted run's params. Best-of-n: the RM's and the gold score rise with n. LoRA: PPO
with adapters learns holding adapters only; a preempted LoRA SFT run resumes exactly."""

import json
import os
import sys
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from instructrl import best_of_n, dpo, lora, ppo, sft, sharding
from instructrl.data.comparisons import PackedRankingBatcher, encode_rankings
from instructrl.model import Transformer
from instructrl.policy_io import Toolkit
from instructrl.preemption import Preempted
from instructrl.presets import preset
from instructrl.tokenizer import ByteTokenizer
from instructrl.train import SIGTERM_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def _reference_logprobs(model, params, arrays):
    """{(row, k): float64 sum of log p(token s | tokens before s) over s from the prompt's end
    through EOS}, each response with its prompt as one sequence of its own."""
    keys = [
        (row, k) for row in range(len(arrays["mask"])) for k in np.flatnonzero(arrays["mask"][row])
    ]
    tokens = np.stack([arrays["tokens"][row, k] for row, k in keys])  # right-padded, causal
    logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)
    out = {}
    for (row, k), lp, ids in zip(keys, logp, tokens, strict=True):
        span = range(int(arrays["prompt"][row, k]), int(arrays["last"][row, k]) + 1)
        out[row, k] = sum(lp[s - 1, ids[s]] for s in span)
    return out


def test_packed_response_logprobs_equal_each_sequence_alone():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    rankings = []
    for i in range(8):
        k = int(rng.integers(2, 5))
        responses = ["xy"[i % 2] * int(rng.integers(1, 20)) for _ in range(k)]
        rankings.append({"prompt": f"p{i}" * int(rng.integers(1, 4)), "responses": responses,
                         "ranks": list(range(k))})  # fmt: skip
    arrays, _ = encode_rankings(tok, rankings, 40, "{prompt}|", 4)
    arrays.pop("group")
    model = Transformer(preset("llama-tiny", vocab_size=384), head="lm")
    params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    rules = sharding.LOGICAL_RULES
    want = _reference_logprobs(model, params, arrays)
    for share, shards in ((True, 1), (False, 1), (True, 2)):
        batcher = PackedRankingBatcher(arrays, 8, 0, shards=shards, share_prompt=share,
                                       response_tokens=24)  # fmt: skip
        rows = batcher.global_rows(0)
        batch = batcher.batch(0)
        chex.assert_shape([batch["before"], batch["targets"], batch["target_mask"]], (8, 4, 24))
        got = np.asarray(
            jax.jit(dpo.sequence_logprobs, static_argnums=(0, 3))(model, params, batch, rules)
        )
        padded = {k: arrays[k][rows] for k in ("tokens", "prompt", "last")}
        also = np.asarray(dpo.padded_sequence_logprobs(model, params, padded, rules))
        for i, row in enumerate(rows):
            for k in np.flatnonzero(arrays["mask"][row]):
                reference = want[row, k]
                np.testing.assert_allclose(got[i, k], reference, rtol=1e-4, err_msg=f"{share} {k}")
                np.testing.assert_allclose(also[i, k], reference, rtol=1e-4)
        # Response tokens: each response's own, through its EOS.
        assert int(batch["target_mask"].sum()) == int(
            (arrays["last"] + 1 - arrays["prompt"])[rows][arrays["mask"][rows]].sum()
        )


def _config(root, loss, **overrides):
    import dpo as dpo_config  # configs/dpo.py

    c = dpo_config.get_config(f"runlocal,loss={loss}").unlock()
    c.init_from = str(root / "sft")
    c.data.path = str(root / "rankings_train.jsonl")
    c.data.eval_paths = [str(root / "rankings_valid.jsonl")]
    c.data.seq_len, c.train.progress = 32, False
    c.optimizer.lr, c.dpo.beta = 1e-3, 0.1
    c.checkpoint.every_steps = 10
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[last] = value
    return c


@pytest.fixture(scope="module")
def trained(toy):
    root, _ = toy
    out = {}
    for loss in dpo.LOSSES:
        workdir = str(root / f"dpo_{loss}")
        dpo.run(_config(root, loss), workdir)
        out[loss] = workdir
    # LoRA: rank-8 adapters over the SFT policy, which is also the reference (one copy).
    out["lora"] = str(root / "dpo_lora")
    dpo.run(_config(root, "pairwise", **LORA_DPO), out["lora"])
    return root, out


LORA_DPO = {"lora.rank": 8, "optimizer.lr": 1e-3}


def _rows(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.endswith("tokens_per_s")} for r in rows]


@pytest.mark.parametrize("loss", [*dpo.LOSSES, "lora"])
def test_dpo_raises_the_rm_and_gold_scores_of_its_samples_over_sft(trained, loss):
    import toy_task

    root, workdirs = trained
    workdir = workdirs[loss]
    rows = _rows(workdir)
    train = [r for r in rows if "dpo/loss" in r]
    assert train[-1]["dpo/loss"] < train[0]["dpo/loss"] - 0.05, (train[0], train[-1])
    assert [r for r in rows if "eval/accuracy" in r][-1]["eval/accuracy"] > 0.7
    tk = Toolkit.from_workdir(workdir)
    rm_params = tk.params(str(root / "rm"), head="scalar")
    prompts = toy_task.PROMPTS * 16
    measured = {}
    for name, source in (("sft", str(root / "sft")), ("dpo", workdir)):
        batch = tk.sample(tk.params(source), prompts, max_new_tokens=16, template="{prompt}\n\n")
        measured[name] = (
            toy_task.frac_a(batch.texts),
            float(tk.rm_scores(rm_params, batch).mean()),
        )
    print(loss, "frac_a, rm score:", measured)
    (gold_sft, rm_sft), (gold_dpo, rm_dpo) = measured["sft"], measured["dpo"]
    assert gold_dpo > gold_sft + 0.1
    assert rm_dpo > rm_sft + 0.3


def test_preempted_dpo_resumes_to_the_uninterrupted_params(trained, monkeypatch):
    assert threading.current_thread() is threading.main_thread()  # the SIGTERM handler's
    root, workdirs = trained
    workdir = str(root / "dpo_resume")
    monkeypatch.setenv(SIGTERM_ENV, "dpo_resume:13")  # after a step no schedule saves
    with pytest.raises(Preempted):
        dpo.run(_config(root, "pairwise"), workdir)
    dpo.run(_config(root, "pairwise"), workdir)
    with open(os.path.join(workdir, "run_info.json")) as f:
        assert json.load(f)["resumed_from"] == 13
    tk = Toolkit.from_workdir(workdir)
    want, got = tk.params(workdirs["pairwise"]), tk.params(workdir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
    assert _rows(workdir) == _rows(workdirs["pairwise"])


def test_best_of_n_raises_the_rm_and_gold_scores_with_n(toy):
    import toy_task

    root, _ = toy
    tk = Toolkit.from_workdir(str(root / "sft"))
    params, rm_params = tk.params(str(root / "sft")), tk.params(str(root / "rm"), head="scalar")
    ns = [1, 4, 16]
    ranked = best_of_n.draw_and_rank(tk, params, rm_params, toy_task.PROMPTS * 8, ns, seed=0,
                                     max_new_tokens=16, template="{prompt}\n\n")  # fmt: skip
    rm = [float(ranked[n]["rm_scores"].mean()) for n in ns]
    gold = [toy_task.frac_a(ranked[n]["texts"]) for n in ns]
    print("best-of-n RM", rm, "frac_a", gold)
    # The first n draws are a subset of the first m > n: the kept score never falls.
    assert (ranked[4]["rm_scores"] >= ranked[1]["rm_scores"]).all()
    assert (ranked[16]["rm_scores"] >= ranked[4]["rm_scores"]).all()
    assert rm[0] + 0.5 < rm[1] < rm[2] - 0.2
    assert gold[0] + 0.1 < gold[1] < gold[2]
    assert best_of_n.analytic_kl(1) == 0.0
    np.testing.assert_allclose(best_of_n.analytic_kl(16), np.log(16) - 15 / 16)


def _checkpoint_tree(directory):
    """{path: (shape, dtype)} of the newest orbax checkpoint in ``directory`` (metadata)."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler())
    meta = mngr.item_metadata(mngr.latest_step())
    mngr.close()
    tree = meta.tree if hasattr(meta, "tree") else meta
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lora_ppo_raises_the_rm_and_gold_scores_holding_adapters_only(toy):
    """PPO with rank-8 adapters on every projection of the policy and the value model: the
    RM's and the gold score of its (merged, exported) policy's samples rise against SFT; its
    checkpoints hold adapters, their optimizer state and the value head only; the export
    is SFT's weights wherever no adapter is (the base stayed frozen), and the adapters
    exported alone as safetensors merge into SFT's weights to the same export."""
    import toy_task

    from instructrl.convert.__main__ import main as convert_main
    from instructrl.convert.adapters import read_safetensors

    root, config = toy
    c = config()
    c.lora.rank, c.lora.export = 8, "separate"
    c.optimizer.lr = 1e-3  # adapters take a larger step than full weights
    c.ppo.ema_decay = 0.5  # the exported EMA: about the last updates' adapters
    workdir = str(root / "ppo_lora")
    ppo.run(c, workdir)
    saved = _checkpoint_tree(os.path.join(workdir, "checkpoints"))
    params = [p for p in saved if p.startswith(("['params']", "['ema_params']"))]
    assert params and all(lora.is_adapter(p.rsplit("'", 2)[-2]) for p in params), params[:4]
    assert all(lora.is_adapter(p.rsplit("'", 2)[-2]) or "scalar_head" in p
               for p in saved if p.startswith("['value_params']"))  # fmt: skip
    tk = Toolkit.from_workdir(workdir)
    sft_params, exported = tk.params(str(root / "sft")), tk.params(workdir)
    kept = changed = 0
    for (path, want), (_, got) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0]
                                        for t in (sft_params, exported)), strict=True):  # fmt: skip
        name = jax.tree_util.keystr(path)
        adapted = name.endswith("['kernel']") and any(f"['{t}']" in name for t in
                                                      lora.LORA_TARGETS)  # fmt: skip
        if adapted:
            changed += not np.array_equal(got, want)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
            kept += 1
    assert kept >= 5 and changed >= 4, (kept, changed)
    out = convert_main(["--export", workdir, "--out", str(root / "ppo_lora_adapter"), "--adapter"])
    adapters, spec = read_safetensors(out)
    assert (spec["rank"], spec["alpha"], spec["base"]) == (8, 16.0, str(root / "sft"))
    merged = lora.merge(lora.combine(jax.device_get(sft_params), adapters), spec["alpha"])
    chex.assert_trees_all_close(merged, jax.device_get(exported), rtol=1e-6, atol=1e-6)
    rm_params = tk.params(str(root / "rm"), head="scalar")
    measured = {}
    for name, params in (("sft", sft_params), ("lora", exported)):
        batch = tk.sample(params, toy_task.PROMPTS * 16, max_new_tokens=16,
                          template="{prompt}\n\n")  # fmt: skip
        measured[name] = toy_task.frac_a(batch.texts), float(tk.rm_scores(rm_params, batch).mean())
    print("LoRA PPO frac_a, rm score:", measured)
    (gold_sft, rm_sft), (gold_lora, rm_lora) = measured["sft"], measured["lora"]
    assert gold_lora > gold_sft + 0.1
    assert rm_lora > rm_sft + 1.0


def test_preempted_lora_sft_resumes_to_the_uninterrupted_adapters(toy, monkeypatch):
    """LoRA SFT from the toy SFT policy, SIGTERMed after a step no schedule saves: the relaunch
    resumes there and ends with the uninterrupted run's adapters, best (merged) params and
    metrics, bit for bit."""
    import sft as sft_config  # configs/sft.py

    root, _ = toy
    c = sft_config.get_config(f"runlocal,data={root}/demos.jsonl").unlock()
    c.init_from, c.lora.rank = str(root / "sft"), 4
    c.train.steps, c.train.progress, c.data.seq_len = 16, False, 32
    c.checkpoint.every_steps, c.evals.heldout.every_steps = 8, 8
    del c.evals["samples"]
    workdirs = {name: str(root / f"sft_lora_{name}") for name in ("whole", "resumed")}
    sft.run(c, workdirs["whole"])
    monkeypatch.setenv(SIGTERM_ENV, "sft_lora_resumed:11")
    with pytest.raises(Preempted):
        sft.run(c, workdirs["resumed"])
    sft.run(c, workdirs["resumed"])
    with open(os.path.join(workdirs["resumed"], "run_info.json")) as f:
        assert json.load(f)["resumed_from"] == 11
    for sub in ("checkpoints", "best"):
        want, got = (_checkpoint_tree(os.path.join(workdirs[n], sub)) for n in ("whole", "resumed"))
        assert want.keys() == got.keys()
    tk = Toolkit.from_workdir(workdirs["whole"])
    want, got = (tk.params(workdirs[n]) for n in ("whole", "resumed"))  # best/: merged
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
    assert _rows(workdirs["resumed"]) == _rows(workdirs["whole"])
