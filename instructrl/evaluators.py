"""A small registry of evaluators: ``config.evals.<name> = dict(type=..., every_steps=...)``.

An evaluator is built once per run with the stage's context and exposes ``run(state) -> dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        return cls

    return wrap


def build(evals_config, context: dict[str, Any]) -> dict[str, tuple[Any, int]]:
    """{name: (evaluator, every_steps)} from the config's ``evals`` section."""
    out = {}
    for name, cfg in (evals_config or {}).items():
        kind = cfg["type"]
        if kind not in REGISTRY:
            raise KeyError(f"evals.{name}.type={kind!r} is unknown; known: {sorted(REGISTRY)}")
        options = {k: v for k, v in dict(cfg).items() if k not in ("type", "every_steps")}
        out[name] = (REGISTRY[kind](context, **options), int(cfg.get("every_steps", 0)))
    return out
