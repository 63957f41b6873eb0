"""Tests run on the host CPU with 8 simulated devices (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pytest  # noqa: E402

from instructrl import runtime  # noqa: E402

# The partitionable keys of the command line; XLA executables are cached only when
# JAX_COMPILATION_CACHE_DIR is set (make test sets it), so that stage subprocesses and later
# tests reuse what earlier ones compiled. A worker runs many tests and keeps the heap's
# default trimming (not the command line's keep-everything), so that what it frees goes back
# to the OS for the multi-process tests' children.
runtime.configure(compile_cache=None, keep_heap=False)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


# Modules that share a session fixture go to one pytest-xdist worker, so that it is computed
# once: ``--dist loadfile`` with each group's files as one scope. The session's pipeline run
# (``pipeline_run``) and the toy task's SFT and RM (``toy``).
SHARED_SCOPES = {
    "tests/test_pipeline.py": "pipeline",
    "tests/test_multihost.py": "pipeline",
    "tests/test_ppo.py": "toy",
    "tests/test_methods.py": "toy",
    "tests/test_examples.py": "toy",
}


def pytest_collection_modifyitems(config, items):
    """The multi-host tests run after the rest of the pipeline scope: their fixture drops the
    worker's compiled functions (room for its two child processes), which the experiments'
    --tiny runs in tests/test_pipeline.py reuse from the session pipeline."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_multihost.py"))


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            return SHARED_SCOPES.get(scope, scope)

    return Scheduling(config, log)


@pytest.fixture
def shared_data():
    """Path of ../shared/data; tests that need it skip cleanly when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# The pipeline the integration tests share (tests/test_pipeline.py, tests/test_multihost.py):
# configs/pipeline.py:runlocal with these fields, run once per session in this process.
PIPELINE_OVERRIDES = {
    # Checkpoints often enough to be killed between them (their schedule changes no number).
    "pretrain.checkpoint.every_steps": 10,
    "sft.checkpoint.every_steps": 4,
    "rm.checkpoint.every_steps": 5,
    "rl.checkpoint.every_steps": 1,
    # float32 products, so that one process and two agree to float32 rounding: bfloat16
    # products on an AVX512-BF16 CPU sum in an order that depends on the threads per device.
    "model.matmul_dtype": "float32",
    # Enough iterations that a preemption sync point of two processes falls before the end.
    "rl.ppo.iterations": 4,
}


def pipeline_flags(overrides=PIPELINE_OVERRIDES) -> list[str]:
    """The command-line form of ``overrides`` (``instructrl pipeline ... FLAGS``)."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def pipeline_config():
    from instructrl import config_lib

    c = config_lib.load_config("pipeline:runlocal").unlock()
    config_lib.apply_overrides(c, [(k, str(v)) for k, v in PIPELINE_OVERRIDES.items()])
    return c.lock()


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """(config, workdir, DONE times of the first five stages, timings of the second call):
    the shared pipeline, run in two calls: the first stops after the reward model, the
    second resumes with the stages that had not run."""
    from instructrl import pipeline

    config = pipeline_config()
    workdir = str(tmp_path_factory.mktemp("pipeline") / "run")
    partial = config.copy_and_resolve_references()
    partial.stages = list(pipeline.STAGE_NAMES[:5])
    first = pipeline.run(partial, workdir)
    assert set(first) == set(pipeline.STAGE_NAMES[:5])
    stamps = {s: os.path.getmtime(os.path.join(workdir, s, "DONE")) for s in first}
    second = pipeline.run(config, workdir)
    return config, workdir, stamps, second


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """(root, ppo_config) of the toy task (tests/toy_task.py): its SFT and RM, trained once."""
    import toy_task

    root = tmp_path_factory.mktemp("toy")
    return root, toy_task.build(root)
