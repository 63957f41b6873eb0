"""DPO (Rafailov et al. 2023) on the reward model's K-way rankings, from the SFT policy.

Direct preference optimization needs no reward model and no sampling: the policy's implicit
reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)) (the reference is the SFT
policy it starts from), and it is trained on the labelers' rankings with the RM's own loss,
eq. (1) over every C(K,2) pair of a prompt in one batch element (``dpo.loss="pairwise"``),
or with the Plackett-Luce likelihood of the whole ranking (``"listwise"``; DPO paper,
appendix A.3); both are ``losses.dpo_loss``. Ties make no comparison, as for the RM.

Batches are the RM's packed rankings (``PackedRankingBatcher``: each ranking's responses
behind one copy of its prompt), with the flat position of the state before each response
token, so a response's log-prob sums its tokens' log-probs in one forward pass. The
reference's log-probs are computed in the same step from its frozen params (an argument of
the jitted step, ``Run.fit(frozen=...)``). Dropout is off (both log-probs must be of the
same deterministic model). The final params are exported like PPO's policy; the stage's
evaluation is the implicit reward's ranking accuracy on the validation rankings, by labeler
group (``dpo_accuracy``), beside the RM's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from instructrl import evaluators, lora, losses, sharding
from instructrl.data.comparisons import PackedRankingBatcher, load_arrays, response_lengths
from instructrl.model import Transformer
from instructrl.optim import make_optimizer
from instructrl.train import (
    Run,
    TrainState,
    apply_gradients,
    lazy_state,
    optimizer_config,
    total_steps,
    train_state_init,
)

LOSSES = ("pairwise", "listwise")


@dataclasses.dataclass(frozen=True)
class Hparams:
    beta: float = 0.1  # the implicit reward's scale (DPO's beta; the KL penalty's weight)
    listwise: bool = False

    @classmethod
    def from_config(cls, config) -> Hparams:
        loss = config.dpo.loss
        if loss not in LOSSES:
            raise ValueError(f"config.dpo.loss must be one of {LOSSES}, got {loss!r}")
        return cls(beta=float(config.dpo.beta), listwise=loss == "listwise")


def sequence_logprobs(model: Transformer, params, batch, rules) -> jax.Array:
    """(B, K) log pi(y | x) of every response of a packed ranking batch with response
    positions (``PackedRankingBatcher(response_tokens=N)``): the LM head is applied only at
    the B * K * N states that predict a response token."""
    with nn.logical_axis_rules(rules):
        logits = model.apply(
            {"params": params},
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            branch_ids=batch.get("branch_ids"),
            head_index=batch["before"],
        )  # (B, K, N, V)
    token_logprobs = losses.token_logprobs(logits, batch["targets"])
    return jnp.where(batch["target_mask"], token_logprobs, 0.0).sum(-1)


def padded_sequence_logprobs(model: Transformer, params, batch, rules) -> jax.Array:
    """(B, K) log pi(y | x) of a padded ranking batch (tokens (B, K, T), prompt, last): each
    response's tokens after its prompt through its last, one sequence per row."""
    b, k, t = batch["tokens"].shape
    tokens = batch["tokens"].reshape(b * k, t)
    with nn.logical_axis_rules(rules):
        logits = model.apply({"params": params}, tokens)  # (BK, T, V): plain causal
    token_logprobs = losses.token_logprobs(logits[:, :-1], tokens[:, 1:])  # predicts s from s-1
    s = jnp.arange(1, t)[None]
    in_response = (s >= batch["prompt"].reshape(-1, 1)) & (s <= batch["last"].reshape(-1, 1))
    return jnp.where(in_response, token_logprobs, 0.0).sum(-1).reshape(b, k)


def dpo_step(model: Transformer, tx, rules, hp: Hparams, state: TrainState, batch, rng,
             ref_params, adapters: bool = False, merge_alpha=None):  # fmt: skip
    """One update on ``losses.dpo_loss``; ``ref_params`` the frozen reference policy, with
    ``adapters`` (LoRA) also the base ``state.params``'s adapters adapt: one copy of the SFT
    weights (``merge_alpha``: ``lora.Spec.merge_alpha``). batch: a packed ranking batch with
    response positions, ranks and mask (B, K)."""
    del rng  # deterministic: no dropout, no sampling
    ref_logprobs = jax.lax.stop_gradient(sequence_logprobs(model, ref_params, batch, rules))

    def loss_fn(params):
        logprobs = sequence_logprobs(model, params, batch, rules)
        return losses.dpo_loss(
            logprobs, ref_logprobs, batch["ranks"], batch["mask"], hp.beta, hp.listwise
        )

    base = ref_params if adapters else None
    (loss, metrics), grads = lora.value_and_grad(
        loss_fn, state.params, base, merge_alpha=merge_alpha
    )
    state, norms = apply_gradients(state, grads, tx)
    return state, {"loss": loss, **metrics, **norms}


@evaluators.register("dpo_accuracy")
class ImplicitRewardAccuracy(evaluators.RankingAccuracy):
    """``rm_accuracy`` of the policy's implicit reward beta * (log pi - log pi_ref) on the
    validation rankings (padded, one sequence per response), by labeler group."""

    def rewards(self, params, batch, ref_params):
        ctx = self.ctx
        model, rules, beta = ctx["model"], ctx["rules"], ctx["dpo_hparams"].beta
        logprobs = padded_sequence_logprobs(model, params, batch, rules)
        return beta * (logprobs - padded_sequence_logprobs(model, ref_params, batch, rules))

    def frozen(self):
        return (self.ctx["ref_params"],)


def run(config, workdir: str, rankings=None, eval_rankings=None) -> TrainState:
    """Train DPO of ``config`` in ``workdir`` from ``config.init_from`` (the SFT policy, also
    the reference); export the final policy. Rankings as ``rm.run`` reads them."""
    if not config.get("init_from"):
        raise ValueError("config.init_from: DPO starts from a policy (the SFT stage's workdir)")
    run = Run(config, workdir, deterministic=True)
    model = Transformer(run.model_cfg, head="lm")
    hp = Hparams.from_config(config)
    loaded = load_arrays(config, run.tokenizer, int(config.dpo.max_responses), rankings,
                         eval_rankings)  # fmt: skip
    run.report_skipped({"invalid": loaded.invalid, "too_long": loaded.too_long}, "rankings")
    train_arrays = {k: v for k, v in loaded.train.items() if k != "group"}
    longest = int(response_lengths(train_arrays).max())
    batch_size = int(config.train.batch_size)
    batcher = PackedRankingBatcher(
        train_arrays, batch_size, int(config.seed), sharding.host_batch_slice(batch_size),
        sharding.batch_shards(run.mesh), row_len=int(config.dpo.get("row_len", 0)),
        response_tokens=-(-longest // 8) * 8,  # a multiple of 8: few shapes across datasets
    )  # fmt: skip
    steps = total_steps(config.train, batcher.steps_per_epoch)
    tx, schedule = make_optimizer(optimizer_config(config.optimizer, steps))
    seq_len = int(config.data.seq_len)
    example = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)}
    initial, shardings, abstract = lazy_state(
        train_state_init(model, tx, example, run.rules, run.trainable),
        run.mesh,
        run.rules,
        jax.random.key(int(config.seed)),
    )
    # The reference policy; with LoRA also the frozen base of the adapters.
    base = run.lora_base(model, example)
    ref = run.load(config.init_from, abstract.params) if base is None else base
    info = {
        "rankings": len(loaded.rankings),
        "invalid_skipped": loaded.invalid,
        "too_long_skipped": loaded.too_long,
        "train_elements": batcher.size,
        "train_sequences": int(train_arrays["mask"].sum()),
        "eval_prompts": len(loaded.eval["tokens"]),
        "heldout_labelers": loaded.heldout_labelers,
        "loss": config.dpo.loss,
        "beta": hp.beta,
    }
    run.write_info(**info)

    def init_from(initial):
        if base is not None:  # LoRA: fresh adapters (the adapted policy starts as SFT)
            return initial()
        params = jax.tree.map(jnp.copy, ref)  # the state is donated; the reference is not
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    state = run.fit(
        initial=initial,
        shardings=shardings,
        abstract=abstract,
        step_fn=functools.partial(
            dpo_step,
            model,
            tx,
            run.rules,
            hp,
            adapters=base is not None,
            merge_alpha=run.merge_alpha,
        ),  # fmt: skip
        batcher=batcher,
        steps=steps,
        schedule=schedule,
        init_from=init_from,
        eval_context={
            "model": model,
            "eval_arrays": loaded.eval,
            "ref_params": ref,
            "dpo_hparams": hp,
        },  # fmt: skip
        prefix="dpo",
        tokens_per_step=lambda b: int((b["segment_ids"] > 0).sum()) * jax.process_count(),
        frozen=(ref,),  # with LoRA also the adapters' base: the step reads it as both
        view=run.merged_view(base),
    )
    run.export(state.params, {**info, "total_steps": steps}, base)
    run.finish()
    return state
