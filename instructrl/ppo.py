"""PPO and PPO-ptx against the frozen reward model (paper step 3, eq. 2, appendix C.3/C.4).

objective(phi) = E_{(x,y)~pi}[ r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ]
                 + gamma * E_{x~D_pretrain}[ log pi(x) ]
kl_coef is beta, ptx_coef is gamma (plain "PPO": gamma = 0). The policy starts from SFT; the
reference policy is the frozen SFT; the reward model (normalized, frozen) scores the response
as it was trained to (its last token or its mean over the response, ``model.reward_readout``);
a separate value model starts from the RM. One iteration composes four jitted
phases over a ``Rollout``: generate -> score -> advantages -> update, the update being
epochs x minibatches as ``lax.scan``. Frozen params are arguments, never captured constants.
Every hyperparameter reaches the math through one frozen ``Hparams``, built from the config in
``Hparams.from_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from instructrl import lora, losses, sampler, scoring, sharding
from instructrl.data import lm as lm_data
from instructrl.data import sources
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.policy_io import check_reward_readout
from instructrl.train import Run, global_norm, lazy_state, optimizer_config


@flax.struct.dataclass
class PPOState:
    step: jax.Array  # () int32: PPO iterations done
    params: Any  # policy
    opt_state: Any
    value_params: Any
    value_opt_state: Any
    ema_params: Any  # EMA of the policy (paper: 0.992), used for evaluation
    kl_coef: jax.Array  # () float32, beta (adaptive when target_kl > 0)


@flax.struct.dataclass
class Rollout:
    prompt_tokens: jax.Array  # (B, P) left-padded
    prompt_mask: jax.Array  # (B, P)
    tokens: jax.Array  # (B, N) response
    mask: jax.Array  # (B, N) response tokens (through EOS)
    logprobs: jax.Array  # (B, N) policy, teacher-forced under the sampling distribution
    ref_logprobs: jax.Array  # (B, N) reference (SFT) policy
    values: jax.Array  # (B, N) value model
    scores: jax.Array  # (B,) RM score (or the no-EOS penalty)
    raw_scores: jax.Array  # (B,) RM score before any penalty
    rewards: jax.Array | None = None  # (B, N)
    advantages: jax.Array | None = None  # (B, N)
    returns: jax.Array | None = None  # (B, N)


ESTIMATORS = ("gae", "rloo", "grpo")


def scalar_abstract(models: scoring.Models, mesh, rules):
    """The sharded abstract params of a scalar-head model (the reward model's)."""

    def init(rng):
        with nn.logical_axis_rules(rules):
            return models.scalar.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

    return sharding.abstract_sharded(init, mesh, rules, jax.random.key(0))[1]


@dataclasses.dataclass(frozen=True)
class Hparams:
    """Every PPO hyperparameter, as the pure phases read it (appendix C.3/C.4 defaults in
    configs/ppo.py:paper)."""

    kl_coef: float  # beta of eq. 2 (its starting value when target_kl > 0)
    target_kl: float  # > 0: adaptive controller (Ziegler et al. 2019) toward this KL
    kl_horizon: float
    ptx_coef: float  # gamma of eq. 2 (0: plain PPO)
    clip_eps: float
    value_clip_eps: float
    gamma: float  # GAE discount (paper: 1, no discount)
    lam: float
    whiten_advantages: bool
    whiten_rewards: bool  # scale the per-token rewards by their batch std
    score_clip: float  # > 0: clip RM scores to [-score_clip, score_clip]
    no_eos_penalty: float | None  # the score of a response cut without EOS
    num_minibatches: int
    epochs: int
    ema_decay: float
    max_new_tokens: int
    sampling: scoring.Sampling
    eos_id: int
    pad_id: int
    pack: bool = False  # score and update on packed (prompt, response) rows (make_step)
    # "gae": PPO's value model and GAE; "rloo" / "grpo": no value model, advantages from the
    # other answers to the same prompt (``losses.group_advantages``), group_size answers each.
    estimator: str = "gae"
    group_size: int = 1
    # LoRA with lora.compute "merged": the update merges the adapters (lora.value_and_grad).
    lora_merge_alpha: float | None = None

    @classmethod
    def from_config(cls, config, tokenizer) -> Hparams:
        p = config.ppo
        penalty = p.get("no_eos_penalty")
        spec = lora.Spec.from_config(config)
        estimator, group_size = str(p.get("estimator", "gae")), int(p.get("group_size", 1))
        if estimator not in ESTIMATORS:
            raise ValueError(f"config.ppo.estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator != "gae" and group_size < 2:
            raise ValueError(f"config.ppo.group_size: {estimator} needs >= 2 answers per prompt")
        if int(p.batch_size) % group_size:
            raise ValueError(
                f"config.ppo.batch_size={p.batch_size} is not a multiple of group_size={group_size}"
            )
        return cls(
            kl_coef=float(p.kl_coef),
            target_kl=float(p.target_kl),
            kl_horizon=float(p.kl_horizon),
            ptx_coef=float(config.ptx.coef),
            clip_eps=float(p.clip_eps),
            value_clip_eps=float(p.value_clip_eps),
            gamma=float(p.gamma),
            lam=float(p.lam),
            whiten_advantages=bool(p.whiten_advantages),
            whiten_rewards=bool(p.get("whiten_rewards", False)),
            score_clip=float(p.get("score_clip", 0.0)),
            no_eos_penalty=None if penalty is None else float(penalty),
            num_minibatches=int(p.num_minibatches),
            epochs=int(p.epochs),
            ema_decay=float(p.ema_decay),
            max_new_tokens=int(p.max_new_tokens),
            sampling=scoring.Sampling(float(p.temperature), int(p.top_k), float(p.top_p)),
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            pack=bool(p.get("pack", False)),
            estimator=estimator,
            group_size=group_size,
            lora_merge_alpha=None if spec is None else spec.merge_alpha,
        )

    @property
    def critic(self) -> bool:
        """Whether a value model is trained (GAE) or the advantages come from the group."""
        return self.estimator == "gae"

    def generate_fn(self, models: scoring.Models):
        """The jitted sampler at these settings: (params, prompt_tokens, prompt_mask, rng)."""
        s = self.sampling
        return sampler.bind(models.policy, max_new_tokens=self.max_new_tokens, eos_id=self.eos_id,
                            pad_id=self.pad_id, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, rules=models.rules)  # fmt: skip


def score_phase(models, hp: Hparams, params, value_params, ref_params, rm_params,
                prompt_tokens, prompt_mask, samples, packed=None) -> Rollout:  # fmt: skip
    """Phase 2: policy / reference log-probs, values and RM scores of the samples (over
    ``packed`` rows, ``scoring.pack`` of the same pairs, when given)."""
    args = (prompt_tokens, prompt_mask, samples.tokens, samples.mask)
    reference = hp.sampling.reference()
    logprobs, _ = scoring.response_logprobs(models, params, *args, hp.sampling, packed=packed)
    ref_logprobs, _ = scoring.response_logprobs(models, ref_params, *args, reference, packed=packed)
    if hp.critic:
        values = scoring.response_values(models, value_params, *args, packed=packed)
    else:
        values = jnp.zeros(samples.tokens.shape, jnp.float32)
    raw = scoring.reward_scores(models, rm_params, *args, packed=packed)
    scores = raw
    if hp.no_eos_penalty is not None:
        ended = scoring.ended_with_eos(samples.tokens, samples.mask, hp.eos_id)
        scores = jnp.where(ended, raw, hp.no_eos_penalty)
    mask = samples.mask.astype(jnp.float32)
    return Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tokens=samples.tokens,
        mask=mask,
        logprobs=logprobs * mask,
        ref_logprobs=ref_logprobs * mask,
        values=values * mask,
        scores=scores,
        raw_scores=raw,
    )


def advantage_phase(hp: Hparams, rollout: Rollout, kl_coef) -> Rollout:
    """Phase 3: KL-penalized rewards (optionally clipped scores, whitened rewards), GAE,
    advantage whitening. kl_coef: beta now (``hp.kl_coef``, or the adaptive controller's)."""
    scores = rollout.scores
    if hp.score_clip:
        scores = jnp.clip(scores, -hp.score_clip, hp.score_clip)
    rewards = losses.kl_penalized_rewards(
        scores, rollout.logprobs, rollout.ref_logprobs, rollout.mask, kl_coef
    )
    if hp.whiten_rewards:  # scale only: the sign of a reward carries meaning
        rewards = losses.whiten(rewards, rollout.mask, shift_mean=False)
    if hp.critic:
        advantages, returns = losses.gae(rewards, rollout.values, rollout.mask, hp.gamma, hp.lam)
    else:
        # RLOO: the return is the score less beta times the sequence KL (the same reward PPO
        # sums); GRPO: the score alone, its KL a loss term of the update (``update_phase``).
        returns = rewards.sum(1) if hp.estimator == "rloo" else scores
        advantages = losses.group_advantages(returns, hp.group_size, hp.estimator)
        advantages = advantages[:, None] * rollout.mask  # every token of the answer
        returns = jnp.zeros_like(rollout.mask)
    if hp.whiten_advantages and hp.estimator != "grpo":  # GRPO's are normalized per group
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


def minibatch_order(rng, hp: Hparams, batch: int, ptx_rows: int):
    """Row indices of every update: (epochs * num_minibatches, mb) rollout rows and (same,
    ptx_mb) pretraining rows, a fresh permutation per epoch. With fewer pretraining rows than
    minibatches each minibatch takes one row, the rows repeating."""
    num_mb = hp.num_minibatches
    mb, ptx_mb = batch // num_mb, max(ptx_rows // num_mb, 1)
    orders, ptx_orders = [], []
    for epoch in range(hp.epochs):
        key = jax.random.fold_in(rng, epoch)
        orders.append(jax.random.permutation(key, batch)[: num_mb * mb].reshape(num_mb, mb))
        if ptx_rows:
            perm = jax.random.permutation(jax.random.fold_in(key, 1), ptx_rows)
            ptx_orders.append(jnp.resize(perm, num_mb * ptx_mb).reshape(num_mb, ptx_mb))
    idx = jnp.concatenate(orders)
    return idx, jnp.concatenate(ptx_orders) if ptx_rows else jnp.zeros((len(idx), 1), int)


def row_counts(pairs: int, multiple: int = 1) -> tuple[int, ...]:
    """Candidate row counts for packing ``pairs`` (prompt, response) pairs: half of them (a
    rollout's pairs fill about half of their padded rows) or all, rounded up to ``multiple``
    (the devices the rows are split over). Two shapes at most, so two compilations."""
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    return tuple(sorted({up(max(pairs // 2, 1)), up(pairs)}))


def packed_plan(hp: Hparams, rng, prompt_tokens, prompt_mask, tokens, mask, ptx_rows: int,
                multiple: int = 1) -> dict:  # fmt: skip
    """The update's minibatches (``minibatch_order``, the order the unpacked update draws)
    with each minibatch's pairs packed into rows of P + N tokens, every minibatch with the
    same row count (the largest any needs). Host arrays in; the plan ``update_phase`` takes."""
    idx, ptx_idx = jax.device_get(minibatch_order(rng, hp, tokens.shape[0], ptx_rows))
    row_len = prompt_tokens.shape[1] + tokens.shape[1]
    arrays = [np.asarray(a) for a in (prompt_tokens, prompt_mask, tokens, mask)]
    candidates = row_counts(idx.shape[1], multiple)
    packs = [scoring.pack(*(a[i] for a in arrays), row_len, candidates) for i in idx]
    rows = max(p.tokens.shape[0] for p in packs)
    packs = [scoring.pack(*(a[i] for a in arrays), row_len, (rows,)) for i in idx]
    packed = jax.tree.map(lambda *xs: np.stack(xs), *packs)
    return {"idx": idx, "ptx_idx": ptx_idx, "packed": packed}


def update_phase(models, hp: Hparams, tx, value_tx, state: PPOState, rollout: Rollout, ptx, rng,
                 plan=None, bases=None):  # fmt: skip
    """Phase 4: ``epochs`` x ``num_minibatches`` clipped-PPO updates as one ``lax.scan``.

    ptx: None or {inputs, targets, loss_mask} (B_ptx, T) pretraining rows, split into the same
    number of minibatches; its NLL times ptx_coef is added to the policy loss (PPO-ptx).
    plan: None (the minibatches are ``minibatch_order(rng, ...)``), or ``packed_plan``'s
    {idx, ptx_idx, packed}: the same order with each minibatch's pairs packed (scoring.Packed
    with a leading minibatch axis). bases: None, or with LoRA {"policy", "value"}: the frozen
    weights (the reference policy, the reward model) the state's adapters adapt.
    """
    policy_base, value_base = (None, None) if bases is None else (bases["policy"], bases["value"])
    ptx_rows = 0 if ptx is None else ptx["inputs"].shape[0]
    if plan is None:
        idx, ptx_idx = minibatch_order(rng, hp, rollout.tokens.shape[0], ptx_rows)
        packed = None
    else:
        idx, ptx_idx, packed = plan["idx"], plan["ptx_idx"], plan["packed"]
    updates_per_iteration = len(idx)

    def one_update(state, xs):
        idx, ptx_idx, j, pk = xs
        sub = jax.tree.map(lambda x: x[idx], rollout)
        args = (sub.prompt_tokens, sub.prompt_mask, sub.tokens, sub.mask)

        def policy_loss(params):
            logprobs, logits = scoring.response_logprobs(
                models, params, *args, hp.sampling, packed=pk
            )
            loss, metrics = losses.ppo_policy_loss(
                logprobs, sub.logprobs, sub.advantages, sub.mask, hp.clip_eps
            )
            metrics["entropy"] = losses.entropy(logits, sub.mask)
            metrics["policy_loss"] = loss
            if hp.estimator == "grpo":  # GRPO's KL to the reference, a loss term
                kl = losses.masked_mean(losses.kl_k3(logprobs, sub.ref_logprobs), sub.mask)
                metrics["kl_loss"] = kl
                loss = loss + state.kl_coef * kl
            if ptx is not None:
                rows = jax.tree.map(lambda x: x[ptx_idx], ptx)
                with nn.logical_axis_rules(models.rules):
                    ptx_logits = models.policy.apply({"params": params}, rows["inputs"])
                ptx_loss, _ = losses.masked_nll(ptx_logits, rows["targets"], rows["loss_mask"])
                metrics["ptx_loss"] = ptx_loss
                loss = loss + hp.ptx_coef * ptx_loss
            return loss, metrics

        def value_loss(params):
            values = scoring.response_values(models, params, *args, packed=pk)
            loss, metrics = losses.ppo_value_loss(
                values, sub.values, sub.returns, sub.mask, hp.value_clip_eps
            )
            metrics["value_loss"] = loss
            metrics["explained_variance"] = losses.explained_variance(values, sub.returns, sub.mask)
            return loss, metrics

        (_, pm), grads = lora.value_and_grad(policy_loss, state.params, policy_base,
                                             merge_alpha=hp.lora_merge_alpha)  # fmt: skip
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        value_params, value_opt_state, vm = state.value_params, state.value_opt_state, {}
        if hp.critic:
            (_, vm), vgrads = lora.value_and_grad(value_loss, state.value_params, value_base,
                                                  merge_alpha=hp.lora_merge_alpha)  # fmt: skip
            vupdates, value_opt_state = value_tx.update(
                vgrads, state.value_opt_state, state.value_params
            )
            value_params = optax.apply_updates(state.value_params, vupdates)
            vm["value_grad_norm"] = global_norm(vgrads)
        count = state.step * updates_per_iteration + j + 1  # this run's optimizer updates
        state = state.replace(
            params=params,
            opt_state=opt_state,
            value_params=value_params,
            value_opt_state=value_opt_state,
            ema_params=ema_update(state.ema_params, params, hp.ema_decay, count),
        )
        return state, {**pm, **vm, "grad_norm": global_norm(grads)}

    xs = (idx, ptx_idx, jnp.arange(len(idx), dtype=jnp.int32), packed)
    state, metrics = jax.lax.scan(one_update, state, xs)
    return state, jax.tree.map(jnp.mean, metrics)


def adaptive_kl(kl_coef, kl, batch: int, target: float, horizon: float):
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / H)."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * batch / horizon)


def rollout_metrics(rollout: Rollout, eos_id: int) -> dict[str, jax.Array]:
    mask = rollout.mask
    ended = scoring.ended_with_eos(rollout.tokens, mask, eos_id)
    return {
        "score": rollout.raw_scores.mean(),
        "score_with_penalty": rollout.scores.mean(),
        "kl_to_ref": scoring.sequence_kl(rollout.logprobs, rollout.ref_logprobs, mask).mean(),
        "total_reward": rollout.rewards.sum(1).mean(),
        "response_length": mask.sum(1).mean(),
        "eos_rate": ended.astype(jnp.float32).mean(),
        "value_mean": losses.masked_mean(rollout.values, mask),
        "advantage_std": jnp.sqrt(losses.masked_mean(jnp.square(rollout.advantages), mask)),
    }


def state_init(models: scoring.Models, hp: Hparams, tx, value_tx, adapters: bool = False):
    """``init(rng) -> PPOState`` (Flax-boxed; its logical axes give the shardings): the policy,
    its EMA and the value model (none, ``{}``, for RLOO and GRPO), freshly initialized
    (``run`` then loads SFT and the RM). ``adapters`` (LoRA): the state holds the policy's
    adapters and the value model's adapters and scalar head only."""

    def init(rng):
        example = jnp.zeros((1, 8), jnp.int32)
        with nn.logical_axis_rules(models.rules):
            policy = models.policy.init(jax.random.fold_in(rng, 0), example)["params"]
            value = {}
            if hp.critic:
                value = models.scalar.init(jax.random.fold_in(rng, 1), example)["params"]
        if adapters:
            policy, value = lora.split(policy)[1], lora.split(value, ("scalar_head",))[1]
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            params=policy,
            opt_state=tx.init(policy),
            value_params=value,
            value_opt_state=value_tx.init(value),
            ema_params=policy,
            kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
        )

    return init


def phases(models: scoring.Models, hp: Hparams, tx, value_tx) -> dict[str, Callable]:
    """The jitted phases of one iteration, as ``make_step`` composes them (and ``instructrl
    compile`` lowers them): generate(params, prompt_tokens, prompt_mask, rng) -> Samples;
    score(params, value_params, ref_params, rm_params, prompt_tokens, prompt_mask, samples)
    -> Rollout; advantages(rollout, kl_coef); summarize(rollout); update(state, rollout, ptx,
    rng) -> (state, metrics), the state donated."""
    return {
        "generate": hp.generate_fn(models),
        "score": jax.jit(functools.partial(score_phase, models, hp)),
        "advantages": jax.jit(functools.partial(advantage_phase, hp)),
        "summarize": jax.jit(functools.partial(rollout_metrics, eos_id=hp.eos_id)),
        "update": jax.jit(
            functools.partial(update_phase, models, hp, tx, value_tx), donate_argnums=(0,)
        ),
    }


def make_step(models: scoring.Models, hp: Hparams, tx, value_tx, frozen: dict, mesh=None,
              adapters: lora.Spec | None = None):  # fmt: skip
    """The PPO iteration as ``step(state, batch, rng) -> (state, metrics)``: four jitted phases
    (the frozen reference and RM params are their arguments). batch: prompt_tokens,
    prompt_mask (B, P) [, ptx rows]. Metrics carry each phase's seconds as ``time/*``.

    With LoRA (``adapters``) the state's params are adapters over ``frozen["ref"]`` (policy)
    and ``frozen["value_base"]`` (value model): the sampler draws from the merged policy
    (``lora.merged``: plain weights, plain speed), scoring and the update apply the adapters.

    With ``hp.pack``, scoring and the update run over packed (prompt, response) rows built on
    the host from the samples (``scoring.pack``, ``packed_plan``; on many hosts every process
    gathers the rollout and builds the same plan): the same rollout and the same minibatches,
    over about half the tokens. ``mesh`` places the packed rows over its batch axes."""
    jitted = phases(models, hp, tx, value_tx)
    gen, score, advantages = jitted["generate"], jitted["score"], jitted["advantages"]
    summarize, update = jitted["summarize"], jitted["update"]
    devices = 1 if mesh is None else sharding.batch_shards(mesh)

    def place(packed: scoring.Packed, axis: int = 0):
        """Packed rows split over the mesh's batch axes (indices replicated); every process
        holds the whole host copy and places its own devices' rows."""
        if mesh is None:
            return packed
        rows = jax.sharding.PartitionSpec(*([None] * axis), sharding.BATCH_AXES)
        whole = jax.sharding.PartitionSpec()
        specs = packed.replace(tokens=rows, positions=rows, segment_ids=rows, index=whole,
                               last=whole)  # fmt: skip
        return sharding.put_global(packed, mesh, specs)

    bases = None
    if adapters is not None:
        bases = {"policy": frozen["ref"], "value": frozen["value_base"]}

    def step(state: PPOState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        prompts = (batch["prompt_tokens"], batch["prompt_mask"])
        t0 = time.perf_counter()
        policy = state.params
        if adapters is not None:  # merged once: the sampler's, and scoring's when "merged"
            policy = lora.merged(frozen["ref"], policy, adapters.alpha)
        samples = jax.block_until_ready(gen(policy, *prompts, jax.random.fold_in(rng, 0)))
        t1 = time.perf_counter()
        params = (state.params, state.value_params, frozen["ref"], frozen["rm"])
        if adapters is not None and adapters.compute == "merged":
            value = state.value_params and lora.merged(bases["value"], state.value_params,
                                                       adapters.alpha)  # fmt: skip
            params = (policy, value, *params[2:])
        elif adapters is not None:
            params = (lora.combine(bases["policy"], state.params),
                      lora.combine(bases["value"], state.value_params), *params[2:])  # fmt: skip
        packed = plan = None
        if hp.pack:  # many hosts: each gathers the whole rollout and packs it the same way
            host = sharding.to_host((*prompts, samples.tokens, samples.mask))
            row_len = host[0].shape[1] + host[2].shape[1]
            packed = place(scoring.pack(*host, row_len, row_counts(len(host[0]), devices)))
            ptx_rows = 0 if batch.get("ptx") is None else len(batch["ptx"]["inputs"])
            plan = packed_plan(hp, jax.random.fold_in(rng, 1), *host, ptx_rows, devices)
            plan["packed"] = place(plan["packed"], axis=1)
        rollout = advantages(score(*params, *prompts, samples, packed), state.kl_coef)
        jax.block_until_ready(rollout)
        del policy, params  # LoRA's merged copy is not held through the update
        t2 = time.perf_counter()
        stats = summarize(rollout)
        state, update_metrics = update(
            state, rollout, batch.get("ptx"), jax.random.fold_in(rng, 1), plan, bases
        )
        if hp.target_kl > 0:
            kl_coef = adaptive_kl(state.kl_coef, stats["kl_to_ref"], rollout.tokens.shape[0],
                                  hp.target_kl, hp.kl_horizon)  # fmt: skip
            state = state.replace(kl_coef=kl_coef)
        state = jax.block_until_ready(state.replace(step=state.step + 1))
        times = {"time/sampling": t1 - t0, "time/scoring": t2 - t1,
                 "time/update": time.perf_counter() - t2}  # fmt: skip
        return state, {**stats, **update_metrics, "kl_coef": state.kl_coef, **times}

    return step


def merged_state(adapters: lora.Spec, frozen: dict, state: PPOState) -> PPOState:
    """A LoRA state with plain params (the adapters merged), what evaluators read."""
    alpha = adapters.alpha
    return state.replace(
        params=lora.merged(frozen["ref"], state.params, alpha),
        ema_params=lora.merged(frozen["ref"], state.ema_params, alpha),
        value_params=state.value_params  # RLOO, GRPO: none
        and lora.merged(frozen["value_base"], state.value_params, alpha),
    )


def run(config, workdir: str) -> PPOState:
    """Train PPO (``ptx.coef`` 0) or PPO-ptx in ``workdir``; export the EMA policy."""
    run = Run(config, workdir, deterministic=True)  # dropout off in rollouts and updates
    models = scoring.Models(
        Transformer(run.model_cfg, head="lm"), Transformer(run.model_cfg, head="scalar"), run.rules
    )
    hp = Hparams.from_config(config, run.tokenizer)
    template, prompt_len = (
        config.data.get("template", "{prompt}\n\n"),
        int(config.data.max_prompt_len),
    )
    records = sources.read_prompt_records(config.data.path)
    eval_records = records[: int(config.data.eval_prompts)]
    train_records = records[int(config.data.eval_prompts) :]
    tokens, mask = lm_data.encode_prompts(run.tokenizer, train_records, template, prompt_len)
    batch_size = int(config.ppo.batch_size)
    # RLOO / GRPO: batch_size answers to batch_size / group_size prompts, each k times over.
    prompts = lm_data.EpochBatcher(
        {"prompt_tokens": tokens, "prompt_mask": mask},
        batch_size // hp.group_size,
        int(config.seed),
        sharding.host_batch_slice(batch_size // hp.group_size),
    )
    ptx_batcher, ptx_heldout = None, None
    eval_types = {e.get("type") for e in (config.get("evals") or {}).values()}
    if hp.ptx_coef > 0 or "ppo_pretrain" in eval_types:
        ptx_train, ptx_heldout = lm_data.text_split(
            run.tokenizer, list(config.ptx.text_files), int(config.ptx.seq_len),
            int(config.ptx.get("eval_rows", 0)), int(config.seed) + 2,
        )  # fmt: skip
    if hp.ptx_coef > 0:
        ptx_batch = batch_size * int(config.ptx.multiplier)
        ptx_batcher = lm_data.EpochBatcher(
            ptx_train, ptx_batch, int(config.seed) + 1, sharding.host_batch_slice(ptx_batch)
        )

    iterations = int(config.ppo.iterations)
    # Optimizer steps: one per minibatch; warmup_steps counts them too (paper: 10 iterations).
    updates = iterations * hp.epochs * hp.num_minibatches
    tx, _ = make_optimizer(optimizer_config(config.optimizer, updates))
    value_tx, _ = make_optimizer(optimizer_config(config.value_optimizer, updates))

    # The policy starts from SFT and the value model from the RM (init_from): the fresh
    # initialization is never built, only its shardings. LoRA: the state holds adapters only.
    adapters = run.lora
    initial, shardings, abstract = lazy_state(
        state_init(models, hp, tx, value_tx, adapters is not None),
        run.mesh, run.rules, jax.random.key(int(config.seed)),
    )  # fmt: skip
    rm_abstract = abstract.value_params if hp.critic else None
    if adapters is not None or not hp.critic:  # the RM's own tree (no adapters)
        rm_abstract = lora.split(scalar_abstract(models, run.mesh, run.rules))[0]
    example = {"tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
    check_reward_readout(run.model_cfg, config.ppo.reward_model)
    frozen = {
        # The reference policy; with LoRA also the base of the policy's adapters.
        "ref": run.lora_base(models.policy, example)
        if adapters is not None
        else run.load(config.init_from, abstract.params),
        "rm": run.load(config.ppo.reward_model, rm_abstract),
    }
    value_from = config.ppo.get("value_from") or config.ppo.reward_model
    if adapters is not None:  # the value model's adapters adapt the RM (or value_from)
        frozen["value_base"] = frozen["rm"]
        if value_from != config.ppo.reward_model and hp.critic:
            frozen["value_base"] = run.load(value_from, rm_abstract)

    def init_from(initial):
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (state is donated)
        value = {}  # RLOO, GRPO: no value model
        if adapters is not None:  # fresh adapters; the value head starts as the RM's
            policy = initial().params
            if hp.critic:
                head = copy(frozen["value_base"]["scalar_head"])
                value = {**initial().value_params, "scalar_head": head}
        else:
            policy = frozen["ref"]
            if hp.critic:
                value = run.load(value_from, abstract.value_params)
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            params=copy(policy),
            opt_state=tx.init(policy),
            value_params=value,
            value_opt_state=value_tx.init(value),
            ema_params=copy(policy),
            kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
        )

    class Batcher:
        def batch(self, step):
            b = {k: np.repeat(v, hp.group_size, axis=0) for k, v in prompts.batch(step).items()}
            if ptx_batcher is not None:
                b["ptx"] = ptx_batcher.batch(step)
            return b

    eval_tokens, eval_mask = lm_data.encode_prompts(
        run.tokenizer, eval_records, template, prompt_len
    )
    context = {
        "models": models,
        "ppo_hparams": hp,
        "frozen": frozen,
        "eval_prompts": (jnp.asarray(eval_tokens), jnp.asarray(eval_mask)),
        "eval_records": eval_records,
        "world": config.get("world"),
        "ptx_heldout": ptx_heldout,
    }
    run.write_info(train_prompts=len(train_records), eval_prompts=len(eval_records))
    state = run.fit(
        initial=initial,
        shardings=shardings,
        abstract=abstract,
        step_fn=make_step(models, hp, tx, value_tx, frozen, run.mesh, adapters),
        batcher=Batcher(),
        steps=iterations,
        init_from=init_from,
        eval_context=context,
        prefix="ppo",
        jit_step=False,
        tokens_per_step=lambda b: int(batch_size * hp.max_new_tokens),
        view=None if adapters is None else functools.partial(merged_state, adapters, frozen),
    )
    info = {"params": "ema", "iterations": iterations}
    run.export(state.ema_params, info, frozen["ref"])
    run.finish(iterations=iterations)
    return state
