"""Tests run on the host CPU with 8 simulated devices (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pytest  # noqa: E402

from instructrl import runtime  # noqa: E402

# The allocator setting and partitionable keys of the command line; XLA executables are cached
# only when JAX_COMPILATION_CACHE_DIR is set (make test sets it), so that stage subprocesses
# and later tests reuse what earlier ones compiled.
runtime.configure(compile_cache=None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data; tests that need it skip cleanly when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
