"""Pretraining a base model on plain text (the offline pipeline has no downloadable weights).

instructrl train --config configs/pretrain.py:runlocal --workdir runs/pretrain
instructrl train --config configs/pretrain.py:model=gpt3-125m,text=/data/a.txt+/data/b.txt
"""

from instructrl import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg, model="tiny", text=config_lib.asset("tinystories-excerpt.txt"), runlocal=False
    )
    c = config_lib.base_config()
    c.stage = "pretrain"
    c.model.preset = args.model
    c.data = dict(
        kind="text",
        text_files=args.text.split("+"),
        seq_len=128,
        packing=False,  # True: one document per segment instead of contiguous windows
        eval_examples=16,
        eval_prompts=["Once upon a time", "Lily and Tom"],
    )
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.train.batch_size = 16
    c.train.epochs = 1.0
    c.evals.heldout = dict(type="heldout_loss", every_steps=100, batch_size=16)
    c.evals.samples = dict(type="samples", every_steps=0, max_new_tokens=48)
    c.checkpoint.select_by = "eval/loss"
    if args.runlocal:
        c.train.steps = 120
        c.train.log_every = 10
        c.checkpoint.every_steps = 40
        c.evals.heldout.every_steps = 60
    return c.lock()
