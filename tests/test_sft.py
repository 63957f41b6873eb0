"""SFT / pretraining stage: learning, checkpoints, resume, and a SIGKILL round trip."""

import glob
import json
import os
import subprocess
import sys

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


def _flip_half_of_the_largest_data_file(checkpoint_dir):
    data_files = glob.glob(os.path.join(checkpoint_dir, "**", "d", "*"), recursive=True)
    path = max(data_files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[: len(data) // 2] = bytes(b ^ 0xFF for b in data[: len(data) // 2])
    open(path, "wb").write(bytes(data))


def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(tmp_path, caplog):
    workdir = str(tmp_path / "sft")
    sft.run(_config(steps=20), workdir)  # checkpoints 10 and 20
    bad = os.path.join(workdir, "checkpoints", "20")
    _flip_half_of_the_largest_data_file(bad)
    with caplog.at_level("WARNING"):
        state = sft.run(_config(steps=30), workdir)
    assert int(state.step) == 30
    assert any(
        bad in r.getMessage() and "does not restore" in r.getMessage() for r in caplog.records
    )
    with open(os.path.join(workdir, "run_info.json")) as f:
        assert json.load(f)["resumed_from"] == 10
    assert os.listdir(os.path.join(workdir, "checkpoints.corrupt")) == ["20"]  # kept, aside
    # When no checkpoint restores, the command line says so in one line and writes nothing.
    for step in ("20", "30"):
        _flip_half_of_the_largest_data_file(os.path.join(workdir, "checkpoints", step))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "instructrl.main", "--config",
           os.path.join(ROOT, "configs", "sft.py") + ":runlocal", "--workdir", workdir,
           "--config.train.steps=40", "--config.checkpoint.every_steps=10"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("instructrl: error: no checkpoint restores: ") and "/30 (" in last
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "30"]
