"""DPO on K-way rankings (Rafailov et al. 2023), from the SFT policy, which is also the reference.

``dpo.loss``: "pairwise" (every C(K,2) pair of a prompt in one batch element, as the RM's
eq. 1) or "listwise" (the Plackett-Luce likelihood of the ranking). ``dpo.beta``: the implicit
reward's scale, the weight of the KL penalty DPO optimizes against.

  instructrl train --config configs/dpo.py:runlocal --workdir runs/dpo \\
      --config.init_from=runs/main/sft --config.data.path=runs/main/rankings/rankings_train.jsonl \\
      --config.tokenizer.kind=hf --config.tokenizer.path=runs/main/world/tokenizer.json
  instructrl train --config configs/dpo.py:loss=listwise ...
"""

from instructrl import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, model="tiny", data="", loss="pairwise", runlocal=False)
    c = config_lib.base_config()
    c.stage = "dpo"
    c.model.preset = args.model
    c.data = config_lib.rankings_data(args.data)
    c.dpo = dict(
        loss=args.loss,
        beta=0.1,  # the DPO paper's default
        max_responses=9,
        row_len=0,  # tokens per packed row; 0: data.seq_len
    )
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 0
    c.optimizer.final_frac = 0.1
    c.optimizer.weight_decay = 0.0
    c.train.batch_size = 64
    c.train.epochs = 1.0
    c.evals.heldout = dict(type="dpo_accuracy", every_steps=0, batch_size=16)
    c.checkpoint.select_by = ""
    if args.runlocal:
        c.train.batch_size = 16
        c.checkpoint.every_steps = 20
        c.train.log_every = 5
    return c.lock()
