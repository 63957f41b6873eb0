"""Optimizer from config: AdamW, warmup + cosine decay to a final fraction, clipping, decay mask."""

from __future__ import annotations

import jax
import optax

DECAYED = ("kernel", "embedding")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup from ``warmup_init_frac * lr`` to lr, then cosine to ``final_frac * lr``.

    cfg fields: lr, warmup_steps, total_steps, final_frac (paper SFT/RM: 0.1), and optional
    warmup_init_frac (default 0) and schedule ("cosine" | "constant").
    """
    lr = float(cfg.lr)
    init_frac = float(cfg.get("warmup_init_frac", 0.0))
    warmup = int(cfg.warmup_steps)
    if cfg.get("schedule", "cosine") == "constant":
        decay = optax.constant_schedule(lr)
    else:
        decay = optax.cosine_decay_schedule(
            lr, max(int(cfg.total_steps) - warmup, 1), alpha=float(cfg.final_frac)
        )
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(lr * init_frac, lr, warmup), decay], [warmup]
    )


def weight_decay_mask(params):
    """Decay matrices and embeddings; never biases or norm scales (path-based, scan-safe)."""

    def decayed(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in DECAYED

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """cfg: lr, warmup_steps, total_steps, final_frac, weight_decay, b1, b2, eps, grad_clip."""
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(cfg.get("b1", 0.9)),
            b2=float(cfg.get("b2", 0.95)),
            eps=float(cfg.get("eps", 1e-8)),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
