"""A reward model trained on your own K-way rankings, in a plain loop.

Rankings are JSONL rows {"prompt": ..., "responses": [K texts], "ranks": [K ints, 0 = best,
equal = tie]}, K from 2 to 9: the pipeline's rankings/rankings_*.jsonl, or your labelers'.
As in the paper (section 3.5), the RM is the SFT model with its LM head replaced by a scalar
head, and each batch element holds all C(K,2) pairs of one prompt (eq. 1,
``losses.ranking_loss``). After `make run`:

  python examples/rm_loop.py --init runs/main/sft \
      --rankings runs/main/rankings/rankings_train.jsonl \
      --valid runs/main/rankings/rankings_valid_heldout_labelers.jsonl
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from instructrl import losses, rm, scoring, sharding
from instructrl.policy_io import Toolkit


def read(path: str, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows[:limit] if limit else rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="an SFT (or imported) model's workdir")
    parser.add_argument("--rankings", required=True, help="training rankings (JSONL)")
    parser.add_argument("--valid", help="validation rankings (JSONL)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N rankings only")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="prompts per step (paper: 64)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args(argv)

    tk = Toolkit.from_workdir(args.init)  # the model shape, tokenizer and prompt template
    model, rules = tk.models.scalar, tk.models.rules
    lm = tk.params(args.init)
    key = jax.random.key(0)
    head = nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])["scalar_head"]
    params = {**{k: v for k, v in lm.items() if k != "lm_head"}, "scalar_head": head}

    def encode(path):  # (N, K, T) tokens, prompt length, last-token index, ranks, mask
        seq_len = min(args.seq_len, tk.cfg.max_len)
        arrays, skipped = rm.encode_rankings(tk.tokenizer, read(path, args.limit), seq_len,
                                             tk.template, skip_too_long=True)  # fmt: skip
        return {k: v for k, v in arrays.items() if k != "group"}

    def loss_fn(params, batch):
        rewards = scoring.ranking_rewards(  # each response's tokens: prompt .. last
            model, params, batch["tokens"], batch["prompt"], batch["last"], rules
        )
        return losses.ranking_loss(rewards, batch["ranks"], batch["mask"])  # eq. 1

    tx = optax.adamw(args.lr, weight_decay=0.0)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics["accuracy"]

    evaluate = jax.jit(loss_fn)

    def device_batch(arrays, rows):  # the rows split over the mesh's data axes, as params are
        return sharding.shard_batch({k: v[rows] for k, v in arrays.items()}, tk.mesh)

    def accuracy(params, arrays) -> float:  # pair-weighted, in full batches
        correct = pairs = 0.0
        for i in range(0, len(arrays["tokens"]) - args.batch + 1, args.batch):
            _, m = evaluate(params, device_batch(arrays, slice(i, i + args.batch)))
            correct += float(m["accuracy"] * m["num_pairs"])
            pairs += float(m["num_pairs"])
        return correct / max(pairs, 1.0)

    train = encode(args.rankings)
    valid = encode(args.valid) if args.valid else None
    opt_state, rng, log = tx.init(params), np.random.default_rng(0), []
    result = {"train_accuracy_before": accuracy(params, train),
              "valid_accuracy_before": accuracy(params, valid) if valid else None}  # fmt: skip
    for epoch in range(args.epochs):
        order = rng.permutation(len(train["tokens"]))
        for i in range(0, len(order) - args.batch + 1, args.batch):
            batch = device_batch(train, order[i : i + args.batch])
            params, opt_state, loss, acc = step(params, opt_state, batch)
            log.append({"epoch": epoch, "step": len(log), "loss": float(loss), "acc": float(acc)})
            if len(log) % 10 == 1:
                print(json.dumps(log[-1]), flush=True)
    result.update(steps=len(log), log=log, train_accuracy=accuracy(params, train))
    if valid:
        result["valid_accuracy"] = accuracy(params, valid)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    return result


if __name__ == "__main__":
    main()
