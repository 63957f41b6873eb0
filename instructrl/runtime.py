"""Process-level settings of the host runtime, applied once by the command line, the benchmarks
and the tests (``configure``); a library user calls it the same way in their own program.

  host allocator   XLA:CPU allocates every step's buffers afresh (outputs and one scratch
                   buffer of all temporaries). glibc serves allocations over its mmap
                   threshold (32 MB at most) with a fresh mmap and unmaps them on free, so every
                   step faults in its scratch memory page by page: the default pipeline spent a
                   third of its CPU time in the kernel (141 million minor faults). With mmap
                   off for the heap and no trimming, freed memory stays in the process and the
                   next step reuses it (``mallopt``; a no-op off glibc).
  compile cache    XLA executables are cached on disk (``jax_compilation_cache_dir``), so a
                   rerun, a resumed run, another seed of the same shapes or the second RL stage
                   reuses compilations instead of recompiling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import jax

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "instructrl", "jax")


def tune_host_allocator() -> bool:
    """Keep freed heap memory for reuse instead of returning it to the OS (glibc); returns
    whether the settings took."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: a thread arena's heap holds at most 64 MB and mmaps anything larger afresh.
    ok = mallopt(M_ARENA_MAX, 1)
    ok &= mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not a fresh mmap per block
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never give the heap's top back
    ok &= mallopt(M_TOP_PAD, 64 << 20)  # grow the heap 64 MB at a time
    return bool(ok)


def use_compile_cache(directory: str | None) -> None:
    """Cache XLA executables under ``directory`` (None or "": off). JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` wins when it is set."""
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def fast_bfloat16_products() -> bool:
    """Whether the default backend multiplies bfloat16 matrices faster than float32 ones: an
    accelerator, or a CPU with AVX512-BF16 or AMX-BF16 instructions (Linux /proc/cpuinfo)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup_logging() -> None:
    """INFO lines of our own loggers on stderr, libraries' warnings only."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(levelname).1s %(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("absl", "orbax", "jax", "tensorstore", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux; elsewhere a no-op):
    a pipeline's stage process must not outlive a killed pipeline."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Drop JAX's compiled functions and give the heap's free memory back to the OS (glibc
    ``malloc_trim``): a long-lived process (a test worker) before it starts memory-hungry
    child processes."""
    import gc

    jax.clear_caches()
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def configure(compile_cache: str | None = DEFAULT_CACHE, keep_heap: bool = True) -> None:
    """Every process-level setting above (``keep_heap``: the host allocator's), and JAX's
    partitionable random keys."""
    if keep_heap:
        tune_host_allocator()
    use_compile_cache(compile_cache)
    jax.config.update("jax_threefry_partitionable", True)
