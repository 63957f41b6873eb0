"""``instructrl compile``: a stage's real jitted steps compiled for a TPU topology on this CPU host
(libtpu's compiler, no TPU), with per-device memory and cost that agree with the shardings."""

import importlib.util

import pytest

from instructrl import aot, config_lib, sharding

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install jax[tpu])"
)


@pytest.fixture(scope="module")
def ppo_report():
    config = config_lib.load_config("configs/ppo.py:ptx").unlock()
    config_lib.apply_overrides(config, [("ppo.batch_size", "8"), ("ppo.max_new_tokens", "8"),
                                        ("data.max_prompt_len", "16"), ("ptx.multiplier", "2"),
                                        ("ptx.seq_len", "32"), ("mesh.data", "2"),
                                        ("mesh.fsdp", "2")])  # fmt: skip
    return aot.compile_stage(config.lock(), "v5e:2x2")


def test_ppo_compiles_every_phase_and_fits(ppo_report):
    r = ppo_report
    names = [s["name"] for s in r["steps"]]
    assert names == ["generate", "prefill", "decode_step", "score", "advantages", "update"]
    assert r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert r["fits"] and not r["refused"]
    assert "fits" in aot.format_report(r) and "does not fit" not in aot.format_report(r)
    steps = {s["name"]: s for s in r["steps"]}
    # The update donates the state: its output aliases it, and it reads the whole state.
    assert steps["update"]["alias_bytes"] > 0
    assert steps["update"]["argument_bytes"] >= r["resident_bytes"]["state"]
    assert steps["update"]["calls"] == 4 and steps["decode_step"]["calls"] == 8
    for name in ("prefill", "decode_step", "score", "update"):
        assert steps[name]["flops"] > 0 and steps[name]["bytes_accessed"] > 0
    assert r["peak_live_bytes"] >= r["resident_bytes"]["state"] + r["resident_bytes"]["frozen"]


def test_resident_bytes_follow_the_mesh():
    """fsdp shards the state: its per-device bytes fall 4x from a replicated mesh."""
    config = config_lib.load_config("configs/sft.py").unlock()
    config_lib.apply_overrides(config, [("mesh.data", "1"), ("mesh.fsdp", "4")])
    fsdp = aot.compile_stage(config.lock(), "v5e:2x2")
    config = config_lib.load_config("configs/sft.py").unlock()
    config_lib.apply_overrides(config, [("mesh.data", "4")])
    data = aot.compile_stage(config.lock(), "v5e:2x2")
    ratio = data["resident_bytes"]["state"] / fsdp["resident_bytes"]["state"]
    assert 3.0 < ratio <= 4.0, ratio
    # The train step's arguments are the state and the batch, per device.
    step = fsdp["steps"][0]
    assert step["argument_bytes"] >= fsdp["resident_bytes"]["state"]
    assert step["alias_bytes"] > 0 and step["flops"] > 0


def test_shard_bytes_counts_one_device():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=rows)
    assert sharding.shard_bytes(x) == 16 * 4


def test_bad_topology_is_a_config_error():
    with pytest.raises(config_lib.ConfigError, match="topology"):
        aot.topology_devices("v9z:1x1")
