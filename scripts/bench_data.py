"""How fast the input pipeline feeds packed SFT batches, in tokens/s per CPU core.

  .venv/bin/python scripts/bench_data.py                      # Alpaca 5000 + GPT-2 BPE
  .venv/bin/python scripts/bench_data.py --tokenizer bytes --seq_len 2048 --epochs 3

Two numbers, both counted in real (non-padding) tokens of the produced host batches:
  * end to end: read + validate + tokenize + pack + batch one epoch (the cost of a first epoch);
  * steady state: batches of later epochs (tokenization is done once, up front).
Per core = tokens / CPU seconds of this process (all threads), so a run on a shared or
multi-core machine reports the cost per core rather than the wall-clock rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

from instructrl.data import formats, sources  # noqa: E402
from instructrl.data import pipeline as dp  # noqa: E402
from instructrl.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402


def _clock():
    return time.perf_counter(), time.process_time()


def _rate(tokens, start):
    wall, cpu = (b - a for a, b in zip(start, _clock(), strict=True))
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data", default=os.path.join(SHARED, "demonstrations", "alpaca-5000.json")
    )
    parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "gpt2"))
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="steady-state epochs")
    parser.add_argument("--threads", type=int, default=1, help="Grain prefetch threads")
    args = parser.parse_args(argv)

    tok = ByteTokenizer() if args.tokenizer == "bytes" else HFTokenizer(args.tokenizer)
    start = _clock()
    demos, invalid = sources.read_demonstrations(args.data, skip_invalid=True)
    examples, too_long = dp.encode_demonstrations(
        tok, formats.PlainFormat(), demos, args.seq_len, skip_too_long=True
    )
    pipe = dp.LMPipeline(
        examples,
        args.batch_size,
        args.seq_len,
        seed=0,
        packing=True,
        pad_id=tok.pad_id,
        process_index=0,
        process_count=1,
        prefetch_threads=args.threads,
    )
    steps = int(pipe.steps_per_epoch)

    def feed(first, count):
        tokens = 0
        for step in range(first, first + count):
            tokens += int((pipe(step)["segment_ids"] > 0).sum())
        return tokens

    first_epoch = _rate(feed(0, steps), start)
    start = _clock()
    steady = _rate(feed(steps, steps * args.epochs), start)
    fill = examples.lengths.sum() / (pipe.num_rows * args.seq_len)
    print(
        f"data={os.path.basename(args.data)} examples={len(examples)} (skipped: {invalid} "
        f"invalid, {too_long} too long) seq_len={args.seq_len} batch={args.batch_size} "
        f"rows={pipe.num_rows} packing fill={fill:.3f}"
    )
    for name, r in (("end to end, first epoch", first_epoch), ("steady state", steady)):
        print(
            f"{name:>24}: {r['tokens']:>9} tokens  wall {r['wall_s']:.2f}s  cpu {r['cpu_s']:.2f}s"
            f"  -> {r['tokens_per_cpu_s']:,.0f} tokens/s per core"
        )
    return first_epoch, steady


if __name__ == "__main__":
    main()
