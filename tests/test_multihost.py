"""Two local processes (4 CPU devices each, jax.distributed) train like one 8-device process,
and a SIGTERM on one of them (preemption) stops both at one checkpoint they resume from."""

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


STEPS = "6"
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process with all 8 devices."""
    workdir = str(tmp_path_factory.mktemp("mh") / "single")
    subprocess.run(
        [sys.executable, HELPER, "0", "1", "0", workdir, STEPS],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return workdir


def _two_processes(workdir, env=ENV, expect=0):
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, HELPER, str(i), "2", port, workdir, STEPS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != expect:
            if "gloo" in out.lower() and "not" in out.lower() and "support" in out.lower():
                pytest.skip("this jaxlib has no CPU cross-process collectives")
            raise AssertionError(f"exit {p.returncode}, expected {expect}\n{out[-3000:]}")


def test_two_processes_match_one_process(single, tmp_path):
    multi = str(tmp_path / "multi")
    _two_processes(multi)
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == [STEPS]


def test_sigterm_on_one_host_saves_one_step_on_both_and_resumes(single, tmp_path):
    """Preemption on many hosts: process 0 gets SIGTERM after step 2; jax.distributed's
    preemption service tells process 1, both save the same step (the sync point: the furthest
    step any host had reached, plus one) and exit with status 143; relaunched, both resume
    there and end as the 1-process run."""
    from instructrl.preemption import EXIT_CODE
    from instructrl.train import SIGTERM_ENV

    multi = str(tmp_path / "multi")
    _two_processes(multi, env={**ENV, SIGTERM_ENV: "multi:2"}, expect=EXIT_CODE)
    saved = sorted(int(s) for s in os.listdir(os.path.join(multi, "checkpoints")) if s.isdigit())
    assert len(saved) == 1 and 2 <= saved[0] < int(STEPS), saved
    _two_processes(multi, env={**ENV, SIGTERM_ENV: "multi:2"})
    with open(os.path.join(multi, "run_info.json")) as f:
        assert json.load(f)["resumed_from"] == saved[0]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
