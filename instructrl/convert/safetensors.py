"""A small reader and writer of the safetensors format, with no torch and no copies.

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes, offsets relative to the end of the header. The reader
memory-maps each file, so ``read(name)[index]`` touches only the bytes of that slice: a model
shard is read straight into the device that holds it.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsReader:
    """Every tensor of the ``*.safetensors`` files of a directory (sharded or not)."""

    def __init__(self, directory: str):
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{directory!r} holds no *.safetensors file")
        self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for path in files:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has unsupported {entry['dtype']}")
                begin = 8 + length + entry["data_offsets"][0]
                self._entries[name] = (path, DTYPES[entry["dtype"]], tuple(entry["shape"]), begin)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def read(self, name: str) -> np.ndarray:
        """A lazy (memory-mapped) view of the tensor."""
        path, dtype, shape, begin = self._entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        flat = self._maps[path][begin : begin + count * dtype.itemsize].view(dtype)
        return flat.reshape(shape)


def save_file(
    path: str,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write (name, shape, dtype, make_array) entries; each array is made (fetched from the
    devices) only when its bytes are written, so at most one tensor is on the host at a time."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in tensors:
            array = np.ascontiguousarray(make(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: made shape {array.shape}, declared {shape}")
            f.write(array.tobytes())
