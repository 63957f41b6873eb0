"""Evaluators: a small registry (``config.evals.<name> = dict(type=..., every_steps=...)``).

An evaluator is built once per run with the stage's context (a dict: model(s), rules, mesh,
tokenizer, config, workdir and the stage's held-out data) and exposes ``run(state) -> dict``.

  heldout_loss  token-weighted NLL on held-out rows (pretrain, SFT)
  samples       greedy answers to fixed prompts, to workdir/samples.jsonl (pretrain, SFT)
  rm_accuracy   pairwise accuracy and log loss on held-out rankings, by labeler group (RM)
  ppo_eval      RM score, gold score, KL to the reference of held-out samples (RL stages)
  ppo_pretrain  held-out pretraining loss of the policy and the reference (the alignment tax)
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from instructrl import fs, losses, sampler, scoring, sharding
from instructrl.data import lm as lm_data
from instructrl.data.comparisons import GROUPS
from instructrl.world import gold_scorer

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


def padded_chunks(arrays: dict[str, np.ndarray], batch_size: int):
    """Yields (real rows, chunk) of ``batch_size`` rows; the last chunk is zero-padded so that
    every chunk has one shape (padding rows must carry no weight)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        rows = {k: v[start : start + batch_size] for k, v in arrays.items()}
        real = len(next(iter(rows.values())))
        if real < batch_size:
            rows = {
                k: np.concatenate([v, np.zeros((batch_size - real, *v.shape[1:]), v.dtype)])
                for k, v in rows.items()
            }
        yield real, rows


def _append_jsonl(workdir: str, rows: list[dict]) -> None:
    if jax.process_index() == 0:
        text = "".join(json.dumps(row) + "\n" for row in rows)
        fs.append(os.path.join(workdir, "samples.jsonl"), text)


@register("heldout_loss")
class HeldoutLoss:
    """Token-weighted mean NLL on held-out rows: ``{prefix}/loss`` and ``{prefix}/perplexity``."""

    def __init__(self, context, batch_size: int = 16, prefix: str = "eval"):
        self.ctx, self.batch_size, self.prefix = context, batch_size, prefix
        model, rules = context["model"], context["rules"]

        @jax.jit
        def sums(params, batch):
            with nn.logical_axis_rules(rules):
                logits = model.apply({"params": params}, batch["inputs"])  # dropout off
            loss, n = losses.masked_nll(logits, batch["targets"], batch["loss_mask"])
            return loss * n, n

        self._sums = sums

    def run(self, state):
        total, count = 0.0, 0.0
        for _, rows in padded_chunks(self.ctx["eval_arrays"], self.batch_size):
            s, c = self._sums(state.params, sharding.put_global(rows, self.ctx["mesh"]))
            total, count = total + float(s), count + float(c)
        loss = total / max(count, 1.0)
        return {f"{self.prefix}/loss": loss, f"{self.prefix}/perplexity": float(np.exp(loss))}


@register("samples")
class Samples:
    """Greedy responses to fixed prompts (the KV-cache sampler); written to samples.jsonl."""

    def __init__(self, context, max_new_tokens: int = 48, temperature: float = 0.0):
        self.ctx = context
        tok, model = context["tokenizer"], context["model"]
        template = context["config"].data.get("template", "{prompt}\n\n")
        self.prompts = list(context["eval_prompts"])
        ids = [tok.encode(template.format(prompt=p)) for p in self.prompts]
        limit = model.cfg.max_len - max_new_tokens
        self.tokens, self.mask = lm_data.left_pad(ids, tok.pad_id, min(max(map(len, ids)), limit))
        self._sample = sampler.bind(model, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                                    pad_id=tok.pad_id, temperature=temperature,
                                    rules=context["rules"])  # fmt: skip

    def run(self, state):
        tok = self.ctx["tokenizer"]
        out = self._sample(state.params, self.tokens, self.mask, jax.random.key(0))
        tokens, mask = sharding.to_host((out.tokens, out.mask))
        step = int(jax.device_get(state.step))
        texts = [tok.decode_until_eos(row) for row in tokens]
        _append_jsonl(
            self.ctx["workdir"],
            [
                {"step": step, "prompt": p, "response": t}
                for p, t in zip(self.prompts, texts, strict=True)
            ],
        )
        ended = (tokens == tok.eos_id).any(axis=1)
        return {"samples/mean_length": float(mask.sum(1).mean()), "samples/eos_rate": ended.mean()}


@register("rm_accuracy")
class RankingAccuracy:
    """Pairwise accuracy and log loss (eq. 1) on held-out rankings, overall and by labeler
    group (training vs held-out labelers), plus the reward distribution."""

    def __init__(self, context, batch_size: int = 16, prefix: str = "eval"):
        self.ctx, self.batch_size, self.prefix = context, batch_size, prefix
        self._stats = jax.jit(self._pairs)

    def rewards(self, params, batch, *frozen) -> jax.Array:
        """(B, K) rewards of a padded ranking batch (tokens (B, K, T), last, prompt)."""
        ctx = self.ctx
        return scoring.ranking_rewards(
            ctx["model"], params, batch["tokens"], batch["prompt"], batch["last"], ctx["rules"]
        )

    def frozen(self) -> tuple:
        """Arrays ``rewards`` reads besides the evaluated params (none for a reward model)."""
        return ()

    def _pairs(self, params, batch, *frozen):
        rewards = self.rewards(params, batch, *frozen)
        better = batch["ranks"][:, :, None] < batch["ranks"][:, None, :]
        m = batch["mask"]
        pairs = better & m[:, :, None] & m[:, None, :]
        margin = rewards[:, :, None] - rewards[:, None, :]
        return rewards, pairs, margin

    def run(self, state):
        pair_correct, pair_logloss, pair_group, rewards_all = [], [], [], []
        frozen = self.frozen()
        for real, rows in padded_chunks(self.ctx["eval_arrays"], self.batch_size):
            batch = sharding.put_global(
                {k: v for k, v in rows.items() if k != "group"}, self.ctx["mesh"]
            )
            rewards, pairs, margin = (
                x[:real] for x in sharding.to_host(self._stats(state.params, batch, *frozen))
            )
            for i in range(real):
                sel = pairs[i]
                pair_correct.append((margin[i][sel] > 0).astype(np.float64))
                pair_logloss.append(np.logaddexp(0.0, -margin[i][sel].astype(np.float64)))
                pair_group.append(np.full(sel.sum(), rows["group"][i]))
                rewards_all.append(rewards[i][rows["mask"][i]])
        correct, logloss = np.concatenate(pair_correct), np.concatenate(pair_logloss)
        group, rewards = np.concatenate(pair_group), np.concatenate(rewards_all)
        p = self.prefix
        out = {
            f"{p}/accuracy": correct.mean(),
            f"{p}/log_loss": logloss.mean(),
            f"{p}/num_pairs": float(len(correct)),
            f"{p}/reward_mean": rewards.mean(),
            f"{p}/reward_std": rewards.std(),
        }
        for name, g in GROUPS.items():
            if (group == g).any():
                out[f"{p}/accuracy_{name}_labelers"] = correct[group == g].mean()
                out[f"{p}/log_loss_{name}_labelers"] = logloss[group == g].mean()
                out[f"{p}/num_pairs_{name}_labelers"] = float((group == g).sum())
        return out


@register("ppo_eval")
class PolicyEval:
    """RM score, gold score (a world's prompts), KL to the reference and length on held-out
    prompts, sampled from the EMA policy (``use_ema``) at the stage's sampling settings."""

    def __init__(self, context, use_ema: bool = True, prefix: str = "eval"):
        self.ctx, self.use_ema, self.prefix = context, use_ema, prefix
        models, hp = context["models"], context["ppo_hparams"]
        self._gen = hp.generate_fn(models)
        self._scores = jax.jit(functools.partial(_policy_scores, models, hp.sampling))
        self.records = context["eval_records"]
        self._gold = gold_scorer(context.get("world"), self.records)

    def run(self, state):
        ctx = self.ctx
        tokens, mask = ctx["eval_prompts"]
        params = state.ema_params if self.use_ema else state.params
        samples = self._gen(params, tokens, mask, jax.random.key(1234))
        frozen = ctx["frozen"]
        logprobs, ref_logprobs, raw_scores = self._scores(
            params, frozen["ref"], frozen["rm"], tokens, mask, samples.tokens, samples.mask
        )
        logprobs, ref_logprobs, scores, tokens, mask = sharding.to_host(
            (logprobs, ref_logprobs, raw_scores, samples.tokens, samples.mask)
        )
        m = mask.astype(np.float32)
        kl = np.asarray(scoring.sequence_kl(logprobs * m, ref_logprobs * m, m))
        out = {
            f"{self.prefix}/score": float(scores.mean()),
            f"{self.prefix}/kl_to_ref": float(kl.mean()),
            f"{self.prefix}/response_length": float(m.sum(1).mean()),
        }
        tok = ctx["tokenizer"]
        texts = [tok.decode_until_eos(row) for row in tokens]
        if self._gold is not None:
            out[f"{self.prefix}/gold_score"] = float(np.mean(self._gold(texts)))
        step = int(jax.device_get(state.step))
        _append_jsonl(
            ctx["workdir"],
            [
                {"step": step, "prompt": r["prompt"], "response": t, "score": float(s)}
                for r, t, s in zip(self.records, texts, scores, strict=True)
            ],
        )
        return out


def _policy_scores(models, sampling, params, ref_params, rm_params, pt, pm, tokens, mask):
    """(policy log-probs, reference log-probs, RM scores) of sampled responses."""
    args = (pt, pm, tokens, mask)
    logprobs, _ = scoring.response_logprobs(models, params, *args, sampling)
    ref_logprobs, _ = scoring.response_logprobs(models, ref_params, *args, sampling.reference())
    return logprobs, ref_logprobs, scoring.reward_scores(models, rm_params, *args)


@register("ppo_pretrain")
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
        sums = sharding.to_host([self._nll_sum(params, chunk) for chunk in self.chunks])
        total, count = (float(sum(x[i] for x in sums)) for i in (0, 1))
        return total / max(count, 1.0)

    def run(self, state):
        if self._sft_loss is None:
            self._sft_loss = self._loss(self.ctx["frozen"]["ref"])
        params = state.ema_params if self.use_ema else state.params
        return {
            f"{self.prefix}/pretrain_loss": self._loss(params),
            f"{self.prefix}/pretrain_loss_sft": self._sft_loss,
        }
