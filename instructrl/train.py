"""Training machinery shared by every stage: state, sharded init, the jitted step, the loop.

A stage supplies a pure ``step(state, batch, rng) -> (state, metrics)`` and a batcher whose
``batch(step)`` gives this host's rows of the global batch; ``fit`` does the rest: resume,
jit with shardings and donation, logging, evaluation, checkpointing and model selection.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from instructrl import checkpoint, evaluators, sharding
from instructrl.metrics import MetricWriter, Throughput, check_finite, to_floats

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: Any
    opt_state: Any

    def as_dict(self) -> dict[str, Any]:
        return state_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


def state_dict(state) -> dict[str, Any]:
    """A flax dataclass state as a plain dict of its fields (what checkpoints hold)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    example: dict[str, jax.ShapeDtypeStruct],
    mesh,
    rules,
    params_fn: Callable[[Any], Any] | None = None,
):
    """Create the train state already sharded: eval_shape, then jit with out_shardings.

    example: keyword inputs of ``model.init`` (shapes only). ``params_fn`` may edit the params
    before the optimizer sees them. Returns (state, state_shardings, abstract_state).
    """

    def init(rng):
        with nn.logical_axis_rules(rules):
            params = model.init(rng, **{k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()})
        params = params["params"]
        if params_fn is not None:
            params = params_fn(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with mesh:
        return sharding.create_sharded(init, mesh, rules, rng)


def global_norm(tree) -> jax.Array:
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def apply_gradients(state: TrainState, grads, tx) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; returns the new state and gradient/update/parameter norms."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    norms = {
        "grad_norm": global_norm(grads),
        "update_norm": global_norm(updates),
        "param_norm": global_norm(params),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), norms


def fit(
    *,
    config,
    workdir: str,
    mesh,
    state: TrainState,
    state_shardings,
    abstract_state,
    step_fn: Callable,
    batcher,
    total_steps: int,
    tokens_per_step: Callable[[dict], int] | None = None,
    init_from: Callable[[TrainState], TrainState] | None = None,
    eval_context: dict[str, Any] | None = None,
    prefix: str = "train",
    jit_step: bool = True,
):
    """Run ``step_fn`` from the resumed step to ``total_steps``; return the final state.

    Resume order: (1) latest checkpoint in workdir; (2) ``init_from(state)`` (params only);
    (3) the initial state. Any flax dataclass state with ``step`` and ``params`` fields works.
    With ``jit_step=False`` the step function is called as is (it jits its own phases, as PPO
    does). Checkpoints are written every ``config.checkpoint.every_steps`` and
    at the end; ``config.checkpoint.select_by`` (a metric of an evaluator, lower is better
    unless ``select_mode='max'``) keeps the best params under workdir/best.
    """
    train_cfg, ckpt_cfg = config.train, config.checkpoint
    rng = jax.random.key(int(config.seed))
    is_main = jax.process_index() == 0
    mngr = checkpoint.manager(
        os.path.join(workdir, "checkpoints"),
        keep=int(ckpt_cfg.keep),
        async_save=bool(ckpt_cfg.get("async_save", True)),
    )
    latest = mngr.latest_step()
    if latest is not None:
        restored = checkpoint.restore(mngr, latest, state_dict(abstract_state))
        state = type(state)(**restored)
        log.info("resumed from %s step %d", workdir, latest)
    elif init_from is not None:
        state = init_from(state)
    start = int(jax.device_get(state.step))

    example = batcher.batch(0)
    batch_shardings = jax.tree.map(lambda v: sharding.batch_sharding(mesh, v.ndim), example)
    jstep = step_fn
    if jit_step:
        jstep = jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
    evals = evaluators.build(config.get("evals"), {**(eval_context or {}), "workdir": workdir})
    writer = MetricWriter(workdir, enabled=is_main)
    best = _Best(workdir, ckpt_cfg) if ckpt_cfg.get("select_by") else None
    throughput = Throughput()
    log_every = int(train_cfg.log_every)
    every_save = max(int(ckpt_cfg.every_steps), 1)
    progress = _progress(start, total_steps, enabled=is_main and train_cfg.get("progress", True))

    def evaluate(name, evaluator, state, step):
        with mesh:
            results = to_floats(evaluator.run(state))
        check_finite(results, step)
        writer.write(step, results)
        log.info("step %d %s: %s", step, name, results)
        return results

    if train_cfg.get("eval_at_start") and start == 0:
        for name, (evaluator, _) in evals.items():
            evaluate(name, evaluator, state, 0)
    try:
        for step in range(start, total_steps):
            host_batch = batcher.batch(step)
            batch = sharding.shard_batch(host_batch, mesh)
            with mesh:
                state, metrics = jstep(state, batch, rng)
            if tokens_per_step is not None:
                throughput.add(tokens_per_step(host_batch))
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                values = {f"{prefix}/{k}": v for k, v in to_floats(jax.device_get(metrics)).items()}
                check_finite(values, done)
                values[f"{prefix}/tokens_per_s"] = throughput.rate()
                writer.write(done, values)
                if progress is not None:
                    # PPO has no single loss: its bar shows the RM score instead.
                    shown = {k: values[f"{prefix}/{k}"] for k in ("loss", "score", "kl_to_ref")
                             if f"{prefix}/{k}" in values}  # fmt: skip
                    progress.set_postfix(
                        **{k: f"{v:.4f}" for k, v in shown.items()},
                        tok_s=f"{values[f'{prefix}/tokens_per_s']:.0f}",
                    )
            for name, (evaluator, every) in evals.items():
                if (every and done % every == 0) or done == total_steps:
                    results = evaluate(name, evaluator, state, done)
                    if best is not None:
                        best.update(done, results, state)
            if done % every_save == 0 or done == total_steps:
                checkpoint.save(mngr, done, state_dict(state), force=True)
            if progress is not None:
                progress.update(1)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        if best is not None:
            best.close()
        writer.close()
        if progress is not None:
            progress.close()
    return state


class _Best:
    """Keeps the params with the best value of one evaluation metric under workdir/best."""

    def __init__(self, workdir: str, ckpt_cfg):
        self.metric = ckpt_cfg.select_by
        self.sign = -1.0 if ckpt_cfg.get("select_mode", "min") == "max" else 1.0
        self.path = os.path.join(workdir, "best")
        self.mngr = checkpoint.manager(self.path, keep=1, async_save=False)
        self.value = None
        step = self.mngr.latest_step()
        record = os.path.join(self.path, "best.json")
        if step is not None and os.path.exists(record):
            import json

            with open(record) as f:
                self.value = json.load(f)["value"]

    def update(self, step: int, results: dict[str, float], state: TrainState) -> None:
        if self.metric not in results:
            return
        value = results[self.metric]
        if self.value is not None and self.sign * value >= self.sign * self.value:
            return
        self.value = value
        checkpoint.save(self.mngr, step, {"params": state.params}, force=True)
        self.mngr.wait_until_finished()
        if jax.process_index() == 0:
            import json

            with open(os.path.join(self.path, "best.json"), "w") as f:
                json.dump({"step": step, "metric": self.metric, "value": value}, f)

    def close(self) -> None:
        self.mngr.close()


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=1.0)
