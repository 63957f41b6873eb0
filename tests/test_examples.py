"""The examples (examples/*.py: PPO and a reward model written by hand from the library's pure
functions) on the toy task, whose preference is known (more 'a' is better): each learns it."""

import importlib.util
import os

import numpy as np
from conftest import ROOT


def _example(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_ppo_loop_raises_the_reward_from_sft(toy):
    root, _ = toy
    result = _example("ppo_loop").main([
        "--sft", str(root / "sft"), "--rm", str(root / "rm"),
        "--prompts", str(root / "prompts.jsonl"),
        "--iterations", "8", "--batch", "16", "--max_new_tokens", "16", "--lr", "3e-4",
    ])  # fmt: skip
    history = result["history"]
    assert abs(history[0]["kl_to_sft"]) < 1e-4  # the first rollout is the SFT policy's own
    assert history[-1]["kl_to_sft"] > 0
    # Held-out prompts, sampled with the same keys before and after: the RM score rose.
    assert result["held_out_rm_score"] > result["held_out_rm_score_before"], result


def test_example_rm_loop_learns_the_rankings(toy):
    root, _ = toy
    result = _example("rm_loop").main([
        "--init", str(root / "sft"), "--rankings", str(root / "rankings_train.jsonl"),
        "--valid", str(root / "rankings_valid.jsonl"),
        "--limit", "96", "--epochs", "2", "--lr", "1e-3", "--seq_len", "32",
    ])  # fmt: skip
    losses = [row["loss"] for row in result["log"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # It learns the preference, not just its training rankings: held-out pairs too.
    assert result["train_accuracy"] > result["train_accuracy_before"] + 0.1, result
    assert result["valid_accuracy"] > max(result["valid_accuracy_before"] + 0.1, 0.7), result
