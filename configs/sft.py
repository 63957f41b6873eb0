"""Supervised fine-tuning on demonstrations (paper step 1, appendix C.1).

Paper defaults: 16 epochs, cosine decay to 10% of peak with no warmup, residual dropout 0.2,
selection on validation data. Args: ``model=<preset>``, ``data=<file>``, ``runlocal`` (seconds
on a CPU), ``paper`` (appendix C.1 numbers; with ``tokenizer=<dir>``).

  instructrl train --config configs/sft.py:runlocal --workdir runs/sft
  instructrl train --config configs/sft.py --config.data.path=alpaca.json \\
      --config.init_from=runs/pretrain --workdir runs/sft
"""

from instructrl import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg, model="", data=config_lib.asset("alpaca-excerpt.json"), tokenizer="",
        runlocal=False, paper=False,
    )  # fmt: skip
    c = config_lib.base_config()
    c.stage = "sft"
    c.model.preset = args.model or ("gpt3-1.3b" if args.paper else "tiny")
    c.model.dropout = 0.2
    c.data = dict(
        kind="demonstrations",
        path=args.data,
        format="auto",  # data.sources: prompt_response, alpaca, self_instruct, oasst
        template="{prompt}\n\n",
        chat_format="",  # data.formats.CHAT_PRESETS name (chatml, hh, ...); "" = template
        packing=False,  # several demonstrations per row, with segment ids
        # Each batch's demonstrations packed into few rows (data.pipeline.LMPipeline): the same
        # batches and loss as unpacked, about the tokens they have (SFT steps 2.5x cheaper).
        pack_batches=True,
        length_buckets=[],  # pad unpacked batches to the smallest bucket that fits
        seq_len=128,
        eval_examples=32,
        num_eval_prompts=4,
        max_examples=0,
        skip_too_long=True,
        skip_invalid=True,
    )
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.final_frac = 0.1
    c.train.batch_size = 16
    c.train.epochs = 16.0
    c.evals.heldout = dict(type="heldout_loss", every_steps=200, batch_size=16)
    c.evals.samples = dict(type="samples", every_steps=0, max_new_tokens=48)
    c.checkpoint.select_by = "eval/loss"
    if args.paper:
        # Appendix C.1 (1.3B and 6B): lr 9.65e-6, batch 32, 16 epochs, cosine to 10%, no warmup.
        c.model.dtype = "bfloat16"
        c.model.max_len = 2048
        c.data.seq_len = 2048
        c.optimizer.lr = 9.65e-6
        c.train.batch_size = 32
        c.tokenizer = dict(kind="hf", path=args.tokenizer, eos_token="", pad_token="")
    if args.runlocal:
        c.model.dropout = 0.1
        c.train.epochs = 0.0
        c.train.steps = 60
        c.checkpoint.every_steps = 20
        c.evals.heldout.every_steps = 30
    return c.lock()
