"""Metrics to JSONL and TensorBoard, a progress bar with tokens/s, and loud NaN/Inf failures."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np


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
        self._file = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:
            self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": int(step), **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens per second between calls."""

    def __init__(self):
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        return rate
