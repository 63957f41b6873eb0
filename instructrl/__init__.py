"""instructrl: InstructGPT (SFT -> reward model -> PPO-ptx) in JAX/Flax.

One thing happens at import, before JAX is imported: where ``libtpu`` is installed (for
``instructrl compile``, which compiles for TPU topologies on any host) but the host has no TPU
and ``JAX_PLATFORMS`` is unset, JAX would probe for a TPU at start-up and print a page of libtpu
errors before falling back to the CPU. There ``JAX_PLATFORMS`` defaults to "cuda,cpu" (the
backends JAX would have chosen anyway); a TPU VM, or any explicit ``JAX_PLATFORMS``, is left
alone. Compiling for a TPU topology does not need the TPU backend.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id


def _has_tpu() -> bool:
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _skip_tpu_probe() -> None:
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    if importlib.util.find_spec("libtpu") is not None and not _has_tpu():
        os.environ["JAX_PLATFORMS"] = "cuda,cpu"


_skip_tpu_probe()
