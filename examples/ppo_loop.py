"""PPO written by hand from instructrl's pure functions, in a loop you own.

The pipeline's PPO stage wires these same pieces through its training scaffold (checkpoints,
resume, evaluation); here each is called directly. Per iteration: sample answers
(``sampler``), score them (``scoring``: teacher-forced log-probs of the policy and the frozen
SFT reference, values, reward-model scores), turn scores into per-token KL-penalized rewards
and GAE advantages (``losses``), and take clipped PPO updates (``ppo.update_phase``, the
pure update of the PPO step). After `make run`:

  python examples/ppo_loop.py --sft runs/main/sft --rm runs/main/rm \
      --prompts runs/main/world/prompts_ppo.jsonl --iterations 20
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructrl import losses, ppo, sampler, scoring, sharding
from instructrl.policy_io import Toolkit


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="the SFT stage's workdir (policy, reference)")
    parser.add_argument("--rm", required=True, help="the reward model's workdir (and the value)")
    parser.add_argument("--prompts", required=True, help="JSONL with a 'prompt' per line")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl_coef", type=float, default=0.02)
    parser.add_argument("--held_out_draws", type=int, default=4, help="samples per held-out prompt")
    args = parser.parse_args(argv)

    tk = Toolkit.from_workdir(args.sft, batch_size=args.batch)  # models, tokenizer, template
    models, tok = tk.models, tk.tokenizer
    sft = tk.params(args.sft)  # the policy starts here and stays the KL reference
    rm = tk.params(args.rm, head="scalar")  # frozen; the value model starts from it too
    prompts = [json.loads(line)["prompt"] for line in open(args.prompts) if line.strip()]

    # Every PPO knob in one frozen dataclass (the pipeline builds it from configs/ppo.py).
    hp = ppo.Hparams(kl_coef=args.kl_coef, target_kl=0.0, kl_horizon=10_000.0, ptx_coef=0.0,
                     clip_eps=0.2, value_clip_eps=0.2, gamma=1.0, lam=0.95,
                     whiten_advantages=True, whiten_rewards=False, score_clip=0.0,
                     no_eos_penalty=None, num_minibatches=4, epochs=1, ema_decay=0.992,
                     max_new_tokens=args.max_new_tokens, sampling=scoring.Sampling(),
                     eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip
    tx, value_tx = optax.adam(args.lr), optax.adam(args.lr)
    copy = functools.partial(jax.tree.map, jnp.copy)  # own buffers, apart from the frozen ones
    state = ppo.PPOState(step=jnp.int32(0), params=copy(sft), opt_state=tx.init(sft),
                         value_params=copy(rm), value_opt_state=value_tx.init(rm),
                         ema_params=copy(sft), kl_coef=jnp.float32(hp.kl_coef))  # fmt: skip
    # The scalars (step, Adam's counts, kl_coef) on the mesh, as the update returns them: the
    # jitted functions then see one input layout and compile once, not again at iteration 2.
    on_mesh = sharding.replicated(tk.mesh)
    state = jax.tree.map(lambda x: jax.device_put(x, on_mesh) if x.ndim == 0 else x, state)

    generate = sampler.bind(models.policy, max_new_tokens=hp.max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, rules=models.rules)  # fmt: skip

    @jax.jit
    def rollout(state, rm, sft, prompt_tokens, prompt_mask, key):
        out = generate(state.params, prompt_tokens, prompt_mask, key)
        args = (prompt_tokens, prompt_mask, out.tokens, out.mask)
        mask = out.mask.astype(jnp.float32)
        logprobs = scoring.response_logprobs(models, state.params, *args)[0] * mask
        ref_logprobs = scoring.response_logprobs(models, sft, *args)[0] * mask
        values = scoring.response_values(models, state.value_params, *args) * mask
        scores = scoring.reward_scores(models, rm, *args)
        # Eq. 2's reward: the RM score at the last token, minus beta * log(pi / pi_SFT) per token.
        rewards = losses.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, hp.kl_coef)
        advantages, returns = losses.gae(rewards, values, mask, hp.gamma, hp.lam)
        return ppo.Rollout(prompt_tokens, prompt_mask, out.tokens, mask, logprobs, ref_logprobs,
                           values, scores, scores, rewards=rewards,
                           advantages=losses.whiten(advantages, mask), returns=returns)  # fmt: skip

    # Every prompt encoded once, left-padded to one length: each batch has the same shape, so
    # the rollout and the update compile once (a batch padded to its own longest prompt would
    # recompile both whenever that length changed).
    all_tokens, all_mask = tk.encode_prompts(prompts, hp.max_new_tokens, tk.template)

    def encode(rows):  # the rows split over the mesh's data axes, as the params are laid out
        batch = {"tokens": all_tokens[rows], "mask": all_mask[rows]}
        prompt = sharding.shard_batch(batch, tk.mesh)
        return prompt["tokens"], prompt["mask"]

    train = len(prompts) - args.batch
    held_out = encode(np.arange(train, len(prompts)))  # the same prompts and keys before and after

    def held_out_score(state) -> float:  # several draws each: one is noisy on a small batch
        keys = jax.random.split(jax.random.key(-1), args.held_out_draws)
        return float(np.mean([rollout(state, rm, sft, *held_out, k).raw_scores for k in keys]))

    update = jax.jit(functools.partial(ppo.update_phase, models, hp, tx, value_tx))
    rng, history = np.random.default_rng(0), []
    result = {"held_out_rm_score_before": held_out_score(state)}
    for it in range(args.iterations):
        prompt_tokens, prompt_mask = encode(rng.choice(train, args.batch))
        key = jax.random.key(it)
        r = rollout(state, rm, sft, prompt_tokens, prompt_mask, jax.random.fold_in(key, 0))
        state, metrics = update(state, r, None, jax.random.fold_in(key, 1))
        state = state.replace(step=state.step + 1)
        row = {"iteration": it, "rm_score": float(r.raw_scores.mean()),
               "kl_to_sft": float(scoring.sequence_kl(r.logprobs, r.ref_logprobs, r.mask).mean()),
               "policy_loss": float(metrics["policy_loss"]),
               "value_loss": float(metrics["value_loss"])}  # fmt: skip
        history.append(row)
        print(json.dumps(row), flush=True)
    result.update(history=history, held_out_rm_score=held_out_score(state))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


if __name__ == "__main__":
    main()
