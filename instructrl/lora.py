"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for every
training stage.

With ``lora.rank`` r > 0 a stage trains, instead of its model's weights, a pair of matrices
per targeted projection (``model.adapt``): W x + (alpha / r) B A x, B zero at the start, so
the adapted model starts as the base. The params then come in two parts:

  base       the weights the stage starts from (``init_from``), frozen: an argument of the
             jitted step, never donated, never checkpointed, never given an optimizer state.
             PPO's reference policy *is* the policy's base and the reward model the value
             model's, so PPO holds one copy of each (full fine-tuning holds the policy, its
             EMA and the reference, plus two Adam moments of the policy);
  trainable  the adapters (leaves ``*_lora_a``, ``*_lora_b``) and the top-level modules named
             in ``lora.train`` (the reward and value models' new ``scalar_head``): the train
             state's ``params``, its optimizer state and its checkpoints.

The model applied to ``combine(base, trainable)`` computes the adapted projections;
``merge`` folds each adapter into its kernel (W + (alpha / r) A B), the plain weights every
later stage, ``instructrl sample`` and the Hugging Face export read (``lora.export``
"merged"; "separate" also writes the adapters alone, ``write_adapters``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from instructrl import checkpoint, fs
from instructrl.convert.adapters import ADAPTER_DIR
from instructrl.model import LORA_TARGETS, ModelConfig

SUFFIXES = ("_lora_a", "_lora_b")
EXPORTS = ("merged", "separate")
# How a step applies the adapters: "merged" forms W + (alpha / r) A B once per step and runs
# the plain projection (the gradient reaches A and B through it: W's gradient is formed, as
# in full fine-tuning); "adapters" computes x W + (alpha / r) (x A) B (no gradient of W: a
# third fewer matmul FLOPs, but four more small rank-r products per projection: measured on
# XLA:CPU at the pipeline's size, a PPO iteration with adapters on every projection of the
# policy and the value model took 7x as long as with "merged", which took 0.9x full
# fine-tuning's; on an accelerator at scale "adapters" should be the faster one).
COMPUTES = ("merged", "adapters")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A stage's ``lora`` section: rank (0: full fine-tuning), alpha (the update is scaled by
    alpha / rank), targets (projections of ``model.LORA_TARGETS``), train (top-level param
    modules trained in full beside the adapters), export ("merged" or "separate") and compute
    (``COMPUTES``: how a step applies the adapters)."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    train: tuple[str, ...] = ()
    export: str = "merged"
    compute: str = "merged"

    @classmethod
    def from_config(cls, config) -> Spec | None:
        """The spec of ``config.lora``; None when absent or rank 0 (full fine-tuning)."""
        section = config.get("lora")
        if not section or not int(section.get("rank", 0)):
            return None
        spec = cls(
            rank=int(section.rank),
            alpha=float(section.get("alpha", 16.0)),
            targets=tuple(section.get("targets") or LORA_TARGETS),
            train=tuple(section.get("train") or ()),
            export=str(section.get("export", "merged")),
            compute=str(section.get("compute", "merged")),
        )
        if spec.rank < 0:
            raise ValueError(f"config.lora.rank must be >= 0, got {spec.rank}")
        if spec.export not in EXPORTS:
            raise ValueError(f"config.lora.export must be one of {EXPORTS}, got {spec.export!r}")
        if spec.compute not in COMPUTES:
            raise ValueError(f"config.lora.compute must be one of {COMPUTES}, got {spec.compute!r}")
        return spec

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` whose ``init`` adds this spec's adapters."""
        return dataclasses.replace(
            cfg, lora_rank=self.rank, lora_alpha=self.alpha, lora_targets=self.targets
        )

    @property
    def merge_alpha(self) -> float | None:
        """``value_and_grad``'s merge_alpha: alpha when each step merges, else None."""
        return self.alpha if self.compute == "merged" else None

    def with_train(self, *names: str) -> Spec:
        """The spec with ``names`` trained in full too (a new head the stage adds)."""
        return dataclasses.replace(self, train=tuple(dict.fromkeys((*self.train, *names))))


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


def split(params: dict, train: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(base, trainable) of a params tree: the adapters and the top-level modules in
    ``train`` are trainable, every other leaf base. Both keep the tree's nesting."""

    def go(tree, top):
        base, trainable = {}, {}
        for key, value in tree.items():
            if (top and key in train) or is_adapter(key):
                trainable[key] = value
            elif isinstance(value, dict):
                b, t = go(value, False)
                if b:
                    base[key] = b
                if t:
                    trainable[key] = t
            else:
                base[key] = value
        return base, trainable

    return go(dict(params), True)


def combine(base: dict, trainable: dict) -> dict:
    """The full params: ``base`` with ``trainable``'s entries added (or replacing, for a module
    trained in full). No array is copied."""
    out = dict(base)
    for key, value in trainable.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = combine(out[key], value)
        else:
            out[key] = value
    return out


def merge(params: dict, alpha: float) -> dict:
    """``params`` with every adapter folded into its kernel: W + (alpha / r) A B, in float32,
    stored in W's dtype; the adapters are dropped. Scanned layers (a leading layer axis on
    W, A and B) merge layer by layer. The plain model on the result computes what the
    adapted model computes on ``params``."""

    def go(tree):
        out = {k: go(v) if isinstance(v, dict) else v for k, v in tree.items() if not is_adapter(k)}
        for key in tree:
            if not key.endswith(SUFFIXES[0]):
                continue
            name = key[: -len(SUFFIXES[0])]
            a, b = tree[key], tree[name + SUFFIXES[1]]
            kernel = out[name]["kernel"]
            lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 with scanned layers
            rank = a.shape[-1]
            a2 = a.reshape(*a.shape[:lead], -1, rank).astype(jnp.float32)
            b2 = b.reshape(*b.shape[:lead], rank, -1).astype(jnp.float32)
            delta = (a2 @ b2).reshape(kernel.shape) * (alpha / rank)
            out[name] = {
                **out[name],
                "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype),
            }
        return out

    return go(dict(params))


def value_and_grad(loss_fn: Callable, trainable, base=None, has_aux: bool = True,
                   merge_alpha: float | None = None):  # fmt: skip
    """``jax.value_and_grad(loss_fn, has_aux)(trainable)``, ``loss_fn`` taking the full params:
    ``trainable`` itself in full fine-tuning (``base`` None), else ``combine(base,
    trainable)``, the gradient being the trainable leaves' only. ``merge_alpha``: the
    adapters are merged into their kernels first (``merge``; ``Spec.merge_in_step``), so the
    model runs plain projections and the gradient reaches A and B through W + (alpha/r) A B."""
    if base is None:
        return jax.value_and_grad(loss_fn, has_aux=has_aux)(trainable)
    if merge_alpha is None:
        full_params = lambda p: combine(base, p)  # noqa: E731
    else:
        full_params = lambda p: merge(combine(base, p), merge_alpha)  # noqa: E731
    return jax.value_and_grad(lambda p: loss_fn(full_params(p)), has_aux=has_aux)(trainable)


def full(trainable, base=None):
    """The full params of ``trainable`` (``combine`` with ``base``; as is without one)."""
    return trainable if base is None else combine(base, trainable)


@functools.partial(jax.jit, static_argnums=2)
def merged(base, trainable, alpha: float):
    """``merge(combine(base, trainable), alpha)``, jitted: the merged kernels are built in
    their kernels' shardings (the plain params every reader of a LoRA stage gets)."""
    return merge(combine(base, trainable), alpha)


def nbytes(tree) -> int:
    """Bytes of a tree's arrays (or ShapeDtypeStructs)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def write_adapters(workdir: str, spec: Spec, trainable, info: dict | None = None) -> str:
    """workdir/adapter: the trainable params alone (orbax, as a stage's export) and
    ``adapter.json`` (rank, alpha, targets, the base it was trained on): ``lora.export``
    "separate". ``python -m instructrl.convert --export WORKDIR --adapter`` writes them as
    safetensors (``convert.adapters``)."""
    directory = os.path.join(workdir, ADAPTER_DIR)
    mngr = checkpoint.manager(directory, keep=1, async_save=False)
    step = (mngr.latest_step() or 0) + 1
    checkpoint.save(mngr, step, {"params": trainable}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    if jax.process_index() == 0:
        record = {**dataclasses.asdict(spec), "bytes": nbytes(trainable), **(info or {})}
        fs.write_atomic(os.path.join(directory, "adapter.json"), json.dumps(record, indent=2))
    return directory
