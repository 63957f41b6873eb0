"""SFT / pretraining stage: learning, checkpoints, resume, and a SIGKILL round trip."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from instructrl import sft
from instructrl.data import lm as lm_data
from instructrl.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def _config(steps=40, **train):
    import sft as sft_config  # configs/sft.py

    c = sft_config.get_config("runlocal").unlock()
    c.train.steps = steps
    c.train.progress = False
    c.train.log_every = 5
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.checkpoint.every_steps = 10
    c.checkpoint.async_save = True
    c.evals.heldout.every_steps = 20
    del c.evals["samples"]
    for k, v in train.items():
        c.train[k] = v
    return c


def _metrics(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_sft_learns_checkpoints_and_resumes(tmp_path):
    workdir = str(tmp_path / "sft")
    state = sft.run(_config(steps=40), workdir)
    losses = [v for _, v in _metrics(workdir, "sft/loss")]
    assert losses[-1] < losses[0] - 0.5, losses
    evals = [v for _, v in _metrics(workdir, "eval/loss")]
    assert evals[-1] < evals[0]
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 40 and len(steps) == 2  # keep=2
    assert os.path.exists(os.path.join(workdir, "best", "best.json"))
    # Rerunning with a longer schedule continues from step 40 (no step is logged twice).
    state2 = sft.run(_config(steps=50), workdir)
    logged = [s for s, _ in _metrics(workdir, "sft/loss")]
    assert logged == sorted(set(logged)) and logged[-1] == 50
    assert int(state.step) == 40 and int(state2.step) == 50


def test_loss_is_on_response_tokens_only():
    tok = ByteTokenizer()
    arrays, skipped = lm_data.demonstration_arrays(
        tok, [{"prompt": "ab", "response": "xyz"}], seq_len=12, template="{prompt}|"
    )
    assert skipped == 0
    row_targets, row_mask = arrays["targets"][0], arrays["loss_mask"][0]
    # tokens: a b | x y z EOS ; targets are shifted by one: b | x y z EOS pad...
    assert [int(t) for t, m in zip(row_targets, row_mask, strict=True) if m] == list(b"xyz") + [
        tok.eos_id
    ]
    with pytest.raises(lm_data.DataError, match="response"):
        lm_data.demonstration_arrays(tok, [{"prompt": "p", "response": "x" * 40}], seq_len=12)


def _final_params(workdir):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore())
    mngr.close()
    return step, restored["params"]


def _cli(workdir, steps):
    return [
        sys.executable,
        "-m",
        "instructrl.main",
        "--config",
        os.path.join(ROOT, "configs", "sft.py") + ":runlocal",
        "--workdir",
        workdir,
        f"--config.train.steps={steps}",
        "--config.checkpoint.every_steps=5",
        "--config.train.progress=False",
        "--config.evals.samples.every_steps=0",
        "--config.evals.heldout.every_steps=1000",
    ]


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    steps = 40
    straight = str(tmp_path / "straight")
    subprocess.run(_cli(straight, steps), check=True, env=env, capture_output=True)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(
        _cli(killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt_dir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.isdir(ckpt_dir) and any(
            d.isdigit() and int(d) >= 10 for d in os.listdir(ckpt_dir)
        ):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert interrupted_at < steps, "the run finished before it could be killed"
    subprocess.run(_cli(killed, steps), check=True, env=env, capture_output=True)

    step_a, params_a = _final_params(straight)
    step_b, params_b = _final_params(killed)
    assert step_a == step_b == steps
    flat_a = {str(k): v for k, v in _flatten(params_a)}
    flat_b = {str(k): v for k, v in _flatten(params_b)}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, k))
    else:
        yield prefix, np.asarray(tree)
