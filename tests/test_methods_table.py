"""experiments/run.py methods --tiny: every method from one tiny world's SFT, rankings and RM,
in one table (its own world: the session pipeline's worker is the suite's longest)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_methods_table_has_every_method_with_its_cost(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import run as experiments_run

    path = experiments_run.main(["methods", "--workdir", str(tmp_path), "--tiny"])
    results = json.load(open(path.replace(".md", ".json")))
    rows = {r["method"]: r for r in results["rows"]}
    trained = ["ppo", "ppo_ptx", "rloo", "grpo", "dpo_pairwise", "dpo_listwise"]
    assert list(rows) == ["sft", *trained, "best_of_4"]
    for name in trained:
        assert 0 <= rows[name]["win_rate_vs_sft"]["mean"] <= 1
        assert rows[name]["train_seconds"] > 0 and rows[name]["samples_per_answer"] == 1
    # Each method is its own policy: its answers differ from SFT's (a KL above zero).
    assert all(rows[name]["kl_to_sft"] != 0 for name in trained)
    # Best-of-n: n answers per prompt, the closed-form KL, SFT's own weights.
    curve = results["best_of_n"]
    assert [c["n"] for c in curve] == [1, 2, 4] and curve[0]["kl_to_sft"] == 0.0
    assert rows["best_of_4"]["samples_per_answer"] == 4
    assert rows["best_of_4"]["pretrain_loss"] == rows["sft"]["pretrain_loss"]
    # The kept answer's RM score cannot fall as n grows (the first n draws are nested).
    assert curve[0]["rm_score"] <= curve[1]["rm_score"] <= curve[2]["rm_score"]
    table = open(path).read()
    assert "| rloo |" in table and "Best-of-n" in table
