"""Metrics to JSONL and TensorBoard, loud NaN/Inf failures, stage timers and a progress line."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import resource
import sys
import time
from typing import Any

import numpy as np

from instructrl import fs

try:  # TensorBoard events are optional: metrics.jsonl is always written
    from tensorboardX import SummaryWriter
except ImportError:
    SummaryWriter = None


class NonFiniteError(FloatingPointError):
    pass


def check_finite(metrics: dict[str, float], step: int) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        shown = {k: metrics[k] for k in bad}
        raise NonFiniteError(f"step {step}: non-finite metrics {shown}; stopping the run")


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


class MetricWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to workdir/metrics.jsonl and, when
    tensorboardX is installed, writes the same scalars as TensorBoard events. Only process 0
    writes."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        fs.makedirs(workdir)
        self._path = os.path.join(workdir, "metrics.jsonl")
        local = not fs.is_remote(workdir)  # TensorBoard's writer takes local directories only
        self._tb = SummaryWriter(os.path.join(workdir, "tb")) if SummaryWriter and local else None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        fs.append(self._path, json.dumps({"step": int(step), **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drop the rows of a JSONL log whose "step" is beyond ``max_step`` (a resumed run logs
    them again); atomic, a no-op when nothing is dropped."""
    if not fs.exists(path):
        return
    lines = fs.read_text(path).splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= max_step]
    if len(kept) != len([line for line in lines if line.strip()]):
        fs.write_atomic(path, "".join(kept))


class Timers:
    """Seconds spent per named part of a run (compile, host data, device step, evaluation,
    checkpointing, logging, and a stage's own phases), accumulated."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    @contextlib.contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def as_dict(self) -> dict[str, float]:
        """The parts' seconds, plus ``total`` (since creation) and ``minor_page_faults`` (of the
        process since creation: memory the allocator had to fault in afresh)."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(time.perf_counter() - self._t0, 3)
        out["minor_page_faults"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults0
        )
        return out


class Progress:
    """One live line per stage: ``[label] step s/n (p%) loss ... ETA h:mm:ss``.

    On a terminal the line is redrawn in place at most every ``interval`` seconds; redirected to
    a file, a full line is printed at every tenth of the run (and at the end), so a log reads
    as a short table.
    """

    def __init__(self, label: str, total: int, start: int = 0, enabled: bool = True,
                 interval: float = 0.5, stream=None):  # fmt: skip
        self.label, self.total, self.start = label, max(int(total), 1), int(start)
        self.enabled = enabled and total > start
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.t0 = time.perf_counter()
        self.values: dict[str, float] = {}
        self.step = self.start
        self._last_draw = 0.0
        self._next_line = self.start
        self._drawn = False
        self._first = None  # (step, time) of the first update

    def show(self, values: dict[str, float]) -> None:
        self.values = dict(values)

    def line(self) -> str:
        done, total = self.step, self.total
        parts = [f"[{self.label}] step {done}/{total} ({100 * done // total}%)"]
        parts += [f"{k} {v:.4f}" for k, v in self.values.items()]
        now = time.perf_counter()
        elapsed = now - self.t0
        if self._first is not None and done > self._first[0]:  # the rate after the first step
            rate = (now - self._first[1]) / (done - self._first[0])  # (its compile is behind)
            parts.append(f"ETA {datetime.timedelta(seconds=round(rate * (total - done)))}")
        parts.append(f"elapsed {datetime.timedelta(seconds=round(elapsed))}")
        return "  ".join(parts)

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        self.step = int(step)
        now = time.perf_counter()
        if self._first is None:
            self._first = (self.step, now)
        if self.tty:
            if now - self._last_draw >= self.interval or self.step == self.total:
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                self._last_draw, self._drawn = now, True
        elif self.step >= self._next_line or self.step == self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._next_line = self.step + max(self.total // 10, 1)

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False
