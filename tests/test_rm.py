"""Reward model stage: encoding, the step, learning on the synthetic world, normalization."""

import os
import sys

import numpy as np

from instructrl import rm
from instructrl.tokenizer import ByteTokenizer
from instructrl.world import World
from instructrl.world.datasets import build_rankings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def test_encode_rankings_masks_variable_k_and_marks_last_token():
    tok = ByteTokenizer()
    rankings = [
        {"prompt": "p", "responses": ["aa", "b", "ccc"], "ranks": [1, 0, 1], "labeler_id": "x"},
        {"prompt": "q", "responses": ["dd", "e"], "ranks": [0, 1], "labeler_id": "h"},
    ]
    arrays, skipped = rm.encode_rankings(tok, rankings, 16, "{prompt}|", 4, heldout_labelers=["h"])
    assert skipped == 0
    assert arrays["tokens"].shape == (2, 4, 16)
    np.testing.assert_array_equal(arrays["mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    # "p|aa" + EOS: the reward is read at the EOS, index 4.
    assert arrays["last"][0, 0] == 4 and arrays["tokens"][0, 0, 4] == tok.eos_id
    np.testing.assert_array_equal(arrays["group"], [0, 1])
    pairs = rm.expand_pairs(arrays)
    # Ordered pairs: prompt 0 has (b > aa), (b > ccc); prompt 1 has (dd > e).
    assert pairs["tokens"].shape == (3, 2, 16)
    np.testing.assert_array_equal(pairs["ranks"], [[0, 1]] * 3)


def test_packed_batches_give_the_padded_rewards():
    """Responses packed side by side (own positions, own segments) score exactly as each one
    alone in its padded slot, read at the last token or averaged over the response (checked
    against a NumPy mean of the padded outputs); every response of the batch is in one row
    once."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from instructrl import sharding
    from instructrl.model import Transformer
    from instructrl.presets import preset

    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    rankings = []
    for i in range(12):
        k = int(rng.integers(2, 6))
        responses = ["x" * int(rng.integers(1, 30)) for _ in range(k)]
        rankings.append({"prompt": f"p{i}" * int(rng.integers(1, 4)), "responses": responses,
                         "ranks": list(range(k))})  # fmt: skip
    arrays, _ = rm.encode_rankings(tok, rankings, 48, "{prompt}|", 5)
    arrays.pop("group")
    rows = rm.PackedRankingBatcher(arrays, 12, seed=0).global_rows(0)
    mask = arrays["mask"][rows]
    responses = int(mask.sum())
    for share in (False, True):
        batcher = rm.PackedRankingBatcher(arrays, 12, seed=0, share_prompt=share)
        batch = batcher.batch(0)
        assert batch["tokens"].shape[0] % 8 == 0 and batch["tokens"].shape[0] < 12 * 5
        # Each response once, each prompt once per piece: per response, or per ranking and row.
        pieces = batcher._pieces(rows)
        assert (len(pieces) < responses) == share, (len(pieces), responses)
        length = lambda i, k, p: int(arrays["last"][rows[i], k]) + 1 - p  # noqa: E731
        tokens = sum(p + sum(length(i, k, p) for k in ks) for i, p, ks, _ in pieces)
        assert int((batch["segment_ids"] > 0).sum()) == tokens
        assert tokens == int((arrays["last"][rows] + 1)[mask].sum()) - share * sum(
            int(arrays["prompt"][rows[i], ks[0]]) * (len(ks) - 1) for i, _, ks, _ in pieces
        )
        padded = {k: arrays[k][rows] for k in ("tokens", "prompt", "last")}
        for name, readout in (("tiny", "last"), ("llama-tiny", "last"), ("tiny", "mean")):
            cfg = preset(name, vocab_size=384, reward_readout=readout)
            model = Transformer(cfg, head="scalar")
            init = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
            params = nn.unbox(init["params"])
            rules = sharding.LOGICAL_RULES
            packed = np.asarray(rm.batch_rewards(model, params, batch, rules))
            want = np.asarray(rm.batch_rewards(model, params, padded, rules))
            np.testing.assert_allclose(packed[mask], want[mask], atol=1e-5)
            if readout == "mean":  # the padded mean against NumPy's
                b, k, t = padded["tokens"].shape
                values = np.asarray(model.apply({"params": params},
                                                padded["tokens"].reshape(b * k, t)))  # fmt: skip
                values = values.reshape(b, k, t).astype(np.float64)
                for i, j in zip(*np.nonzero(mask), strict=True):
                    span = values[i, j, padded["prompt"][i, j] : padded["last"][i, j] + 1]
                    assert abs(want[i, j] - span.mean()) < 1e-5
    # Over 2 shards, two hosts (each its own shard) build the one host's global batch.
    one = rm.PackedRankingBatcher(arrays, 12, seed=0, shards=2).batch(0)
    two = [rm.PackedRankingBatcher(arrays, 12, 0, slice(6 * h, 6 * h + 6), 2).batch(0)
           for h in (0, 1)]  # fmt: skip
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(lambda *x: np.concatenate(x), *two), one
    )


def _world_rankings(world, n, labelers, seed):
    records = world.sample_prompts(n, seed=seed, prefix=f"rm{seed}")
    return build_rankings(world, records, labelers, seed=seed)


def test_rm_learns_world_rankings_and_normalizes(tmp_path):
    import rm as rm_config  # configs/rm.py

    world = World.build(seed=0)
    train = _world_rankings(world, 320, world.labelers.train, 1)
    valid = _world_rankings(world, 48, world.labelers.heldout, 2)
    demos = world.demonstrations(world.sample_prompts(32, seed=3, prefix="demo"))
    demo_file = tmp_path / "demos.jsonl"
    import json

    demo_file.write_text("\n".join(json.dumps(d) for d in demos))
    c = rm_config.get_config("runlocal").unlock()
    c.train.progress = False
    c.train.epochs = 2.0
    c.optimizer.lr = 1e-3
    c.data.seq_len = 192
    c.data.heldout_labelers = [lab.labeler_id for lab in world.labelers.heldout]
    c.rm.normalize_with = str(demo_file)
    c.rm.normalize_examples = 32
    workdir = str(tmp_path / "rm")
    state = rm.run(c, workdir, rankings=train, eval_rankings=valid)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    final = {k: v for r in rows for k, v in r.items()}
    # ~750 held-out pairs: 0.55 is about 3 standard errors above chance.
    assert final["eval/accuracy"] > 0.55, final
    assert final["eval/num_pairs_heldout_labelers"] > 0
    train_losses = [r["rm/loss"] for r in rows if "rm/loss" in r]
    assert train_losses[-1] < train_losses[0]
    # Normalization: demonstrations score mean 0 under the exported params.
    info = json.load(open(os.path.join(workdir, "export", "info.json")))
    assert abs(info["reward_bias"]) > 0
    tok = ByteTokenizer()
    arrays, _ = rm.encode_rankings(
        tok,
        [
            {"prompt": d["prompt"], "responses": [d["response"], d["response"]], "ranks": [0, 0]}
            for d in demos
        ],
        192,
        "{prompt}\n\n",
        2,
        skip_too_long=True,
    )
    from instructrl import sharding
    from instructrl.model import Transformer
    from instructrl.presets import preset
    from instructrl.scoring import ranking_rewards

    model = Transformer(preset("tiny", vocab_size=384), head="scalar")
    rewards = ranking_rewards(
        model, state.params, arrays["tokens"], arrays["prompt"], arrays["last"],
        sharding.LOGICAL_RULES,
    )  # fmt: skip
    assert abs(float(np.asarray(rewards)[:, 0].mean())) < 1e-3


def test_unseen_labelers_are_the_heldout_group():
    train = [{"labeler_id": "a"}, {"labeler_id": "b"}]
    valid = [{"labeler_id": "a"}, {"labeler_id": "c"}, {"labeler_id": "d"}, {}]
    assert rm.unseen_labelers(train, valid) == ["c", "d"]
    assert rm.unseen_labelers([{"labeler_id": "a"}, {}], valid) == []  # ids incomplete


def test_rm_world_check_small(tmp_path):
    """scripts/rm_world_check.py in miniature: agreement near its setting, the gold score as
    the accuracy ceiling, and one epoch each way on the same rankings, where shuffled pairs
    take ~C(K,2) times the steps and fit their own rankings more than unseen ones."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import rm_world_check

    args = rm_world_check.parse_args(
        [
            "--out", str(tmp_path),
            "--num_train", "32",
            "--num_valid", "32",
            "--variants", "all_in_one,shuffled",
            "--batch", "8",
            "--vocab_size", "512",
            "--tokenizer_docs", "400",
        ]
    )  # fmt: skip
    results = rm_world_check.run_check(args)
    # The world's references and corruptions differ more than sampled responses do, so the
    # labelers agree more here than on the pipeline's rankings (0.728), yet short of unanimity.
    agreement = results["agreement_train_labelers"]
    assert 0.6 < agreement < 0.95
    # Two noisy labelers agree with each other less than either agrees with the gold order.
    assert agreement < results["gold_accuracy_train_labelers"] < 1.0
    one, shuffled = results["variants"]["all_in_one"], results["variants"]["shuffled"]
    assert one["steps"] == 32 // 8
    assert shuffled["steps"] > 10 * one["steps"]  # the same data, one epoch
    for v in (one, shuffled):
        assert 0.0 <= v["valid_accuracy_heldout_labelers"] <= 1.0
    assert shuffled["train_log_loss"] < one["train_log_loss"]
    assert shuffled["overfit_log_loss"] > one["overfit_log_loss"]


def test_ranking_batcher_buckets_by_k_and_trims_slots():
    """Batches group rankings of like K and keep only the slots their largest ranking uses;
    the trimmed slots were all padding; each epoch visits distinct rows in a new order."""
    rng = np.random.default_rng(0)
    n, k_max, t = 203, 9, 5
    ks = rng.integers(2, k_max + 1, n)
    mask = np.arange(k_max)[None] < ks[:, None]
    arrays = {
        "tokens": rng.integers(0, 50, (n, k_max, t)).astype(np.int32),
        "last": rng.integers(0, t, (n, k_max)).astype(np.int32),
        "ranks": rng.integers(0, 4, (n, k_max)).astype(np.int32),
        "mask": mask,
        "id": np.arange(n),
    }
    batcher = rm.RankingBatcher(arrays, 16, seed=3)
    assert batcher.steps_per_epoch == n // 16
    widths, epochs = [], []
    for epoch in range(2):
        seen = []
        for step in range(epoch * batcher.steps_per_epoch, (epoch + 1) * batcher.steps_per_epoch):
            b = batcher.batch(step)
            rows = b["id"]
            k = b["mask"].shape[1]
            assert k == ks[rows].max()
            assert not mask[rows, k:].any()  # only padding was trimmed
            np.testing.assert_array_equal(b["tokens"], arrays["tokens"][rows, :k])
            np.testing.assert_array_equal(b["ranks"], arrays["ranks"][rows, :k])
            widths.append(k - ks[rows].min())
            seen.extend(rows.tolist())
        assert len(set(seen)) == len(seen) == batcher.steps_per_epoch * 16
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert np.mean(widths) < 1.0  # like-K batches: padding mostly gone (random: ~6 slots)


def test_a_reward_model_is_read_as_it_was_trained(tmp_path):
    """PPO, evaluation and best-of-n load the RM through check_reward_readout: a head trained
    to be averaged over the response is refused by a stage that reads the last token (and
    the reverse), naming the file and the field; imported models read the last token."""
    import json

    import pytest

    from instructrl.model import ModelConfig
    from instructrl.policy_io import check_reward_readout

    (tmp_path / "run_info.json").write_text(
        json.dumps({"config": {"model": {"reward_readout": "mean"}}})
    )
    check_reward_readout(ModelConfig(reward_readout="mean"), str(tmp_path))
    with pytest.raises(ValueError, match=r"run_info.json: model.reward_readout='mean'"):
        check_reward_readout(ModelConfig(), str(tmp_path))
    check_reward_readout(ModelConfig(), f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="reward_readout='last'"):
        check_reward_readout(ModelConfig(reward_readout="mean"), f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="model.reward_readout must be one of"):
        ModelConfig(reward_readout="max")
