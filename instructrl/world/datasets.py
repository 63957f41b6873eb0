"""Dataset builders: every stage's data on disk, in the formats the real-data loaders read.

Files written by ``build_all(world, out_dir)`` (JSONL = one JSON object per line):

  pretrain.jsonl            {"text"}                                   pretraining documents
  pretrain.txt              the same documents separated by blank lines
  prompts_{sft,rm,ppo,rm_valid,eval}.jsonl
                            prompt records {"prompt", "id", "category", "family",
                            "difficulty", "spec"}; ``World.score`` grades responses to them.
                            Eval prompts (and held-out labelers' judgments) never repeat a
                            training prompt; they are distinct among themselves
  sft_train.jsonl           demonstrations {"prompt", "response", "id", "labeler_id"}
  rankings_train.jsonl      {"prompt", "responses" [K], "ranks" [K], "labeler_id", "id"}
                            rm prompts ranked by training labelers (ranks: 0 = best, ties equal)
  rankings_valid_train_labelers.jsonl / rankings_valid_heldout_labelers.jsonl
                            rm_valid prompts ranked by training / held-out labelers
  heldout_tasks.jsonl       held-out "public NLP" items (``heldout``), never used in RL
  tokenizer.json            byte-level BPE trained on the corpus (HF ``tokenizers``), with
                            tokenizer_config.json naming its <|endoftext|> eos token
  world.json, manifest.json the world's config, knowledge base and labelers; file counts

Prompt counts are the paper's (table 6: SFT 12,725; RM 33,207; PPO 31,144) times
``config.scale``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from instructrl import fs
from instructrl.world.seeding import as_rng

PAPER_PROMPT_COUNTS = {"sft": 12725, "rm": 33207, "ppo": 31144}

# sample_fn(records, num_responses) -> one list of responses per record.
SampleFn = Callable[[list[dict], list[int]], list[list[str]]]


def write_jsonl(path: str, records) -> int:
    """Writes records (dicts) one per line; returns the count."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    fs.write_atomic(path, "".join(lines))
    return len(lines)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


def prompt_record(record: dict) -> dict:
    """The {"prompt", ...} export shape of a prompt record (prompt first)."""
    return {"prompt": record["prompt"], **{k: v for k, v in record.items() if k != "prompt"}}


def split_sizes(scale: float, num_rm_prompts: int = 0) -> dict[str, int]:
    """Prompt count of each split: the paper's times ``scale``; ``num_rm_prompts`` > 0 sets
    the RM split's (its validation split is a tenth of it either way)."""
    sizes = {k: max(1, round(v * scale)) for k, v in PAPER_PROMPT_COUNTS.items()}
    if num_rm_prompts:
        sizes["rm"] = int(num_rm_prompts)
    sizes["rm_valid"] = max(1, sizes["rm"] // 10)
    return sizes


def world_sampler(world, seed: int = 0) -> SampleFn:
    """A ``SampleFn`` drawing ``World.candidate_responses`` (a stand-in for policy samples)."""

    def sample(records, num_responses):
        return [
            world.candidate_responses(r, k, as_rng(seed, f"candidates/{r['id']}"))
            for r, k in zip(records, num_responses, strict=True)
        ]

    return sample


def build_rankings(
    world, records: list[dict], labelers, sample_fn: SampleFn | None = None, seed: int | None = None
) -> list[dict]:
    """One ranking per record: K in [min_responses, max_responses] responses from
    ``sample_fn``, ranked by a labeler drawn from ``labelers``.

    Returns [{"prompt", "responses" (K str), "ranks" (K int, 0 = best), "labeler_id", "id"
    [, "sources" (K str)]}].
    """
    c = world.config
    rng = as_rng(c.seed if seed is None else seed, "rankings")
    sample_fn = sample_fn or world_sampler(world, c.seed)
    ks = [int(rng.integers(c.min_responses, c.max_responses + 1)) for _ in records]
    chosen = [labelers[int(rng.integers(len(labelers)))] for _ in records]
    responses = sample_fn(records, ks)
    out = []
    for record, labeler, drawn in zip(records, chosen, responses, strict=True):
        # sample_fn gives K texts, or (K texts, K source names).
        candidates, sources = drawn if isinstance(drawn, tuple) else (drawn, None)
        row = {
            "prompt": record["prompt"],
            "responses": list(candidates),
            "ranks": labeler.rank(record, list(candidates)),
            "labeler_id": labeler.labeler_id,
            "id": record["id"],
        }
        if sources is not None:
            row["sources"] = list(sources)
        out.append(row)
    return out


def train_tokenizer(documents: list[str], vocab_size: int, path: str) -> None:
    """A byte-level BPE (HF ``tokenizers``) with an <|endoftext|> token, saved to ``path``."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    fs.write_atomic(path, tok.to_str())


def build_all(
    world, out_dir: str, sample_fn: SampleFn | None = None, tokenizer: bool = True
) -> dict:
    """Writes every dataset of the module docstring to ``out_dir``; returns the manifest."""
    start = time.time()
    fs.makedirs(out_dir)
    c = world.config
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    counts = {}

    docs = world.pretraining_corpus(c.num_pretrain_docs)
    counts["pretrain.jsonl"] = write_jsonl(path("pretrain.jsonl"), ({"text": d} for d in docs))
    fs.write_atomic(path("pretrain.txt"), "\n\n".join(docs) + "\n")

    prompts = {
        split: world.sample_prompts(n, prefix=split)
        for split, n in split_sizes(c.scale, c.num_rm_prompts).items()
    }
    seen = {r["prompt"] for records in prompts.values() for r in records}
    prompts["eval"] = world.sample_prompts(c.num_eval_prompts, prefix="eval", exclude=seen)
    for split, records in prompts.items():
        counts[f"prompts_{split}.jsonl"] = write_jsonl(
            path(f"prompts_{split}.jsonl"), map(prompt_record, records)
        )

    demos = world.demonstrations(prompts["sft"])
    counts["sft_train.jsonl"] = write_jsonl(path("sft_train.jsonl"), demos)

    pool = world.labelers
    for name, records, group in (
        ("rankings_train.jsonl", prompts["rm"], pool.train),
        ("rankings_valid_train_labelers.jsonl", prompts["rm_valid"], pool.train),
        ("rankings_valid_heldout_labelers.jsonl", prompts["rm_valid"], pool.heldout),
    ):
        rankings = build_rankings(world, records, group, sample_fn, seed=c.seed + len(name))
        counts[name] = write_jsonl(path(name), rankings)

    counts["heldout_tasks.jsonl"] = write_jsonl(
        path("heldout_tasks.jsonl"), world.heldout_tasks(c.num_heldout_per_family)
    )

    if tokenizer:
        train_tokenizer(docs, c.vocab_size, path("tokenizer.json"))
        fs.write_atomic(path("tokenizer_config.json"), json.dumps({"eos_token": "<|endoftext|>"}))
    described = {"config": dataclasses.asdict(c), "knowledge": world.kb.to_dict(),
                 "labelers": pool.profiles()}  # fmt: skip
    fs.write_atomic(path("world.json"), json.dumps(described, indent=1))
    manifest = {"seed": c.seed, "counts": counts}
    # No timings: the files are a function of the seed.
    fs.write_atomic(path("manifest.json"), json.dumps(manifest, indent=1))
    return {**manifest, "seconds": round(time.time() - start, 2)}


def mean_gold_score(world, records: list[dict], responses: list[str]) -> float:
    """Average gold score of one response per record (e.g. policy samples)."""
    return float(
        np.mean([world.score(r, s)["score"] for r, s in zip(records, responses, strict=True)])
    )
