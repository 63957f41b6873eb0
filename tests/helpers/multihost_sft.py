"""One process of a simulated multi-host SFT run (used by tests/test_multihost.py).

argv: process_id num_processes port workdir steps
Each process owns 8 / num_processes CPU devices; together they form one (2, 2, 2) mesh.
"""

import os
import sys

pid, nproc, port, workdir, steps = sys.argv[1:6]
pid, nproc = int(pid), int(nproc)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_threefry_partitionable", True)
if nproc > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
assert jax.device_count() == 8, jax.devices()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
import sft as sft_config  # noqa: E402

from instructrl import sft  # noqa: E402

c = sft_config.get_config("runlocal").unlock()
c.mesh = dict(data=2, fsdp=2, tensor=2)
c.train.steps = int(steps)
c.train.progress = False
c.train.log_every = 1
c.checkpoint.every_steps = int(steps)
c.model.dropout = 0.0
del c.evals["samples"]
c.evals.heldout.every_steps = int(steps)
sft.run(c, workdir)
print("process", pid, "done")
