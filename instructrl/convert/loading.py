"""Build our param tree from a checkpoint's tensors, each leaf straight into its sharding.

A converter describes every parameter of one layer (or of the whole model) as a ``Source``: the
checkpoint tensors it comes from and a function from those tensors to our layout. ``load_into``
then fills an abstract param tree (ShapeDtypeStructs that carry shardings, scanned or unrolled
layers) with ``jax.make_array_from_callback``: each device's callback reads and converts only
the slice that device holds, so a large model never sits whole on one host or device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from flax import traverse_util

LAYER = re.compile(r"layers_(\d+)$")


class TensorReader(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Source:
    """One of our params from checkpoint tensors: ``fn(*tensors) -> array`` in our layout.

    ``names`` may hold ``{i}`` (the layer index); ``shapes`` are the shapes the checkpoint
    must have, checked before anything is read. ``inverse(ours, tensor) -> tensor`` is the way
    back (export), for one-tensor sources: it may fill only its part of ``tensor`` (fused).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    fn: Callable[..., np.ndarray]
    inverse: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def identity(x, *_):
    return x


def transpose(x, *_):
    return x.T


def const(value) -> Source:
    """A param that no tensor holds (e.g. a bias the checkpoint keeps in its config)."""
    return Source((), (), lambda: np.asarray(value))


def _layer_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """Our flat param path -> (key of its Source, layer index or None)."""
    match = LAYER.match(path[0])
    if match:
        return ("layers", *path[1:]), int(match.group(1))
    return path, None


def check_sources(
    sources: dict[tuple[str, ...], Source], reader: TensorReader, num_layers: int
) -> None:
    """Every tensor the sources name exists with the right shape; errors name the tensor."""
    present = set(reader.names())
    for key, source in sources.items():
        layers = range(num_layers) if key[0] == "layers" else [0]
        for name, shape in zip(source.names, source.shapes, strict=True):
            for i in layers:
                tensor = name.format(i=i)
                if tensor not in present:
                    raise KeyError(
                        f"tensor {tensor!r} (for parameter {'/'.join(key)}) "
                        "is not in the checkpoint"
                    )
                got = tuple(reader.shape(tensor))
                if got != tuple(shape):
                    raise ValueError(
                        f"tensor {tensor!r} has shape {got}, expected {tuple(shape)} "
                        f"(parameter {'/'.join(key)})"
                    )


def used_tensors(sources: dict[tuple[str, ...], Source], num_layers: int) -> set[str]:
    out = set()
    for key, source in sources.items():
        layers = range(num_layers) if key[0] == "layers" else [0]
        out.update(name.format(i=i) for name in source.names for i in layers)
    return out


def load_into(
    abstract: Any, sources: dict[tuple[str, ...], Source], reader: TensorReader
) -> dict[str, Any]:
    """Fill ``abstract`` (nested dict of ShapeDtypeStruct with .sharding) from ``reader``.

    Scanned trees (``layers`` stacked on axis 0) and unrolled ones (``layers_<i>``) both work;
    ``abstract`` may be a sub-tree of what the sources describe (e.g. a trunk without head).
    """
    flat = traverse_util.flatten_dict(abstract)
    out = {}
    for path, struct in flat.items():
        key, layer = _layer_key(path)
        if key not in sources:
            raise KeyError(f"no checkpoint tensor maps to parameter {'/'.join(path)}")
        out[path] = _make_leaf(struct, sources[key], reader, layer, scanned=key[0] == "layers")
    return traverse_util.unflatten_dict(out)


def _make_leaf(struct, source: Source, reader: TensorReader, layer, scanned: bool):
    sharding = getattr(struct, "sharding", None) or jax.sharding.SingleDeviceSharding(
        jax.devices()[0]
    )
    dtype = np.dtype(struct.dtype)
    done: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same index

    def one_layer(i):
        tensors = [reader.read(name.format(i=i)) for name in source.names]
        return source.fn(*tensors)

    def callback(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in done:
            if scanned and layer is None:
                rows = range(struct.shape[0])[index[0]]
                parts = [np.asarray(one_layer(i)[index[1:]], dtype) for i in rows]
                done[key] = np.stack(parts) if parts else np.zeros((0,), dtype)
            else:
                value = np.asarray(one_layer(layer or 0), dtype)
                if value.shape != tuple(struct.shape):
                    raise ValueError(f"converted shape {value.shape} != param {struct.shape}")
                done[key] = np.ascontiguousarray(value[index])
        return done[key]

    return jax.make_array_from_callback(tuple(struct.shape), sharding, callback)
