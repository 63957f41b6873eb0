"""Two local processes (4 CPU devices each, jax.distributed) train like one 8-device process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "multihost_sft.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["sft/loss"] for r in map(json.loads, f) if "sft/loss" in r]


def test_two_processes_match_one_process(tmp_path):
    steps = "4"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = str(tmp_path / "single")
    subprocess.run(
        [sys.executable, HELPER, "0", "1", "0", single, steps],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    multi = str(tmp_path / "multi")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, HELPER, str(i), "2", port, multi, steps],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            if "gloo" in out.lower() and "not" in out.lower() and "support" in out.lower():
                pytest.skip("this jaxlib has no CPU cross-process collectives")
            raise AssertionError(out[-3000:])
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == [steps]
