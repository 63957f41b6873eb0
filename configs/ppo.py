"""PPO / PPO-ptx against a frozen reward model (paper step 3, eq. 2, appendix C.3/C.4).

``init_from`` is the SFT workdir (policy and reference); ``ppo.reward_model`` the RM workdir
(the value model starts from it too). ``ptx.coef`` is gamma (0: plain PPO; paper 27.8 with 8x
pretraining rows per episode); ``ppo.kl_coef`` is beta (paper 0.02).

  instructrl train --config configs/ppo.py:runlocal --workdir runs/ppo \\
      --config.init_from=runs/sft --config.ppo.reward_model=runs/rm \\
      --config.data.path=prompts.jsonl
  instructrl train --config configs/ppo.py:paper,ptx ...     # appendix C.4 values, PPO-ptx
"""

import ml_collections

from instructrl import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, model="tiny", data="", world=False, ptx=False,
                                paper=False, runlocal=False)  # fmt: skip
    c = config_lib.base_config()
    c.stage = "ppo"
    c.model.preset = args.model
    c.data = dict(path=args.data, template="{prompt}\n\n", max_prompt_len=96, eval_prompts=32)
    # The synthetic world of the prompts ({seed, overrides}): its gold rubric scores samples.
    c.world = ml_collections.ConfigDict({"seed": 0, "overrides": {}}) if args.world else None
    c.ppo = dict(
        reward_model="",
        value_from="",
        iterations=20,
        batch_size=32,  # prompts (episodes) per iteration; paper 512
        num_minibatches=4,  # paper: minibatch 64 of 512
        epochs=1,
        clip_eps=0.2,
        value_clip_eps=0.2,
        gamma=1.0,  # paper: no discount
        lam=0.95,
        kl_coef=0.02,  # beta
        target_kl=0.0,  # > 0: adaptive controller (Ziegler et al. 2019)
        kl_horizon=10000.0,
        whiten_advantages=True,
        whiten_rewards=False,  # scale the per-token rewards by their batch std
        score_clip=0.0,  # > 0: clip RM scores to [-score_clip, score_clip]
        no_eos_penalty=ml_collections.config_dict.placeholder(float),  # score without EOS
        ema_decay=0.992,
        max_new_tokens=64,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        # Score and update over (prompt, response) pairs packed into rows (scoring.pack):
        # the same numbers over about half the tokens. One process only (else padded).
        pack=True,
        # "gae": the value model and GAE (PPO); "rloo" / "grpo": no value model, advantages
        # from group_size answers to each prompt (leave-one-out / group-normalized; GRPO's
        # KL to the reference a loss term weighted by kl_coef).
        estimator="gae",
        group_size=1,
    )
    c.ptx = dict(
        coef=27.8 if args.ptx else 0.0,
        multiplier=8,  # pretraining rows per RL episode (paper: 8)
        seq_len=128,
        eval_rows=64,  # held out of PPO-ptx updates; the ppo_pretrain evaluator reads them
        text_files=[config_lib.asset("tinystories-excerpt.txt")],
    )
    # Paper: constant lr after 10 warm-up iterations from 1/10 of the peak. Optimizer steps are
    # minibatch updates, so warmup_steps = 10 * epochs * num_minibatches.
    c.optimizer.update(
        dict(
            lr=1e-4,
            schedule="constant",
            warmup_steps=10 * 4,
            warmup_init_frac=0.1,
            weight_decay=0.0,
            grad_clip=1.0,
        )
    )
    c.value_optimizer = dict(c.optimizer.to_dict())
    c.value_optimizer.lr = 1e-4
    c.train.log_every = 1
    c.checkpoint.every_steps = 10
    c.evals.policy = dict(type="ppo_eval", every_steps=10, use_ema=True)
    c.evals.pretrain = dict(type="ppo_pretrain", every_steps=10, use_ema=True)
    if args.paper:
        c.ppo.iterations = 256_000 // 512  # 256k episodes
        c.ppo.batch_size = 512
        c.ppo.num_minibatches = 8
        c.ppo.epochs = 1
        c.ppo.clip_eps = 0.2
        c.ppo.kl_coef = 0.02
        c.ppo.gamma = 1.0
        c.ppo.temperature = 1.0
        c.ppo.ema_decay = 0.992
        c.ppo.max_new_tokens = 256
        c.ptx.multiplier = 8
        c.optimizer.lr = 9.65e-6
        c.optimizer.warmup_steps = 10 * 8
        c.value_optimizer.lr = 9e-6
        c.value_optimizer.warmup_steps = 10 * 8
        c.model.dtype = "bfloat16"
    if args.runlocal:
        c.ppo.iterations = 6
        c.ppo.batch_size = 16
        c.ppo.num_minibatches = 2
        c.ppo.max_new_tokens = 24
        c.ptx.multiplier = 2
        c.ptx.seq_len = 64
        c.ptx.eval_rows = 16
        c.data.eval_prompts = 8
        c.checkpoint.every_steps = 3
        c.evals.policy.every_steps = 3
        c.evals.pretrain.every_steps = 3
    return c.lock()
