"""Helpers for experiment configs (Python files in configs/ exposing ``get_config(arg)``)."""

from __future__ import annotations

import os

import ml_collections

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(PACKAGE_DIR, "assets")


def parse_arg(arg: str | None) -> dict[str, object]:
    """'model=small,runlocal' -> {'model': 'small', 'runlocal': True}; values stay strings."""
    out: dict[str, object] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[key.strip()] = value.strip() if sep else True
    return out


def base_config(seed: int = 0) -> ml_collections.ConfigDict:
    """Sections every stage shares: seed, mesh, logical rules, tokenizer, optimizer,
    training loop and checkpointing."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.stage = "sft"
    c.init_from = ""
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.logical_rules = ml_collections.config_dict.placeholder(list)
    c.tokenizer = dict(kind="bytes", path="", eos_token="", pad_token="")
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",
            vocab_size=ml_collections.config_dict.placeholder(int),
            max_len=ml_collections.config_dict.placeholder(int),
            dropout=0.0,
            dtype="float32",
            param_dtype="float32",
            scan_layers=True,
            remat="none",
            attention=ml_collections.config_dict.placeholder(str),
        )
    )
    c.optimizer = dict(
        lr=1e-3,
        warmup_steps=0,
        final_frac=0.1,
        weight_decay=0.0,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        schedule="cosine",
        warmup_init_frac=0.0,
    )
    # eval_at_start: run every evaluator once before the first step (logged at step 0), the
    # baseline of the curves (e.g. the SFT policy at the start of PPO).
    c.train = dict(
        batch_size=16, epochs=1.0, steps=0, log_every=10, progress=True, eval_at_start=False
    )
    c.checkpoint = dict(every_steps=50, keep=2, async_save=True, select_by="", select_mode="min")
    c.evals = ml_collections.ConfigDict()
    return c


def asset(*parts: str) -> str:
    return os.path.join(ASSETS, *parts)
