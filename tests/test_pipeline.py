"""The pipeline: stages hand off through init_from; finished stages are not recomputed."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp

from instructrl import pipeline


def _params(stage_dir):
    mngr = ocp.CheckpointManager(os.path.join(stage_dir, "checkpoints"))
    out = mngr.restore(mngr.latest_step(), args=ocp.args.PyTreeRestore())["params"]
    mngr.close()
    return out


def test_pipeline_runlocal_hands_off_and_skips_finished_stages(tmp_path):
    config = pipeline.default_config("runlocal").unlock()
    for stage in ("pretrain", "sft"):
        config[stage].train.progress = False
        del config[stage].evals["samples"]
    config.pretrain.train.steps = 30
    config.sft.train.steps = 6
    config.sft.optimizer.lr = 1e-4
    workdir = str(tmp_path / "run")
    summary = pipeline.run(config, workdir)
    assert summary["pretrain"]["pretrain/loss"] < 4.0
    assert os.path.exists(os.path.join(workdir, "sft", "DONE"))
    # SFT started from the pretrained params: after 6 small steps it is still close to them.
    base, tuned = _params(os.path.join(workdir, "pretrain")), _params(os.path.join(workdir, "sft"))
    emb_base = np.asarray(base["embed"]["embedding"])
    emb_tuned = np.asarray(tuned["embed"]["embedding"])
    assert np.abs(emb_tuned - emb_base).max() < 0.05 * np.abs(emb_base).max()
    with open(os.path.join(workdir, "sft", "run_info.json")) as f:
        assert json.load(f)["config"]["init_from"].endswith("pretrain")
    before = os.path.getmtime(os.path.join(workdir, "sft", "metrics.jsonl"))
    again = pipeline.run(config, workdir)
    assert again == summary
    assert os.path.getmtime(os.path.join(workdir, "sft", "metrics.jsonl")) == before
