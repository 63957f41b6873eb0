"""SkyPilot task YAMLs (scripts/sky): SkyPilot's own loader accepts them, with the resources,
envs and bucket mount they say, and every node's `run` script issues an instructrl command
line that the CLI parses, with jax.distributed set up for that node."""

import json
import os
import shlex
import stat
import subprocess

import pytest

from instructrl.main import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKY_PYTHON = os.environ.get("INSTRUCTRL_SKY_PYTHON", os.path.join(ROOT, ".venv-sky/bin/python"))


def _load(name, *overrides):
    if not os.path.exists(SKY_PYTHON):
        pytest.skip(f"no SkyPilot environment at {SKY_PYTHON} (make test builds it)")
    out = subprocess.run(
        [SKY_PYTHON, os.path.join(ROOT, "tests", "sky_task.py"),
         os.path.join(ROOT, "scripts", "sky", name), *overrides],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _node_commands(task, tmp_path, ips):
    """Each node's instructrl argv: `run` under bash with the task's envs and SkyPilot's node
    variables, the venv's python replaced by one that prints its arguments."""
    home = tmp_path / "home"
    python = home / "irl-venv" / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    argvs = []
    for rank in range(len(ips)):
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **task["envs"],
               "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "\n".join(ips),
               "SKYPILOT_NUM_NODES": str(len(ips))}  # fmt: skip
        out = subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        argvs.append(out.stdout.splitlines())
    return argvs


def test_tpu_slice_task(tmp_path):
    task = _load("tpu_slice.yaml", "BUCKET=my-bucket", "RUN=ppo-1.3b", "COMMAND=train",
                 "CONFIG=configs/ppo.py:model=gpt3-1.3b")  # fmt: skip
    assert task["num_nodes"] == 1 and task["cloud"] == "GCP"
    assert task["accelerators"] == {"tpu-v5litepod-16": 1}
    assert task["accelerator_args"]["runtime_version"].startswith("v2-alpha-tpuv5")
    assert task["storage"] == {"/runs": {"name": "my-bucket", "mode": "MOUNT"}}
    assert "jax[tpu]" in task["setup"]
    (argv,) = _node_commands(task, tmp_path, ["10.0.0.1"])
    assert argv[:2] == ["-m", "instructrl.main"]
    command, flags, overrides = parse(argv[2:])
    assert command == "train" and flags.config == "configs/ppo.py:model=gpt3-1.3b"
    assert flags.workdir == "/runs/ppo-1.3b" and flags.jax_distributed
    assert flags.coordinator_address is None  # TPU VMs find their peers
    assert overrides == []


def test_gpu_cluster_task(tmp_path):
    task = _load("gpu_cluster.yaml", "OVERRIDES=--config.rl.ppo.iterations=5")
    assert task["num_nodes"] == 2 and task["accelerators"] == {"H100": 8}
    assert task["storage"]["/runs"]["name"] == "instructrl-runs"
    assert ".[gpu]" in task["setup"]
    ips = ["10.0.0.7", "10.0.0.9"]
    for rank, argv in enumerate(_node_commands(task, tmp_path, ips)):
        command, flags, overrides = parse(argv[2:])
        assert command == "pipeline" and flags.workdir == "/runs/main"
        assert flags.jax_distributed and flags.coordinator_address == "10.0.0.7:8476"
        assert (flags.num_processes, flags.process_id) == (2, rank)
        assert overrides == [("rl.ppo.iterations", "5")], shlex.join(argv)
