"""Reward model on K-way rankings (paper step 2, eq. 1, appendix C.2).

Paper defaults (``paper``): one epoch, lr 9e-6, cosine to 10%, batch 64 prompts, all C(K,2)
pairs of a prompt in one batch element. ``pairs=shuffled`` is the ablation that shuffles the
comparisons as independent pairs.

  instructrl train --config configs/rm.py:runlocal --workdir runs/rm --config.init_from=runs/sft
  instructrl train --config configs/rm.py:data=hh.jsonl.gz --config.data.format=hh_rlhf ...
"""

from instructrl import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg, model="", data="", pairs="all_in_one", tokenizer="", runlocal=False, paper=False
    )
    c = config_lib.base_config()
    c.stage = "rm"
    c.model.preset = args.model or ("gpt3-6.7b" if args.paper else "tiny")
    c.data = config_lib.rankings_data(args.data)
    c.rm = dict(
        pairs=args.pairs,  # or "shuffled" (ablation)
        max_responses=9,
        # Batches of like K, slots trimmed to the largest ranking (rm.RankingBatcher): much
        # cheaper for K = 2 pairs mixed with K-way rankings; off, every prompt pads to 9.
        bucket_by_k=False,
        # Pack every batch's responses side by side into rows (rm.PackedRankingBatcher): the
        # same rewards as padding each to seq_len, for about the tokens the batch really has.
        pack=True,
        # Packed: a ranking's responses follow one copy of their prompt (branch attention),
        # the same rewards again for 29% less RM step time on the default pipeline.
        share_prompt=True,
        row_len=0,  # tokens per packed row; 0: data.seq_len (256 measured slower)
        normalize_with="",  # demonstrations file: their mean reward becomes 0
        normalize_examples=256,
    )
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.final_frac = 0.1
    c.optimizer.weight_decay = 0.0
    c.train.batch_size = 64
    c.train.epochs = 1.0
    c.evals.heldout = dict(type="rm_accuracy", every_steps=0, batch_size=16)
    c.checkpoint.select_by = ""
    if args.paper:
        # Appendix C.2: a 6B RM from the SFT model, one epoch, lr 9e-6, cosine to 10% of peak,
        # no warmup, batch 64 prompts (each with all its C(K,2) comparisons).
        c.model.dtype = "bfloat16"
        c.model.max_len = 2048
        c.data.seq_len = 2048
        c.optimizer.lr = 9e-6
        c.tokenizer = dict(kind="hf", path=args.tokenizer, eos_token="", pad_token="")
    if args.runlocal:
        c.train.batch_size = 16
        c.checkpoint.every_steps = 20
        c.train.log_every = 5
    return c.lock()
