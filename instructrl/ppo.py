"""PPO and PPO-ptx against the frozen reward model (paper step 3, eq. 2, appendix C.3/C.4).

objective(phi) = E_{(x,y)~pi}[ r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ]
                 + gamma * E_{x~D_pretrain}[ log pi(x) ]
kl_coef is beta, ptx_coef is gamma (plain "PPO": gamma = 0). The policy starts from SFT; the
reference policy is the frozen SFT; the reward model (normalized, frozen) scores the last
response token; a separate value model starts from the RM. One iteration composes four jitted
phases over a ``Rollout``: generate -> score -> advantages -> update, the update being
epochs x minibatches as ``lax.scan``. Frozen params are arguments, never captured constants.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from instructrl import checkpoint, evaluators, losses, sharding
from instructrl.data import lm as lm_data
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.sampler import generate
from instructrl.sampling import left_pad
from instructrl.sft import model_config
from instructrl.tokenizer import make_tokenizer
from instructrl.train import fit, global_norm

log = logging.getLogger(__name__)


@flax.struct.dataclass
class PPOState:
    step: jax.Array  # () int32: PPO iterations done
    params: Any  # policy
    opt_state: Any
    value_params: Any
    value_opt_state: Any
    ema_params: Any  # EMA of the policy (paper: 0.992), used for evaluation
    kl_coef: jax.Array  # () float32, beta (adaptive when ppo.target_kl > 0)


@flax.struct.dataclass
class Rollout:
    prompt_tokens: jax.Array  # (B, P) left-padded
    prompt_mask: jax.Array  # (B, P)
    tokens: jax.Array  # (B, N) response
    mask: jax.Array  # (B, N) response tokens (through EOS)
    logprobs: jax.Array  # (B, N) policy, teacher-forced
    ref_logprobs: jax.Array  # (B, N) reference (SFT) policy
    values: jax.Array  # (B, N) value model
    scores: jax.Array  # (B,) RM score (or the no-EOS penalty)
    raw_scores: jax.Array  # (B,) RM score before any penalty
    rewards: jax.Array | None = None  # (B, N)
    advantages: jax.Array | None = None  # (B, N)
    returns: jax.Array | None = None  # (B, N)


@dataclasses.dataclass(frozen=True)
class Models:
    policy: Transformer  # LM head
    scalar: Transformer  # scalar head (reward and value models)
    rules: tuple


def _apply(model, rules, params, tokens, mask):
    with nn.logical_axis_rules(rules):
        return model.apply({"params": params}, tokens, attention_mask=mask)


def response_logprobs(models: Models, params, prompt_tokens, prompt_mask, tokens, mask):
    """Teacher-forced log-probs (B, N) of response tokens and the logits (B, N, V)."""
    full = jnp.concatenate([prompt_tokens, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    p = prompt_tokens.shape[1]
    logits = _apply(models.policy, models.rules, params, full, full_mask)[:, p - 1 : -1]
    return losses.token_logprobs(logits, tokens), logits


def response_values(models: Models, params, prompt_tokens, prompt_mask, tokens, mask):
    """Scalar-head outputs (B, N) at the state before each response token."""
    full = jnp.concatenate([prompt_tokens, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    p = prompt_tokens.shape[1]
    return _apply(models.scalar, models.rules, params, full, full_mask)[:, p - 1 : -1]


def reward_scores(models: Models, rm_params, prompt_tokens, prompt_mask, tokens, mask):
    """RM score (B,) read at each response's last token (its EOS when it has one)."""
    full = jnp.concatenate([prompt_tokens, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    values = _apply(models.scalar, models.rules, rm_params, full, full_mask)  # (B, P + N)
    last = prompt_tokens.shape[1] + losses.last_index(mask)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def score_phase(models, cfg, state, ref_params, rm_params, prompt_tokens, prompt_mask, samples):
    """Phase 2: policy / reference log-probs, values and RM scores of the samples."""
    tokens, mask = samples.tokens, samples.mask
    logprobs, _ = response_logprobs(models, state.params, prompt_tokens, prompt_mask, tokens, mask)
    ref_logprobs, _ = response_logprobs(
        models, ref_params, prompt_tokens, prompt_mask, tokens, mask
    )
    values = response_values(models, state.value_params, prompt_tokens, prompt_mask, tokens, mask)
    raw = reward_scores(models, rm_params, prompt_tokens, prompt_mask, tokens, mask)
    ended = jnp.any((tokens == cfg["eos_id"]) & (mask > 0), axis=1)
    scores = raw
    if cfg["no_eos_penalty"] is not None:
        scores = jnp.where(ended, raw, cfg["no_eos_penalty"])
    mask = mask.astype(jnp.float32)
    return Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tokens=tokens,
        mask=mask,
        logprobs=logprobs * mask,
        ref_logprobs=ref_logprobs * mask,
        values=values * mask,
        scores=scores,
        raw_scores=raw,
    )


def advantage_phase(cfg, rollout: Rollout, kl_coef) -> Rollout:
    """Phase 3: KL-penalized rewards (optionally clipped scores, whitened rewards), GAE,
    advantage whitening."""
    scores = rollout.scores
    if cfg["score_clip"]:
        scores = jnp.clip(scores, -cfg["score_clip"], cfg["score_clip"])
    rewards = losses.kl_penalized_rewards(
        scores, rollout.logprobs, rollout.ref_logprobs, rollout.mask, kl_coef
    )
    if cfg["whiten_rewards"]:  # scale only: the sign of a reward carries meaning
        rewards = losses.whiten(rewards, rollout.mask, shift_mean=False)
    advantages, returns = losses.gae(
        rewards, rollout.values, rollout.mask, cfg["gamma"], cfg["lam"]
    )
    if cfg["whiten_advantages"]:
        advantages = losses.whiten(advantages, rollout.mask)
    return rollout.replace(rewards=rewards, advantages=advantages, returns=returns)


def ema_update(ema, params, decay: float, count):
    """Bias-corrected EMA of the policy weights after update number ``count`` (1-based):
    sum_i (1 - d) d^(n - i) theta_i / (1 - d^n), the average optax.ema(debias=True) reports.

    The paper's 0.992 averages over ~125 updates; its runs make thousands. A short run makes
    tens, and an EMA started at the SFT weights without the correction would still be mostly
    SFT at the end (60 updates: 62% SFT), so evaluation would see a policy PPO never trained.
    """
    rate = (1.0 - decay) / (1.0 - decay ** count.astype(jnp.float32))
    return jax.tree.map(lambda e, p: e + (rate * (p - e)).astype(e.dtype), ema, params)


def update_phase(models, cfg, tx, value_tx, state: PPOState, rollout: Rollout, ptx, rng):
    """Phase 4: ``epochs`` x ``num_minibatches`` clipped-PPO updates as one ``lax.scan``.

    ptx: None or {inputs, targets, loss_mask} (B_ptx, T) pretraining rows, split into the same
    number of minibatches; its NLL times ptx_coef is added to the policy loss (PPO-ptx).
    """
    batch = rollout.tokens.shape[0]
    num_mb = cfg["num_minibatches"]
    mb = batch // num_mb

    def one_update(state, xs):
        idx, ptx_idx, j = xs
        sub = jax.tree.map(lambda x: x[idx], rollout)

        def policy_loss(params):
            logprobs, logits = response_logprobs(
                models, params, sub.prompt_tokens, sub.prompt_mask, sub.tokens, sub.mask
            )
            loss, metrics = losses.ppo_policy_loss(
                logprobs, sub.logprobs, sub.advantages, sub.mask, cfg["clip_eps"]
            )
            metrics["entropy"] = losses.entropy(logits, sub.mask)
            metrics["policy_loss"] = loss
            if ptx is not None:
                rows = jax.tree.map(lambda x: x[ptx_idx], ptx)
                with nn.logical_axis_rules(models.rules):
                    ptx_logits = models.policy.apply({"params": params}, rows["inputs"])
                ptx_loss, _ = losses.masked_nll(ptx_logits, rows["targets"], rows["loss_mask"])
                metrics["ptx_loss"] = ptx_loss
                loss = loss + cfg["ptx_coef"] * ptx_loss
            return loss, metrics

        def value_loss(params):
            values = response_values(
                models, params, sub.prompt_tokens, sub.prompt_mask, sub.tokens, sub.mask
            )
            loss, metrics = losses.ppo_value_loss(
                values, sub.values, sub.returns, sub.mask, cfg["value_clip_eps"]
            )
            metrics["value_loss"] = loss
            metrics["explained_variance"] = losses.explained_variance(values, sub.returns, sub.mask)
            return loss, metrics

        (_, pm), grads = jax.value_and_grad(policy_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        (_, vm), vgrads = jax.value_and_grad(value_loss, has_aux=True)(state.value_params)
        vupdates, value_opt_state = value_tx.update(
            vgrads, state.value_opt_state, state.value_params
        )
        value_params = optax.apply_updates(state.value_params, vupdates)
        count = state.step * updates_per_iteration + j + 1  # this run's optimizer updates
        ema = ema_update(state.ema_params, params, cfg["ema_decay"], count)
        state = state.replace(
            params=params,
            opt_state=opt_state,
            value_params=value_params,
            value_opt_state=value_opt_state,
            ema_params=ema,
        )
        return state, {
            **pm,
            **vm,
            "grad_norm": global_norm(grads),
            "value_grad_norm": global_norm(vgrads),
        }

    orders, ptx_orders = [], []
    ptx_rows = 0 if ptx is None else ptx["inputs"].shape[0]
    for epoch in range(cfg["epochs"]):
        key = jax.random.fold_in(rng, epoch)
        orders.append(jax.random.permutation(key, batch)[: num_mb * mb].reshape(num_mb, mb))
        if ptx is not None:
            perm = jax.random.permutation(jax.random.fold_in(key, 1), ptx_rows)
            ptx_orders.append(perm[: num_mb * (ptx_rows // num_mb)].reshape(num_mb, -1))
    idx = jnp.concatenate(orders)
    ptx_idx = jnp.concatenate(ptx_orders) if ptx is not None else jnp.zeros((len(idx), 1), int)
    updates_per_iteration = len(idx)
    state, metrics = jax.lax.scan(
        one_update, state, (idx, ptx_idx, jnp.arange(len(idx), dtype=jnp.int32))
    )
    return state, jax.tree.map(jnp.mean, metrics)


def adaptive_kl(kl_coef, kl, batch: int, target: float, horizon: float):
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / H)."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * batch / horizon)


def rollout_metrics(rollout: Rollout, eos_id: int) -> dict[str, jax.Array]:
    mask = rollout.mask
    kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1)  # (B,) sequence KL estimate
    ended = jnp.any((rollout.tokens == eos_id) & (mask > 0), axis=1)
    return {
        "score": rollout.raw_scores.mean(),
        "score_with_penalty": rollout.scores.mean(),
        "kl_to_ref": kl.mean(),
        "total_reward": rollout.rewards.sum(1).mean(),
        "response_length": mask.sum(1).mean(),
        "eos_rate": ended.astype(jnp.float32).mean(),
        "value_mean": losses.masked_mean(rollout.values, mask),
        "advantage_std": jnp.sqrt(losses.masked_mean(jnp.square(rollout.advantages), mask)),
    }


def _ppo_cfg(config, tokenizer) -> dict:
    p = config.ppo
    penalty = p.get("no_eos_penalty")
    return {
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "no_eos_penalty": None if penalty is None else float(penalty),
        "score_clip": float(p.get("score_clip", 0.0)),
        "gamma": float(p.gamma),
        "lam": float(p.lam),
        "whiten_advantages": bool(p.whiten_advantages),
        "whiten_rewards": bool(p.get("whiten_rewards", False)),
        "num_minibatches": int(p.num_minibatches),
        "epochs": int(p.epochs),
        "clip_eps": float(p.clip_eps),
        "value_clip_eps": float(p.value_clip_eps),
        "ptx_coef": float(config.ptx.coef),
        "ema_decay": float(p.ema_decay),
        "max_new_tokens": int(p.max_new_tokens),
        "temperature": float(p.temperature),
        "top_k": int(p.get("top_k", 0)),
        "top_p": float(p.get("top_p", 1.0)),
    }


def make_iteration(models: Models, cfg: dict, tx, value_tx, config, mesh):
    """The PPO iteration: (state, batch, rng, frozen) -> (state, metrics), four jitted phases."""
    gen = jax.jit(
        functools.partial(
            generate,
            models.policy,
            max_new_tokens=cfg["max_new_tokens"],
            eos_id=cfg["eos_id"],
            pad_id=cfg["pad_id"],
            temperature=cfg["temperature"],
            top_k=cfg["top_k"],
            top_p=cfg["top_p"],
            rules=models.rules,
        )
    )
    score = jax.jit(functools.partial(score_phase, models, cfg))
    advantages = jax.jit(functools.partial(advantage_phase, cfg))
    summarize = jax.jit(functools.partial(rollout_metrics, eos_id=cfg["eos_id"]))
    update = jax.jit(
        functools.partial(update_phase, models, cfg, tx, value_tx), donate_argnums=(0,)
    )
    target_kl, horizon = float(config.ppo.target_kl), float(config.ppo.kl_horizon)

    def iteration(state: PPOState, batch, rng, frozen):
        rng = jax.random.fold_in(rng, state.step)
        times = {}
        t0 = time.perf_counter()
        with mesh:
            samples = gen(
                state.params,
                batch["prompt_tokens"],
                batch["prompt_mask"],
                jax.random.fold_in(rng, 0),
            )
            jax.block_until_ready(samples)
            times["time/generate_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rollout = score(
                state,
                frozen["ref"],
                frozen["rm"],
                batch["prompt_tokens"],
                batch["prompt_mask"],
                samples,
            )
            rollout = advantages(rollout, state.kl_coef)
            jax.block_until_ready(rollout)
            times["time/score_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats = summarize(rollout)
            ptx = batch.get("ptx")
            state, update_metrics = update(state, rollout, ptx, jax.random.fold_in(rng, 1))
            if target_kl > 0:
                new_coef = adaptive_kl(
                    state.kl_coef, stats["kl_to_ref"], rollout.tokens.shape[0], target_kl, horizon
                )
                state = state.replace(kl_coef=new_coef)
            state = state.replace(step=state.step + 1)
            jax.block_until_ready(state.step)
            times["time/update_s"] = time.perf_counter() - t0
        metrics = {**stats, **update_metrics, "kl_coef": state.kl_coef}
        return state, {**metrics, **times}

    return iteration


@evaluators.register("ppo_eval")
class PolicyEval:
    """RM score, gold score (synthetic world), KL to the reference and length on held-out
    prompts, sampled from the EMA policy (``use_ema``) at the stage's sampling settings."""

    def __init__(self, context, use_ema: bool = True, prefix: str = "eval"):
        self.ctx, self.use_ema, self.prefix = context, use_ema, prefix
        models, cfg = context["models"], context["ppo_cfg"]
        self._gen = jax.jit(
            functools.partial(
                generate,
                models.policy,
                max_new_tokens=cfg["max_new_tokens"],
                eos_id=cfg["eos_id"],
                pad_id=cfg["pad_id"],
                temperature=cfg["temperature"],
                top_k=cfg["top_k"],
                top_p=cfg["top_p"],
                rules=models.rules,
            )
        )
        self._score = jax.jit(functools.partial(score_phase, models, cfg))

    def run(self, state):
        ctx = self.ctx
        tokens, mask = ctx["eval_prompts"]
        params = state.ema_params if self.use_ema else state.params
        samples = self._gen(params, tokens, mask, jax.random.key(1234))
        rollout = self._score(
            state.replace(params=params),
            ctx["frozen"]["ref"],
            ctx["frozen"]["rm"],
            tokens,
            mask,
            samples,
        )
        m = rollout.mask
        kl = np.asarray(((rollout.logprobs - rollout.ref_logprobs) * m).sum(1))
        out = {
            f"{self.prefix}/score": float(np.asarray(rollout.raw_scores).mean()),
            f"{self.prefix}/kl_to_ref": float(kl.mean()),
            f"{self.prefix}/response_length": float(np.asarray(m).sum(1).mean()),
        }
        tok = ctx["tokenizer"]
        texts = [tok.decode_until_eos(row) for row in np.asarray(samples.tokens)]
        scorer = ctx.get("gold_scorer")
        if scorer is not None:
            out[f"{self.prefix}/gold_score"] = float(np.mean(scorer(texts)))
        if jax.process_index() == 0:
            step = int(jax.device_get(state.step))
            scores = np.asarray(rollout.raw_scores)
            with open(os.path.join(ctx["workdir"], "samples.jsonl"), "a") as f:
                for prompt, text, score in zip(ctx["eval_texts"], texts, scores, strict=True):
                    row = {"step": step, "prompt": prompt, "response": text, "score": float(score)}
                    f.write(json.dumps(row) + "\n")
        return out


@evaluators.register("ppo_pretrain")
class PretrainEval:
    """The alignment tax in miniature: mean NLL of held-out pretraining text (``ptx.eval_rows``
    rows of ``ptx.text_files``, never used by PPO-ptx updates) under the policy (its EMA with
    ``use_ema``) and under the frozen SFT reference. PPO-ptx should regress less than PPO."""

    def __init__(self, context, use_ema: bool = True, prefix: str = "eval", batch_size: int = 64):
        rows = context.get("ptx_heldout")
        if rows is None or len(rows["inputs"]) == 0:
            raise ValueError("evaluator ppo_pretrain needs ptx.eval_rows > 0 and ptx.text_files")
        self.ctx, self.use_ema, self.prefix = context, use_ema, prefix
        n = len(rows["inputs"])
        batch_size = min(batch_size, n)
        pad = -n % batch_size  # padded rows carry no loss weight
        self.chunks = [
            {k: np.pad(v, ((0, pad), (0, 0)))[i : i + batch_size] for k, v in rows.items()}
            for i in range(0, n + pad, batch_size)
        ]
        models = context["models"]

        def nll_sum(params, rows):
            with nn.logical_axis_rules(models.rules):
                logits = models.policy.apply({"params": params}, rows["inputs"])  # (B, T, V)
            loss, count = losses.masked_nll(logits, rows["targets"], rows["loss_mask"])
            return loss * count, count

        self._nll_sum = jax.jit(nll_sum)
        self._sft_loss = None

    def _loss(self, params) -> float:
        sums = [self._nll_sum(params, chunk) for chunk in self.chunks]
        total, count = (float(sum(np.asarray(x[i]) for x in sums)) for i in (0, 1))
        return total / max(count, 1.0)

    def run(self, state):
        if self._sft_loss is None:
            self._sft_loss = self._loss(self.ctx["frozen"]["ref"])
        params = state.ema_params if self.use_ema else state.params
        return {
            f"{self.prefix}/pretrain_loss": self._loss(params),
            f"{self.prefix}/pretrain_loss_sft": self._sft_loss,
        }


def ptx_rows(config, tokenizer) -> tuple[dict, dict]:
    """(train, held-out) rows {inputs, targets, loss_mask} (R, T) of the pretraining text.

    ``ptx.eval_rows`` rows are held out of PPO-ptx updates for the ``ppo_pretrain`` evaluator.
    """
    docs = lm_data.read_text_files(list(config.ptx.text_files))
    arrays = lm_data.text_arrays(tokenizer, docs, int(config.ptx.seq_len))
    return lm_data.split(arrays, int(config.ptx.get("eval_rows", 0)), int(config.seed) + 2)


def _read_prompt_records(path: str) -> list[dict]:
    from instructrl.data import sources

    prompts, _ = sources.read_prompts(path)
    return [{"prompt": p} for p in prompts]


def load_prompts(path: str) -> list[dict]:
    """Prompt records: JSONL with a "prompt" field (full world records keep their spec)."""
    records = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if "prompt" not in rec:
                        return _read_prompt_records(path)
                    records.append(rec)
        return records
    return _read_prompt_records(path)


def encode_prompts(tokenizer, records, template: str, max_prompt_len: int):
    ids = [tokenizer.encode(template.format(prompt=r["prompt"])) for r in records]
    return left_pad(ids, tokenizer.pad_id, max_prompt_len)


def world_gold_scorer(config, records):
    """A callable(texts) -> gold scores for world prompt records, or None for other data."""
    if not config.get("world") or not records or "spec" not in records[0]:
        return None
    from instructrl.world import World

    world = World.build(seed=int(config.world.seed))
    return lambda texts: [world.score(r, t)["score"] for r, t in zip(records, texts, strict=True)]


def run(config, workdir: str) -> PPOState:
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(config.tokenizer)
    mcfg = model_config(config, tokenizer)
    mcfg = dataclasses.replace(mcfg, dropout=0.0)  # dropout off in rollouts and updates
    rules = sharding.rules_from_config(config.get("logical_rules"))
    models = Models(Transformer(mcfg, head="lm"), Transformer(mcfg, head="scalar"), rules)
    mesh = sharding.make_mesh(config.mesh)
    cfg = _ppo_cfg(config, tokenizer)
    template = config.data.get("template", "{prompt}\n\n")
    prompt_len = int(config.data.max_prompt_len)

    records = load_prompts(config.data.path)
    eval_records = records[: int(config.data.eval_prompts)]
    train_records = records[int(config.data.eval_prompts) :]
    tokens, mask = encode_prompts(tokenizer, train_records, template, prompt_len)
    batch_size = int(config.ppo.batch_size)
    prompts = lm_data.EpochBatcher(
        {"prompt_tokens": tokens, "prompt_mask": mask},
        batch_size,
        int(config.seed),
        sharding.host_batch_slice(batch_size),
    )
    ptx_batcher, ptx_heldout = None, None
    eval_types = {e.get("type") for e in (config.get("evals") or {}).values()}
    if float(config.ptx.coef) > 0 or "ppo_pretrain" in eval_types:
        ptx_train, ptx_heldout = ptx_rows(config, tokenizer)
    if float(config.ptx.coef) > 0:
        ptx_batch = batch_size * int(config.ptx.multiplier)
        ptx_batcher = lm_data.EpochBatcher(
            ptx_train, ptx_batch, int(config.seed) + 1, sharding.host_batch_slice(ptx_batch)
        )

    total = int(config.ppo.iterations)
    # Optimizer steps: one per minibatch; warmup_steps counts them too (paper: 10 iterations).
    updates = total * int(config.ppo.epochs) * int(config.ppo.num_minibatches)
    tx, _ = make_optimizer(_opt(config.optimizer, updates))
    value_tx, _ = make_optimizer(_opt(config.value_optimizer, updates))

    def init(rng):
        example = jnp.zeros((1, 8), jnp.int32)
        with nn.logical_axis_rules(rules):
            policy = models.policy.init(jax.random.fold_in(rng, 0), example)["params"]
            value = models.scalar.init(jax.random.fold_in(rng, 1), example)["params"]
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            params=policy,
            opt_state=tx.init(policy),
            value_params=value,
            value_opt_state=value_tx.init(value),
            ema_params=policy,
            kl_coef=jnp.asarray(float(config.ppo.kl_coef), jnp.float32),
        )

    with mesh:
        state, shardings, abstract = sharding.create_sharded(
            init, mesh, rules, jax.random.key(int(config.seed))
        )
    frozen = {
        "ref": checkpoint.latest_params(config.init_from, abstract.params),
        "rm": checkpoint.latest_params(config.ppo.reward_model, abstract.value_params),
    }

    def init_from(state):
        value = checkpoint.latest_params(
            config.ppo.get("value_from") or config.ppo.reward_model, abstract.value_params
        )
        policy = frozen["ref"]
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (state is donated)
        return state.replace(
            params=copy(policy),
            opt_state=tx.init(policy),
            ema_params=copy(policy),
            value_params=value,
            value_opt_state=value_tx.init(value),
        )

    class Batcher:
        steps_per_epoch, size = prompts.steps_per_epoch, prompts.size

        def batch(self, step):
            b = prompts.batch(step)
            if ptx_batcher is not None:
                b["ptx"] = ptx_batcher.batch(step)
            return b

    iteration = make_iteration(models, cfg, tx, value_tx, config, mesh)

    def step_fn(state, batch, rng):
        return iteration(state, batch, rng, frozen)

    eval_tokens, eval_mask = encode_prompts(tokenizer, eval_records, template, prompt_len)
    context = {
        "config": config,
        "models": models,
        "ppo_cfg": cfg,
        "mesh": mesh,
        "rules": rules,
        "tokenizer": tokenizer,
        "frozen": frozen,
        "eval_prompts": (jnp.asarray(eval_tokens), jnp.asarray(eval_mask)),
        "gold_scorer": world_gold_scorer(config, eval_records),
        "eval_texts": [r["prompt"] for r in eval_records],
        "ptx_heldout": ptx_heldout,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "run_info.json"), "w") as f:
            json.dump(
                {
                    "train_prompts": len(train_records),
                    "eval_prompts": len(eval_records),
                    "iterations": total,
                    "config": json.loads(config.to_json_best_effort()),
                },
                f,
                indent=2,
            )
    state = fit(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        state_shardings=shardings,
        abstract_state=abstract,
        step_fn=step_fn,
        batcher=Batcher(),
        total_steps=total,
        tokens_per_step=lambda b: int(batch_size * cfg["max_new_tokens"]),
        init_from=init_from,
        eval_context=context,
        prefix="ppo",
        jit_step=False,
    )
    checkpoint.export_params(workdir, state.ema_params, {"params": "ema", "iterations": total})
    return state


def _opt(opt_cfg, total):
    c = opt_cfg.copy_and_resolve_references()
    with c.unlocked():
        c.total_steps = total
    return c
