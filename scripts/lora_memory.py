"""Parameter and optimizer memory of LoRA against full fine-tuning, for SFT and PPO.

  python scripts/lora_memory.py                                # small, gpt2-small, gpt3-1.3b
  python scripts/lora_memory.py --presets gpt2-small --rank 16 --compile

Counts the bytes of every array a stage holds between steps, from the shapes the stages
build (``jax.eval_shape`` of their own state initializers: nothing is allocated), float32
weights and AdamW's two moments:

  SFT  full: params + optimizer; LoRA: the frozen base + adapters + their optimizer.
  PPO  full: policy, its optimizer and EMA, the reference (SFT), value model and its
       optimizer, reward model; LoRA (policy and value model): the reference is the policy's
       base and the reward model the value model's, so each is held once, plus adapters,
       their optimizer and EMA, and the value head.

With ``--compile`` the SFT train step (``sft.lm_step``) is also compiled for this host at
``--batch`` x ``--seq`` in both modes and XLA's memory analysis printed (arguments and
temporaries of one step: what the counts above leave out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instructrl import config_lib, lora, ppo, scoring, sft, sharding  # noqa: E402
from instructrl.model import Transformer  # noqa: E402
from instructrl.optim import make_optimizer  # noqa: E402
from instructrl.presets import preset  # noqa: E402
from instructrl.train import optimizer_config, params_init, train_state_init  # noqa: E402

GIB = 2**30


def _optimizer():
    """AdamW as every stage builds it (the shared ``optimizer`` section's defaults)."""
    return make_optimizer(optimizer_config(config_lib.base_config().optimizer, 100))[0]


def _shapes(init):
    return nn.unbox(jax.eval_shape(init, jax.random.key(0)))


def sft_bytes(cfg, spec: lora.Spec | None) -> dict[str, int]:
    model, tx = Transformer(cfg, head="lm"), _optimizer()
    example = {"tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
    rules = sharding.LOGICAL_RULES
    if spec is None:
        state = _shapes(train_state_init(model, tx, example, rules))
        return {"trainable": lora.nbytes(state.params), "optimizer": lora.nbytes(state.opt_state),
                "frozen": 0}  # fmt: skip
    model = Transformer(spec.model_config(cfg), head="lm")
    trainable = lambda p: lora.split(p)[1]  # noqa: E731
    state = _shapes(train_state_init(model, tx, example, rules, trainable))
    base = lora.split(_shapes(params_init(model, example, rules)))[0]
    return {"trainable": lora.nbytes(state.params), "optimizer": lora.nbytes(state.opt_state),
            "frozen": lora.nbytes(base)}  # fmt: skip


def ppo_bytes(cfg, spec: lora.Spec | None) -> dict[str, int]:
    if spec is not None:
        cfg = spec.model_config(cfg)
    models = scoring.Models(Transformer(cfg, head="lm"), Transformer(cfg, head="scalar"),
                            sharding.LOGICAL_RULES)  # fmt: skip
    hp = types_hparams()
    tx = _optimizer()
    state = _shapes(ppo.state_init(models, hp, tx, tx, spec is not None))
    example = {"tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
    policy = lora.split(_shapes(params_init(models.policy, example, models.rules)))[0]
    reward = lora.split(_shapes(params_init(models.scalar, example, models.rules)))[0]
    return {
        "trainable": lora.nbytes((state.params, state.value_params)),
        "optimizer": lora.nbytes((state.opt_state, state.value_opt_state)),
        "ema": lora.nbytes(state.ema_params),
        # Full: the reference and the reward model. LoRA: the same two, which are also the
        # bases of the policy's and the value model's adapters.
        "frozen": lora.nbytes(policy) + lora.nbytes(reward),
    }


def types_hparams():
    """PPO's Hparams with a critic (GAE): the fields ``state_init`` reads."""
    fields = dict.fromkeys(ppo.Hparams.__dataclass_fields__)
    return ppo.Hparams(**{**fields, "estimator": "gae", "group_size": 1, "kl_coef": 0.02})


def compiled_sft_step(cfg, spec, batch: int, seq: int) -> dict[str, int]:
    """XLA's memory analysis of one SFT step on this host: argument and temporary bytes."""
    tx = _optimizer()
    rules = sharding.LOGICAL_RULES
    example = {"tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
    model = Transformer(cfg if spec is None else spec.model_config(cfg), head="lm")
    trainable = None if spec is None else (lambda p: lora.split(p)[1])
    state = _shapes(train_state_init(model, tx, example, rules, trainable))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"inputs": tokens, "targets": tokens,
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}  # fmt: skip
    args = [state, data, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)]
    if spec is not None:
        args.append(lora.split(_shapes(params_init(model, example, rules)))[0])
    step = jax.jit(functools.partial(sft.lm_step, model, tx, rules), donate_argnums=(0,))
    mem = step.lower(*args).compile().memory_analysis()
    return {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,gpt2-small,gpt3-1.3b")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="", help="comma-separated; default every projection")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t) or lora.LORA_TARGETS
    spec = lora.Spec(rank=args.rank, targets=targets)
    rows = []
    print(f"LoRA rank {args.rank} on {', '.join(targets)}; float32 weights, AdamW")
    print("| model | stage | mode | trainable | optimizer | EMA | frozen | total | LoRA / full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        cfg = preset(name)
        for stage, count in (("SFT", sft_bytes), ("PPO", ppo_bytes)):
            full, low = count(cfg, None), count(cfg, spec)
            for mode, b in (("full", full), ("LoRA", low)):
                total = sum(b.values())
                ratio = total / sum(full.values())
                rows.append({"model": name, "stage": stage, "mode": mode, **b, "total": total})
                cells = [f"{b.get(k, 0) / GIB:.3f}" for k in ("trainable", "optimizer", "ema",
                                                                "frozen")]  # fmt: skip
                print(f"| {name} | {stage} | {mode} | {' | '.join(cells)} | "
                      f"{total / GIB:.3f} GiB | {ratio:.2f} |")  # fmt: skip
        if args.compile:
            for mode, s in (("full", None), ("LoRA", spec)):
                mem = compiled_sft_step(cfg, s, args.batch, args.seq)
                rows.append({"model": name, "stage": "SFT step", "mode": mode, **mem})
                print(f"  {name} SFT step {args.batch}x{args.seq} {mode}: arguments "
                      f"{mem['arguments'] / GIB:.3f} GiB, temporaries "
                      f"{mem['temporaries'] / GIB:.3f} GiB")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rank": args.rank, "targets": targets, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
