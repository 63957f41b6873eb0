"""Stopping a run on SIGTERM with a checkpoint every process agrees on.

A spot or preemptible VM is warned before it goes (GCE sends SIGTERM about 30 s ahead; TPU
maintenance events too; SkyPilot's managed jobs then relaunch the task, which resumes from its
workdir). ``Run.fit`` asks ``Preemption.reached(step)`` after every step; once it says yes the
loop saves a checkpoint of that step and raises ``Preempted``, which exits the process with
status 143 (128 + SIGTERM: "terminated", so a launcher restarts rather than marks it done).

  one process    a SIGTERM handler sets a flag; the loop stops after the step in flight.
  many hosts     ``jax.distributed``'s preemption service (on by default) catches SIGTERM on
                 any host, and ``multihost_utils.reached_preemption_sync_point`` answers yes
                 on every host at the same step (the largest step any host had reached, plus
                 one), so every host saves the same checkpoint.

A pipeline running stages in child processes forwards SIGTERM to them (``forward_to``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is on disk; exits with ``EXIT_CODE``."""

    def __init__(self, step: int | None = None):
        super().__init__(EXIT_CODE)
        self.step = step


def _sync_service() -> bool:
    """True when jax.distributed's preemption service is running (multi-host runs)."""
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class Preemption:
    """Context manager: while open, SIGTERM asks the run to stop (see the module docstring)."""

    def __init__(self):
        self.requested = False
        self.synced = jax.process_count() > 1 and _sync_service()
        self._previous = None

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def __enter__(self) -> Preemption:
        if not self.synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (call it after every step, on every host)."""
        if self.synced:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested


@contextlib.contextmanager
def forward_to(processes):
    """While open, a SIGTERM to this process is passed on to each live child process (they
    save and exit with ``EXIT_CODE``; the caller waits for them as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        for proc in list(processes):
            if proc.is_alive():
                proc.terminate()  # SIGTERM

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
