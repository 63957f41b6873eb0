"""The training scaffold every training stage runs on (pretrain, SFT, RM, PPO and later methods).

A stage builds ``Run(config, workdir)`` (tokenizer, model config, mesh, logical rules), its own
data and its pure ``step(state, batch, rng) -> (state, metrics)``, then calls ``Run.fit``, which
does the rest:

  resume      (1) the newest checkpoint in workdir/checkpoints that restores (a corrupt one is
              skipped with a warning naming it); (2) else ``init_from(state)``: params only,
              from another stage; (3) else the initial state. Metric and sample rows logged
              after the restored step are dropped, so a resumed run's files equal an
              uninterrupted run's;
  the step    jitted once with explicit shardings and ``donate_argnums=(0,)`` (or called as
              is with ``jit_step=False``: PPO jits its own phases);
  batches     ``batcher.batch(step)``, a pure function of (seed, step), sharded over (data,
              fsdp) from each host's rows;
  logging     metrics.jsonl + TensorBoard (process 0), NaN/Inf fail loudly, one live progress
              line (``metrics.Progress``);
  evaluation  the ``config.evals`` registry, every ``every_steps`` and at the end; the best
              params by ``checkpoint.select_by`` under workdir/best;
  checkpoints every ``checkpoint.every_steps`` and at the end (orbax, async, keep-N, atomic);
  timings     compile, host data, device step, evaluation, checkpointing and logging seconds
              (and a stage's own ``time/*`` metrics), written to run_info.json;
  DONE        ``Run.finish`` writes run_info.json and workdir/DONE once the stage's outputs
              (e.g. the RM's normalized export) are written;
  SIGTERM     (preemption) a checkpoint of the step every process agrees on, then exit status
              143 (``instructrl.preemption``); the relaunch resumes there.

For resume tests, ``INSTRUCTRL_PAUSE_AFTER_CHECKPOINT=<workdir name>:<step>[,...]`` makes the
run stop after that checkpoint is on disk (marked by ``workdir/PAUSED_AT_<step>``) and sleep
until it is killed; a rerun finds the marker and goes on. ``INSTRUCTRL_SIGTERM_AFTER_STEP``
(same form) makes the run send itself SIGTERM after that step, once (marker
``workdir/SIGTERM_AT_<step>``). Nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from instructrl import checkpoint, convert, evaluators, fs, lora, sharding
from instructrl.metrics import (
    MetricWriter,
    Progress,
    Timers,
    check_finite,
    to_floats,
    truncate_jsonl,
)
from instructrl.model import ModelConfig
from instructrl.preemption import Preempted, Preemption
from instructrl.presets import model_config
from instructrl.tokenizer import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)

DONE = "DONE"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: what ``instructrl pipeline`` walks (``instructrl.stages``).

    name: its directory under the pipeline's workdir (and its config section unless
      ``section`` names another); run(config, workdir): trains or computes it from its config
      section into its directory; reads: the stages whose outputs it reads; wire(section,
      dirs, config): fills the section's inputs from ``dirs`` ({stage: directory}) and the
      whole pipeline config. On many hosts every process runs a stage (each writing only what
      is its own: process 0 the files, orbax each host's shards) unless ``every_process`` is
      off; the pipeline waits for all of them after each stage.
    """

    name: str
    run: Callable[[Any, str], Any]
    reads: tuple[str, ...] = ()
    wire: Callable[[Any, dict[str, str], Any], None] | None = None
    section: str = ""
    trains: bool = True  # a training stage: the shared model, seed and tokenizer apply
    # The stage just before, which this one neither reads nor is read by before both finish:
    # the pipeline may run the two at once, in two processes (configs/pipeline.py parallel).
    concurrent_with: str = ""
    # On many hosts: whether every process runs it (its jitted steps span every host's
    # devices), or process 0 alone (host-only work: building the world, writing the report).
    every_process: bool = True


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: Any
    opt_state: Any


def state_dict(state) -> dict[str, Any]:
    """A flax dataclass state as a plain dict of its fields (what checkpoints hold)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def params_init(model: nn.Module, example: dict, rules) -> Callable:
    """``init(rng) -> params`` (Flax-boxed, whose logical axes give the shardings).
    example: keyword inputs of ``model.init`` (shapes only)."""

    def init(rng):
        with nn.logical_axis_rules(rules):
            params = model.init(rng, **{k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()})
        return params["params"]

    return init


def train_state_init(model: nn.Module, tx, example: dict, rules, trainable=None) -> Callable:
    """``init(rng) -> TrainState`` (Flax-boxed params, whose logical axes give the shardings).
    example: keyword inputs of ``model.init`` (shapes only). ``trainable``: the part of the
    params the state trains (``Run.trainable``: LoRA's adapters), all of them when None."""
    init_params = params_init(model, example, rules)

    def init(rng):
        params = init_params(rng)
        if trainable is not None:
            params = trainable(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def init_train_state(model: nn.Module, tx, rng, example: dict, mesh, rules):
    """The train state built directly into its sharding (eval_shape, then jit with
    out_shardings). Returns (state, state_shardings, abstract_state)."""
    return sharding.create_sharded(train_state_init(model, tx, example, rules), mesh, rules, rng)


def lazy_state(init_fn: Callable, mesh, rules, *args) -> tuple[Callable, Any, Any]:
    """(initial, shardings, abstract) of ``init_fn(*args)`` without computing it: ``initial()``
    builds the state into its sharding on first call (then returns the same value). A stage
    that starts from another stage's params or a checkpoint never pays for initializing
    (and compiling the initialization of) weights it then replaces."""
    shardings, abstract = sharding.abstract_sharded(init_fn, mesh, rules, *args)
    built = []

    def initial():
        if not built:
            build = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)
            built.append(build(*args))
        return built[0]

    return initial, shardings, abstract


def jit_train_step(step_fn: Callable, shardings, batch_shardings, mesh, frozen_shardings=()):
    """``step_fn(state, batch, rng, *frozen)`` jitted as every stage runs it: explicit
    shardings, the state donated, metrics replicated. ``frozen``: arrays the step reads and
    never updates (DPO's reference policy), arguments rather than constants baked into the
    executable. ``instructrl compile`` lowers this same function."""
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_shardings, sharding.replicated(mesh), *frozen_shardings),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def global_norm(tree) -> jax.Array:
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def apply_gradients(state, grads, tx) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer update; returns the new state and gradient/update/parameter norms."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    norms = {
        "grad_norm": global_norm(grads),
        "update_norm": global_norm(updates),
        "param_norm": global_norm(params),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), norms


def total_steps(train_cfg, steps_per_epoch: float) -> int:
    """``train.steps`` when set, else ``train.epochs`` epochs (at least one step)."""
    steps = int(train_cfg.get("steps") or 0)
    return steps or max(int(round(float(train_cfg.epochs) * steps_per_epoch)), 1)


def optimizer_config(opt_cfg, total: int):
    """The optimizer section with ``total_steps`` filled in (what optim.make_optimizer reads)."""
    c = opt_cfg.copy_and_resolve_references()
    with c.unlocked():
        c.total_steps = int(total)
    return c


class Run:
    """One training stage in one workdir: the set-up every stage shares, then ``fit``.

    Attributes: config, workdir, tokenizer, model_cfg (``presets.model_config``; dropout 0 with
    ``deterministic=True``; with LoRA, adapters on its targets), mesh, rules, is_main, timers,
    info (run_info.json fields), lora (``lora.Spec`` of ``config.lora``; None: full
    fine-tuning).

    With LoRA a stage's state trains ``trainable(params)`` only (``train_state_init``), its
    step reads the frozen base (``lora_base``) as an argument, and evaluation, the best
    params and the export see the merged weights (``merged_view``).
    """

    def __init__(self, config, workdir: str, deterministic: bool = False):
        self.config, self.workdir = config, workdir
        fs.makedirs(workdir)
        self.tokenizer: Tokenizer = make_tokenizer(config.tokenizer)
        cfg: ModelConfig = model_config(config, self.tokenizer)
        self.lora: lora.Spec | None = lora.Spec.from_config(config)
        if self.lora is not None:
            cfg = self.lora.model_config(cfg)
        self.model_cfg = dataclasses.replace(cfg, dropout=0.0) if deterministic else cfg
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.rules_from_config(config.get("logical_rules"))
        self.is_main = jax.process_index() == 0
        self.timers = Timers()
        self.info: dict[str, Any] = {"stage": config.get("stage", "")}

    def report_skipped(self, counts: dict[str, int], what: str = "records") -> None:
        """Say on the console how many input records were skipped, by reason (they are also
        in run_info.json): a skipped record is never silent."""
        shown = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items() if n)
        if shown and self.is_main:
            log.warning(
                "%s: skipped %s %s (see run_info.json)", self.config.get("stage"), shown, what
            )

    @property
    def trainable(self) -> Callable | None:
        """params -> the part a LoRA state trains (adapters and ``lora.train`` modules);
        None in full fine-tuning."""
        if self.lora is None:
            return None
        train = self.lora.train
        return lambda params: lora.split(params, train)[1]

    def lora_base(self, model: nn.Module, example: dict, source: str | None = None):
        """With LoRA, the frozen base: the params of ``source`` (default ``config.init_from``)
        in the adapted model's shardings, without the adapters and ``lora.train`` modules.
        None in full fine-tuning."""
        if self.lora is None:
            return None
        source = source or self.config.get("init_from")
        if not source:
            raise ValueError(
                "config.lora.rank > 0 adapts a trained model: set config.init_from (the stage "
                "workdir, hf:DIR or gguf:FILE whose weights stay frozen)"
            )
        init = params_init(model, example, self.rules)
        _, abstract = sharding.abstract_sharded(init, self.mesh, self.rules, jax.random.key(0))
        return self.load(source, lora.split(abstract, self.lora.train)[0])

    @property
    def merge_alpha(self) -> float | None:
        """What a step's ``merge_alpha`` takes: ``lora.Spec.merge_alpha``; None in full
        fine-tuning."""
        return None if self.lora is None else self.lora.merge_alpha

    def merged_view(self, base) -> Callable | None:
        """state -> the same state with plain params (the adapters merged into ``base``), what
        evaluators, the best params and the export read; None in full fine-tuning."""
        if self.lora is None:
            return None
        alpha = self.lora.alpha
        return lambda state: state.replace(params=lora.merged(base, state.params, alpha))

    def export(self, params, info: dict | None = None, base=None) -> None:
        """workdir/export (what later stages read): ``params``, or with LoRA the adapters
        ``params`` merged into ``base``; ``lora.export`` "separate" also writes the adapters
        alone (``lora.write_adapters``)."""
        if self.lora is not None:
            if self.lora.export == "separate":
                lora.write_adapters(self.workdir, self.lora, params,
                                    {"base": self.config.get("init_from", "")})  # fmt: skip
            params = lora.merged(base, params, self.lora.alpha)
        checkpoint.export_params(self.workdir, params, info)

    def load(self, source: str, abstract):
        """Params of ``source`` (a stage workdir, hf:DIR or gguf:FILE) into ``abstract``."""
        with self.timers.time("restore"):
            return convert.load_params(source, abstract)

    def fit(
        self,
        *,
        initial: Callable[[], Any],
        shardings,
        abstract,
        step_fn: Callable,
        batcher,
        steps: int,
        init_from: Callable | None = None,
        eval_context: dict[str, Any] | None = None,
        prefix: str = "train",
        jit_step: bool = True,
        tokens_per_step: Callable[[dict], int] | None = None,
        schedule: Callable | None = None,
        frozen: tuple = (),
        view: Callable | None = None,
        base=None,
    ):
        """Run ``step_fn`` from the resumed step to ``steps``; returns the final state.

        initial: builds the fresh state (``lazy_state``), called only when no checkpoint
        restores; ``init_from(initial)`` returns the state a run starts from another stage
        with (it calls ``initial()`` only for values it keeps, such as a new head).
        ``schedule`` (the optimizer's learning-rate schedule) adds an ``lr`` metric.
        ``frozen``: arrays passed to every step after the rng (``jit_train_step``), placed on
        their own shardings. ``view(state)``: the state evaluators and the best params see
        (``merged_view``: LoRA's adapters merged into the base). ``base`` (LoRA,
        ``lora_base``): the frozen weights the state's adapters adapt, passed to the step
        before ``frozen`` and merged into what ``view`` shows (unless a view is given); the
        state then starts as ``initial()`` (B = 0: the base itself), not from ``init_from``."""
        if base is not None:
            frozen, view, init_from = (base, *frozen), view or self.merged_view(base), None
        if schedule is not None:
            step_fn = with_lr(step_fn, schedule)
        config, workdir, mesh, timers = self.config, self.workdir, self.mesh, self.timers
        train_cfg, ckpt_cfg = config.train, config.checkpoint
        rng = jax.random.key(int(config.seed))
        mngr = checkpoint.manager(
            os.path.join(workdir, "checkpoints"),
            keep=int(ckpt_cfg.keep),
            async_save=bool(ckpt_cfg.get("async_save", True)),
        )
        with timers.time("restore"):
            restored, step0 = checkpoint.restore_latest(mngr, state_dict(abstract))
        if restored is not None:
            state = type(abstract)(**restored)
            log.info("resumed %s at step %d", workdir, step0)
        elif init_from is not None:
            # On the state's own shardings: leaves made outside a jit (an optimizer's fresh
            # counters) carry none, and a step traced on them compiles again for the
            # sharded state it returns (PPO's update compiled twice).
            state = jax.device_put(init_from(initial), shardings)
        else:
            state = initial()
        start = int(jax.device_get(state.step))
        self.info.update(total_steps=steps, resumed_from=start if restored is not None else None)

        jstep = step_fn
        if jit_step:
            example = batcher.batch(start)
            batch_shardings = jax.tree.map(lambda v: sharding.batch_sharding(mesh, v.ndim), example)
            frozen_shardings = jax.tree.map(lambda v: v.sharding, frozen)
            jstep = jit_train_step(step_fn, shardings, batch_shardings, mesh, frozen_shardings)
        context = {**(eval_context or {}), "workdir": workdir, "mesh": mesh, "rules": self.rules}
        context.setdefault("tokenizer", self.tokenizer)
        context.setdefault("config", config)
        evals = evaluators.build(config.get("evals"), context)
        if self.is_main:  # rows logged after the restored step are logged again
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(os.path.join(workdir, name), start)
        writer = MetricWriter(workdir, enabled=self.is_main)
        best = _Best(workdir, ckpt_cfg) if ckpt_cfg.get("select_by") else None
        log_every = int(train_cfg.log_every)
        every_save = max(int(ckpt_cfg.every_steps), 1)
        progress = Progress(
            train_cfg.get("progress_label") or prefix,
            steps,
            start,
            enabled=self.is_main and bool(train_cfg.get("progress", True)),
        )
        shown_keys = ("loss", "score", "kl_to_ref")

        def evaluate(name, evaluator, state, step):
            with timers.time("evaluation"):
                results = to_floats(evaluator.run(state if view is None else view(state)))
            check_finite(results, step)
            writer.write(step, results)
            log.info("step %d %s: %s", step, name, results)
            return results

        if train_cfg.get("eval_at_start") and start == 0:
            for name, (evaluator, _) in evals.items():
                evaluate(name, evaluator, state, 0)
        # tokens/s over the steps' own time (host data and device step), not the evaluations
        # and checkpoints that fall between two log rows.
        tokens, busy = 0, 0.0
        preemption = Preemption().__enter__()  # SIGTERM: save, then raise Preempted
        try:
            for step in range(start, steps):
                began = time.perf_counter()
                with timers.time("host_data"):
                    host_batch = batcher.batch(step)
                    batch = sharding.shard_batch(host_batch, mesh)
                first = step == start
                with timers.time("compile_and_first_step" if first else "device_step"):
                    state, metrics = jstep(state, batch, rng, *frozen)
                    jax.block_until_ready(metrics)  # honest step timings; no overlap is lost
                busy += time.perf_counter() - began
                for key in [k for k in metrics if k.startswith("time/")]:
                    timers.add(key[5:], metrics.pop(key))  # a stage's own phase timings
                if tokens_per_step is not None:
                    tokens += tokens_per_step(host_batch)
                done = step + 1
                if done % log_every == 0 or done == steps:
                    with timers.time("logging"):
                        values = to_floats(jax.device_get(metrics))
                        values = {f"{prefix}/{k}": v for k, v in values.items()}
                        check_finite(values, done)
                        values[f"{prefix}/tokens_per_s"] = tokens / max(busy, 1e-9)
                        tokens, busy = 0, 0.0
                        writer.write(done, values)
                        progress.show(
                            {
                                k: values[f"{prefix}/{k}"]
                                for k in shown_keys
                                if f"{prefix}/{k}" in values
                            }
                        )
                for name, (evaluator, every) in evals.items():
                    if (every and done % every == 0) or done == steps:
                        results = evaluate(name, evaluator, state, done)
                        if best is not None:
                            with timers.time("checkpointing"):
                                best.update(done, results, state, view)
                saved = done % every_save == 0 or done == steps
                if saved:
                    with timers.time("checkpointing"):
                        checkpoint.save(mngr, done, state_dict(state), force=True)
                    _pause_if_asked(workdir, done, mngr)
                progress.update(done)
                _sigterm_if_asked(workdir, done)
                if preemption.reached(done) and done < steps:
                    if not saved:
                        with timers.time("checkpointing"):
                            checkpoint.save(mngr, done, state_dict(state), force=True)
                    self.write_info(preempted_at=done)
                    log.warning("preempted: checkpoint of step %d saved in %s", done, workdir)
                    raise Preempted(done)
        finally:
            preemption.__exit__(None, None, None)
            with timers.time("checkpointing"):
                mngr.wait_until_finished()
                checkpoint.seal(mngr)
                mngr.close()
                if best is not None:
                    best.close()
            writer.close()
            progress.close()
        return state

    def write_info(self, **info) -> None:
        """Add fields to run_info.json (process 0), with the config and the timings so far."""
        self.info.update(info)
        write_run_info(self.workdir, self.config, self.timers, **self.info)

    def finish(self, **info) -> None:
        """run_info.json with every timing, then workdir/DONE (the stage's outputs are final)."""
        self.write_info(**info)
        mark_done(self.workdir)


def with_lr(step_fn, schedule):
    """``step_fn`` with the learning rate of the update it made as an ``lr`` metric."""

    def step(state, batch, rng, *frozen):
        state, metrics = step_fn(state, batch, rng, *frozen)
        return state, {**metrics, "lr": schedule(state.step - 1)}

    return step


PAUSE_ENV = "INSTRUCTRL_PAUSE_AFTER_CHECKPOINT"


def _asked(env: str, workdir: str, step: int) -> bool:
    """Whether ``env`` ("<workdir name>:<step>[,...]", the test hooks of the module
    docstring) names this run's directory at ``step``."""
    wanted = {item.strip() for item in os.environ.get(env, "").split(",") if item.strip()}
    return f"{os.path.basename(fs.absolute(workdir).rstrip('/'))}:{step}" in wanted


def _pause_if_asked(workdir: str, step: int, mngr) -> None:
    """The resume tests' kill point (module docstring): after checkpoint ``step`` of a run in
    a directory named as asked, wait for the checkpoint, mark it and sleep until killed."""
    marker = os.path.join(workdir, f"PAUSED_AT_{step}")
    if _asked(PAUSE_ENV, workdir, step) and not fs.exists(marker):
        mngr.wait_until_finished()
        fs.write_atomic(marker, f"{os.getpid()}\n")
        time.sleep(3600)


SIGTERM_ENV = "INSTRUCTRL_SIGTERM_AFTER_STEP"


def _sigterm_if_asked(workdir: str, step: int) -> None:
    """The preemption test's signal (module docstring): SIGTERM to this process after
    ``step`` of a run in a directory named as asked, once."""
    marker = os.path.join(workdir, f"SIGTERM_AT_{step}")
    if _asked(SIGTERM_ENV, workdir, step) and not fs.exists(marker) and jax.process_index() == 0:
        fs.write_atomic(marker, f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGTERM)


def write_run_info(workdir: str, config, timers: Timers, **info) -> None:
    """workdir/run_info.json (process 0, atomic): ``info``, the seconds of each part of the
    stage (``timers``) and the config it ran with (``instructrl train --config`` reads it)."""
    if jax.process_index() != 0:
        return
    out = {**info, "seconds": timers.as_dict(), "config": json.loads(config.to_json_best_effort())}
    fs.write_atomic(os.path.join(workdir, "run_info.json"), json.dumps(out, indent=2, default=str))


def is_main_process() -> bool:
    """Whether this process writes the files every process computed alike (process 0)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Wait until every process gets here (after process 0 wrote what the others read next);
    a no-op in one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def mark_done(workdir: str) -> None:
    if is_main_process():
        fs.write_atomic(os.path.join(workdir, DONE), "done\n")


def is_done(workdir: str) -> bool:
    return fs.exists(os.path.join(workdir, DONE))


class _Best:
    """Keeps the params with the best value of one evaluation metric under workdir/best."""

    def __init__(self, workdir: str, ckpt_cfg):
        self.metric = ckpt_cfg.select_by
        self.sign = -1.0 if ckpt_cfg.get("select_mode", "min") == "max" else 1.0
        self.path = os.path.join(workdir, "best")
        self.mngr = checkpoint.manager(self.path, keep=1, async_save=False)
        self.value = None
        record = os.path.join(self.path, "best.json")
        if self.mngr.latest_step() is not None and fs.exists(record):
            self.value = json.loads(fs.read_text(record))["value"]

    def update(self, step: int, results: dict[str, float], state, view=None) -> None:
        if self.metric not in results:
            return
        value = results[self.metric]
        if self.value is not None and self.sign * value >= self.sign * self.value:
            return
        self.value = value
        if view is not None:  # the params a later stage reads (LoRA: merged)
            state = view(state)
        if step in self.mngr.all_steps():  # a resumed run on a new schedule passes it again
            self.mngr.delete(step)
        checkpoint.save(self.mngr, step, {"params": state.params}, force=True)
        self.mngr.wait_until_finished()
        if jax.process_index() == 0:
            record = {"step": step, "metric": self.metric, "value": value}
            fs.write_atomic(os.path.join(self.path, "best.json"), json.dumps(record))

    def close(self) -> None:
        self.mngr.close()
