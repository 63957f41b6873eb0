"""Device mesh, logical-axis rules and sharded construction of arrays.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded, ZeRO-3 style) and ``tensor`` (Megatron-style head/MLP/vocab split).
Every parameter and key activation is named with logical axes in ``instructrl.model``; the one
table below maps those names to mesh axes. Batches are split over (data, fsdp).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes). Names not listed are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor); one size may be -1 to take the remaining devices.

    Uses ``mesh_utils.create_device_mesh`` so that on TPU the axes follow the interconnect.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(shape)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(shape)} does not divide {len(devices)} devices")
        sizes[unknown[0]] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} "
            f"devices, but {len(devices)} are available"
        )
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalize a config's rules (lists from ml_collections) into Flax's tuple form."""
    if rules is None:
        return LOGICAL_RULES
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may be Flax ``LogicallyPartitioned`` boxes."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry shardings: the target orbax restores into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
    """(shardings, abstract value with shardings) of ``init_fn(*args)``, computing nothing:
    what ``create_sharded`` builds into, and what ahead-of-time compilation lowers against.
    ``init_fn`` may return Flax boxes; they give the shardings."""
    boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(boxed, mesh, rules)
    return shardings, abstract_with_shardings(nn.unbox(boxed), shardings)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any, Any]:
    """Build ``init_fn(*args)`` directly into its sharding; nothing is materialized whole.

    ``init_fn`` may return Flax boxes; they give the shardings and are unboxed in the result.
    Returns (value, shardings, abstract value with shardings).
    """
    shardings, abstract = abstract_sharded(init_fn, mesh, rules, *args)
    value = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return value, shardings, abstract


def shard_bytes(abstract: Any) -> int:
    """Bytes of ``abstract`` (arrays or ShapeDtypeStructs with shardings) held by one device:
    the largest shard of each leaf (leaves without a sharding count whole)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        itemsize = getattr(leaf.dtype, "itemsize", None) or 8  # PRNG keys: their key data
        total += int(np.prod(shape, dtype=np.int64)) * int(itemsize)
    return total


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over (data, fsdp); other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: the size of the mesh's batch axes."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def host_batch_slice(global_batch_size: int) -> slice:
    """The rows of the global batch that this process feeds (multi-host data loading)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} not divisible by {count} hosts")
    per_host = global_batch_size // count
    return slice(index * per_host, (index + 1) * per_host)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Turn this host's rows of a global batch into global arrays sharded over (data, fsdp).

    ``batch`` (a possibly nested dict of arrays) holds this process's slice (rows
    ``host_batch_slice``); on one host that is the whole batch.
    """

    def put(value):
        value = np.asarray(value)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)

    return jax.tree.map(put, dict(batch))


def put_global(tree: Any, mesh: Mesh, specs: Any = None) -> Any:
    """Global arrays from host arrays that every process holds whole (evaluation data,
    a rollout every host gathered): each process places only its own devices' slices, so on
    many hosts each one computes on its share of the rows. ``specs``: a tree of
    PartitionSpecs like ``tree`` (default: every leaf's rows over the batch axes)."""

    def put(value, spec):
        value = np.asarray(value)
        target = batch_sharding(mesh, value.ndim) if spec is None else NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    leaves, treedef = jax.tree.flatten(tree)
    if specs is None:
        spec_leaves = [None] * len(leaves)
    else:
        spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return treedef.unflatten([put(v, s) for v, s in zip(leaves, spec_leaves, strict=True)])


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly global) arrays, whole on every process: one process reads
    its devices; many gather the shards the others hold (``process_allgather``)."""
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
